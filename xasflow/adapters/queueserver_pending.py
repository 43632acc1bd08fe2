"""When the queueserver submitter may send a plan: one rate for every path, and the retries
waiting their turn.

The rate protects the beamline's queue from a flood of plans: :class:`RateSlot` lets at most
one plan per ``min_interval_s`` reach the queue, whichever path sends it (the synchronous
``submit``, a run's first try, a retry, a plan revived after a restart). Only a plan the
server took holds the slot; a try that failed, or found its plan already there, holds
nothing. A run's new plan that finds the slot held by another new plan is not sent
(``skipped_rate``): the rate is what keeps a flood of runs from flooding the queue. A retry
is the plan of a run whose advice will not come again, so it is never dropped for the rate:
:class:`Retries` keeps it until its backoff has passed *and* the slot is free (after an
outage, or a restart that revives plans, they go in one per ``min_interval_s``, not as a
burst of up to ``max_pending``). Nor is a new plan dropped because those retries hold the
slot (:func:`backlog`): one that comes while a retry holds it, or while retries wait for it,
waits its turn in the same line (``waited_rate``).

A plan given up (its retries spent, or no room to wait) is tried again by the daemon running
on: :class:`Deferred` keeps when each may be, and :func:`next_job` wakes for it, so that the
submitter pushes it among the retries (where it waits for its slot like them), the earliest
due first. Each waits ``given_up_retry_s`` from its last give-up (after its retries, at
least the backoff's next step), never a busy loop: a plan is given up again only
after tries that each waited their backoff, and the submitter tries one again for at most
``given_up_replays`` rounds.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from xasflow.adapters.queueserver_plan import QueueServerConfig

__all__ = [
    "WAKE",
    "Deferred",
    "GiveUps",
    "Job",
    "Jobs",
    "RateSlot",
    "Retries",
    "backlog",
    "next_job",
    "wake",
]

#: A background submission: (recommendation, raw uid, rescan only).
Job = tuple[dict[str, Any], str | None, bool]

#: Not a submission: put in the jobs queue (compared by identity) to wake a worker waiting
#: there, when a retry was pushed from another thread (:func:`wake`).
WAKE: Job = ({}, None, False)


class Jobs(queue.Queue[Job | None]):
    """New runs' plans for the worker, at most ``most`` waiting: the wake-up marker
    (:data:`WAKE`) and the stop (None) are not plans and take no place."""

    def __init__(self, most: int) -> None:
        super().__init__()  # unbounded: offer() bounds the plans
        self.most = most
        self.plans = 0  # plans in it (under self.mutex)

    def offer(self, job: Job) -> bool:
        """Put a run's plan in, unless ``most`` wait already (False)."""
        with self.mutex:
            if self.plans >= self.most:
                return False
            self.plans += 1
        self.put_nowait(job)
        return True

    def _get(self) -> Job | None:  # called under self.mutex
        item = super()._get()
        if item is not None and item is not WAKE:
            self.plans -= 1
        return item


class RateSlot:
    """When the server last took a plan, and how long until the next one may go."""

    def __init__(
        self, config: QueueServerConfig, clock: Callable[[], float], age: float | None = None
    ) -> None:
        """``config.min_interval_s`` is read at each check; ``clock`` counts seconds;
        ``age``: seconds since the server last took a plan (a previous daemon's, remembered;
        None: none), so that a restart keeps the rate."""
        self._config = config
        self._clock = clock
        self._taken = -float("inf") if age is None else clock() - age  # the last plan taken
        self.by_retry = False  # whether that plan was a retry (or a revived plan)

    def wait(self) -> float:
        """Seconds until the next plan may go (0: now)."""
        return max(0.0, self._taken + self._config.min_interval_s - self._clock())

    def limited(self) -> bool:
        """Whether the server took a plan less than ``min_interval_s`` ago."""
        return self.wait() > 0.0

    def take(self, retry: bool = False) -> None:
        """The server took a plan now (``retry``: a retry's): the slot is held for
        ``min_interval_s``."""
        self._taken = self._clock()
        self.by_retry = retry


class Retries:
    """Failed submissions waiting for their next try, the earliest due first (thread-safe);
    also new runs' plans waiting their turn behind them (pushed with no tries made).

    Each is due once its backoff (on ``time.monotonic``) has passed and the rate slot is free.
    Like a ``queue.Queue``, it counts the retries not yet done (waiting, or under way until
    :meth:`done`), so that the submitter's ``join`` can wait for them.
    """

    def __init__(self) -> None:
        #: (due, on time.monotonic; order; tries made; job)
        self._heap: list[tuple[float, int, int, Job]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self.unfinished = 0  # retries waiting or under way

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)

    def push(self, job: Job, tries: int, after: float = 0.0) -> None:
        """Wait ``job`` (``tries`` made so far) for at least ``after`` seconds."""
        with self._lock:
            due = time.monotonic() + after
            heapq.heappush(self._heap, (due, next(self._order), tries, job))
            self.unfinished += 1

    def done(self) -> None:
        """A retry :meth:`pop` returned is over (sent, given up, or pushed again)."""
        with self._lock:
            self.unfinished -= 1

    def due_in(self, slot: float) -> float | None:
        """Seconds until the earliest may go: its backoff over, and ``slot`` (the rate's wait)
        passed; None when none waits."""
        with self._lock:
            if not self._heap:
                return None
            return max(self._heap[0][0] - time.monotonic(), slot)

    def due(self) -> bool:
        """Whether one waits whose backoff is over (it waits for the rate slot only)."""
        with self._lock:
            return bool(self._heap) and self._heap[0][0] <= time.monotonic()

    def pop(self) -> tuple[Job, int] | None:
        """The earliest retry and the tries it had (None when none waits)."""
        with self._lock:
            if not self._heap:
                return None
            _, _, tries, job = heapq.heappop(self._heap)
            return job, tries

    def clear(self) -> list[Job]:
        """Every retry still waiting, now forgotten here (and done)."""
        with self._lock:
            jobs = [job for _, _, _, job in self._heap]
            self._heap.clear()
            self.unfinished -= len(jobs)
            return jobs


class GiveUps:
    """Plans refused where no thread may wait on disk (a full queue, at ``enqueue`` on the
    daemon's processing thread), handed to the worker to be given up: remembered, then
    counted (thread-safe). Like :class:`Retries` it counts those not yet done, for ``join``."""

    def __init__(self) -> None:
        self._jobs: deque[tuple[Job, str]] = deque()
        self._lock = threading.Lock()
        self.unfinished = 0  # handed over, not yet given up

    def put(self, job: Job, counter: str) -> None:
        """Hand ``job`` over, to be given up and counted in ``counter``."""
        with self._lock:
            self._jobs.append((job, counter))
            self.unfinished += 1

    def take(self) -> tuple[Job, str] | None:
        """The oldest handed over (None: none); :meth:`done` once it is given up."""
        with self._lock:
            return self._jobs.popleft() if self._jobs else None

    def done(self) -> None:
        """One :meth:`take` returned is given up."""
        with self._lock:
            self.unfinished -= 1


class Deferred:
    """Plans given up in this process, each with when it may be tried again (on the
    submitter's clock), the newest ``most`` set (thread-safe). Their waits differ (a plan
    whose retries were spent waits at least the backoff's next step, one put back for room
    ``given_up_retry_s``), so they come due by their time, not in the order they were set.
    At most ``most`` (half the memory's limit), looked at once per worker turn at plan
    rates: each look scans them."""

    def __init__(self, clock: Callable[[], float], most: int) -> None:
        self._clock = clock
        self._most = most
        #: key: (when due, job), the oldest set first (forgotten first)
        self._due: OrderedDict[tuple[str, str], tuple[float, Job]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)

    def add(self, key: tuple[str, str], job: Job, after: float) -> None:
        """``key``'s plan (``job``) may be tried again in ``after`` seconds (a later
        :meth:`add` of the same plan replaces it); past ``most``, the one set longest ago is
        forgotten here (still given up in the memory, for a replay or the next daemon)."""
        with self._lock:
            self._due.pop(key, None)
            self._due[key] = (self._clock() + after, job)
            while len(self._due) > self._most:
                self._due.popitem(last=False)

    def due_in(self) -> float | None:
        """Seconds until the earliest may be tried again (None: none waits)."""
        with self._lock:
            if not self._due:
                return None
            return min(at for at, _ in self._due.values()) - self._clock()

    def take_due(self) -> list[tuple[tuple[str, str], Job]]:
        """The plans whose wait is over, the earliest due first, now forgotten here."""
        with self._lock:
            now = self._clock()
            due = sorted(
                ((at, k, key) for k, (key, (at, _)) in enumerate(self._due.items()) if at <= now)
            )
            return [(key, self._due.pop(key)[1]) for _, _, key in due]


def backlog(retries: Retries, rate: RateSlot) -> bool:
    """Whether a new run's plan that finds the slot held waits its turn instead of being
    skipped: a retry holds the slot, or retries wait for it."""
    return rate.by_retry or retries.due()


def next_job(
    jobs: queue.Queue[Job | None],
    retries: Retries,
    rate: RateSlot,
    deferred: Callable[[], float | None] | None = None,
) -> tuple[Job | None, int, bool]:
    """The next submission, the tries it had, and whether it came from ``retries``: the
    next of ``jobs`` (new runs' plans; None: stop), else one of ``retries`` once its backoff
    is over and the rate slot free. A new run's plan ready as well goes first: retries wait
    beside the queue, never in front of it. ``deferred`` is called at each look (it pushes
    the plans given up whose wait is over among the retries) and says in how many seconds
    to look again (None: no plan given up waits; it never says 0 twice for the same plan)."""
    while True:
        again = deferred() if deferred is not None else None
        wait = retries.due_in(rate.wait())
        if wait is not None and wait <= 0 and jobs.empty():
            retry = retries.pop()
            if retry is not None:
                return (*retry, True)
            continue
        if again is not None:  # wake for the next plan given up, a retry's wait aside
            wait = again if wait is None else min(wait, again)
        try:
            job = jobs.get(timeout=None if wait is None else max(0.0, wait))
        except queue.Empty:
            continue
        if job is WAKE:  # look at the retries again
            jobs.task_done()
            continue
        return job, 0, False


def wake(jobs: queue.Queue[Job | None]) -> None:
    """Wake a worker waiting in :func:`next_job` for a new run's plan, so that it sees the
    retries pushed meanwhile by another thread (a full queue: it is not waiting; in
    :class:`Jobs` the marker takes no plan's place)."""
    with contextlib.suppress(queue.Full):
        jobs.put_nowait(WAKE)
