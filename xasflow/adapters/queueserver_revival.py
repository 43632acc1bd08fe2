"""Plans given up in this daemon, tried again while it runs on, or given up for good: the
half of :class:`~xasflow.adapters.queueserver_worker.Background` (a mixin only it uses)
that its worker calls at each look (:meth:`Revival._try_deferred`) and at a plan's first
try (:meth:`Revival._replay`). The rules are the submitter's
(:mod:`xasflow.adapters.queueserver`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from xasflow.adapters.queueserver_memory import SubmittedRuns
from xasflow.adapters.queueserver_pending import Deferred, Job, Jobs, Retries
from xasflow.adapters.queueserver_plan import QueueServerConfig

__all__ = ["Revival"]

logger = logging.getLogger("xasflow.adapters.queueserver_worker")

#: Why a plan is given up for good, by reason (the log says it).
_WHY = {
    "lost_reply": "a previous daemon lost the reply to its last try, and the server holds it "
    "in neither queue nor history: it may have been taken and removed by an operator, and is "
    "not queued again (check the queue)",
    "replays": "it was tried again for given_up_replays replays of its run already",
    "expired": "it was first given up more than given_up_max_age_s ago: the sample in the "
    "beam has likely changed since",
}


class Revival:
    """Given-up plans tried again, or given up for good (``Background``'s state)."""

    config: QueueServerConfig
    stats: dict[str, int]
    _memory: SubmittedRuns
    _queue: Jobs
    _retry: Retries
    _deferred: Deferred  # plans given up here, and when each may be tried again
    _lock: threading.Lock
    _closing: bool

    if TYPE_CHECKING:

        def _held(self, key: tuple[str, str]) -> bool: ...

        def _hold(self, key: tuple[str, str]) -> None: ...

    def _try_deferred(self) -> float | None:
        """Try again the plans given up here whose wait is over (the worker calls it at each
        look, :func:`~.queueserver_pending.next_job`), as replays of their runs: each pushed
        among the retries (``revived``), where it waits for its slot in the rate, and its
        first try counts as a replay (:meth:`_replay`). One is not tried again while held as
        queued (a replay of its run, or ``submit``, tries it: one ``submit`` fails to send is
        retried, :meth:`_let_go`), once queued or given up for good; one tried for
        ``given_up_replays`` replays already, or first given up more than
        ``given_up_max_age_s`` ago, is given up for good (``abandoned_replays``,
        ``abandoned_expired``: logged, remembered, not dropped unseen); one that finds a new
        run's plan queued, or ``max_pending`` retries waiting, waits ``given_up_retry_s``
        more. Seconds until the next is due."""
        cfg, due = self.config, self._deferred.take_due()
        if not due:
            return self._deferred.due_in()
        later: list[tuple[tuple[str, str], Job]] = []
        spent: list[tuple[tuple[str, str], str]] = []
        tried = 0
        with self._lock:  # close sets _closing under it: nothing is pushed after close drains
            if self._closing:
                return None
            room = cfg.max_pending - len(self._retry)
            for key, job in due:
                if self._held(key) or key in self._memory:
                    continue  # held by another path, or settled since
                why = self._memory.retry_spent(key, cfg.given_up_replays, cfg.given_up_max_age_s)
                if why is not None:
                    if why:
                        spent.append((key, why))
                    continue
                if room <= 0 or self._queue.plans:
                    later.append((key, job))
                    continue
                self._hold(key)
                self._retry.push(job, 0)  # tries 0: its first try counts as a replay
                room -= 1
                tried += 1
        for key, job in later:
            self._deferred.add(key, job, cfg.given_up_retry_s)
        for key, why in spent:
            self._abandon(key, why)
        self.stats["revived"] += tried
        if tried:
            logger.info("trying again %d queueserver plans given up in this daemon", tried)
        return self._deferred.due_in()

    def _spent(self, key: tuple[str, str], wait: bool = True) -> bool:
        """Whether this run's plan, given up, was tried again for ``given_up_replays``
        replays of its run already: then it is given up for good (``abandoned_replays``;
        not ``wait``: recorded, for the worker to write)."""
        replays = self._memory.replays(key)
        if replays is None or replays < self.config.given_up_replays:
            return False
        self._abandon(key, "replays", wait)
        return True

    def _replay(self, key: tuple[str, str]) -> bool:
        """At a plan's first try: whether it may be tried (not :meth:`_spent`), a replay of
        a plan given up counted (on disk) when so."""
        if self._spent(key):
            return False
        self._memory.replayed(key)  # nothing when the plan is not given up
        return True

    def _abandon(self, key: tuple[str, str], reason: str, wait: bool = True) -> None:
        """Give ``key``'s plan up for good (``abandoned_<reason>``, logged, remembered: on
        disk when this returns if ``wait``): it is neither revived nor sent for a replay of
        its run again."""
        self.stats[f"abandoned_{reason}"] += 1
        why = _WHY[reason]
        logger.error("the queueserver plan %r of run %r is given up for good: %s", *key[::-1], why)
        self._memory.abandon(key, reason, wait)
