"""The background side of the queueserver submitter: a run's plan accepted, tried on a worker
thread, tried again, or given up.

:class:`Background` is the half of
:class:`~xasflow.adapters.queueserver.QueueServerSubmitter` that runs off the daemon's
publishing thread: :meth:`~Background.enqueue` accepts a run's plan, one worker thread tries
it (the submitter's one try, under its one rate, see
:mod:`~xasflow.adapters.queueserver_pending`), a failed try waits its backoff for the next,
and a plan whose tries are spent, or that close drops, is given up and remembered for the
next daemon. One given up while the daemon runs on is tried again by it once
``given_up_retry_s`` has passed and there is room
(:meth:`~xasflow.adapters.queueserver_revival.Revival._try_deferred`).
The rules are the submitter's (:mod:`xasflow.adapters.queueserver`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from xasflow.adapters.queueserver_client import QueueServerError
from xasflow.adapters.queueserver_memory import SubmittedRuns
from xasflow.adapters.queueserver_pending import (
    Deferred,
    GiveUps,
    Job,
    Jobs,
    RateSlot,
    Retries,
    backlog,
    next_job,
    wake,
)
from xasflow.adapters.queueserver_plan import (
    QueueServerConfig,
    plan_fields,
    submission_key,
    unwritable,
)
from xasflow.adapters.queueserver_plan import decode as _decode
from xasflow.adapters.queueserver_revival import Revival

__all__ = ["LIMITED", "Background"]

logger = logging.getLogger(__name__)

#: What a try returns when the rate held it back: nothing was sent.
LIMITED = object()

#: Raw runs (and rescan regions) remembered as queued, so a replay does not queue them again:
#: the newest settled ones (sent, found queued, or given up for good) are kept; those still
#: queued, under way or waiting for a retry are never trimmed (``max_pending`` bounds them).
_REMEMBERED = 4096


class Background(Revival):
    """Background submission for :class:`~xasflow.adapters.queueserver.QueueServerSubmitter`
    (which sets these attributes and makes the one try, :meth:`_send`)."""

    config: QueueServerConfig
    stats: dict[str, int]
    deferred_errors: int  # failed looks at the plans given up (no plan's outcome)
    _memory: SubmittedRuns
    _rate: RateSlot
    _queue: Jobs
    _retry: Retries
    _deferred: Deferred  # plans given up here, and when each may be tried again
    _give_ups: GiveUps  # plans enqueue refused, for the worker to give up (off its thread)
    _worker: threading.Thread | None
    _lock: threading.Lock
    _closing: bool
    _closed: bool
    _queued: OrderedDict[tuple[str, str], bool]  # key: settled (False: queued, under way)
    #: keys submit() holds while it sends: whether another path wanted the plan meanwhile
    _submitting: dict[tuple[str, str], bool]

    @property
    def enabled(self) -> bool:
        """Whether anything will be submitted."""
        return self.config.enabled

    def _send(
        self, recommendation: Mapping[str, Any], raw_uid: str | None, rescan_only: bool, tries: int
    ) -> Any:
        """One try (the submitter's)."""
        raise NotImplementedError

    def enqueue(
        self,
        recommendation: Mapping[str, Any],
        raw_uid: str | None = None,
        rescan_only: bool = False,
    ) -> bool:
        """Submit in the background (rate-limited; a failed try is tried again, see the
        module); False when disabled, certain, already queued for this raw run, once close
        has begun (``dropped_closed``: remembered as given up, like the plans close drops,
        written by close), limited (a new plan went in within ``min_interval_s``: one behind
        retries waits its turn), its replays spent (``abandoned_replays``: written by the
        worker), not JSON (``abandoned_not_json``, logged: what the plan carries is no JSON
        once numpy values are plain) or full (``gave_up_queue_full``: remembered as given
        up too, for a replay of its run or the next daemon to try again, by the worker: held
        as queued until then, counted once remembered). This runs on the daemon's
        processing thread, which never waits on disk: it writes nothing itself. A plan
        accepted while another one's try is under way is rate-limited when its turn comes
        if that one went in."""
        if not self.enabled:
            self.stats["skipped_disabled"] += 1
            return False
        rec = _decode(recommendation)
        if rec.get("stop_early") and not rescan_only:
            self.stats["skipped_certain"] += 1
            return False
        key = None
        if raw_uid:
            key = submission_key(raw_uid, rec, rescan_only)
            with self._lock:
                held = self._held(key)
            if held or key in self._memory:
                self.stats["skipped_repeat"] += 1
                return False
        why = unwritable(rec)  # numpy values are plain already (decode)
        if why is not None:  # no client could send it, nor the memory keep it
            self._not_json(raw_uid, why)
            return False
        job = (rec, raw_uid, rescan_only)
        if self._closing:  # remembered like the plans close drops: the next daemon tries it
            self._give_up(job, "dropped_closed", wait=False)  # written by close
            return False
        if self._rate.limited() and not backlog(self._retry, self._rate):
            self.stats["skipped_rate"] += 1
            return False
        if key is not None and self._spent(key, wait=False):  # a replay counts at its first try
            with self._lock:  # its line is the worker's to write (close's, once it has begun)
                if not self._closing:
                    self._start_worker()
                    wake(self._queue)
            return False
        with self._lock:  # close sets _closing under it: a plan offered here is close's to drain
            closing = self._closing
            repeat = key is not None and self._held(key)  # submit() took it since
            offered = not closing and not repeat and self._offer(job, key)
            full = not closing and not repeat and not offered
            if full:  # max_pending wait already: the worker (started by _offer) gives it up
                if key is not None:
                    self._hold(key)  # until given up: no replay offers it meanwhile
                self._give_ups.put(job, "gave_up_queue_full")
        if repeat:  # held by submit(), whose outcome settles it
            self.stats["skipped_repeat"] += 1
            return False
        if closing:  # close began since the look above
            self._give_up(job, "dropped_closed", wait=False)
            return False
        if full:  # remembered there, as a plan close drops, then counted
            wake(self._queue)
            return False
        return True

    def _offer(self, job: Job, key: tuple[str, str] | None) -> bool:
        """Put ``job`` in the queue for the worker (started if need be), unless full; called
        under ``_lock``."""
        self._start_worker()
        if not self._queue.offer(job):
            return False
        if key is not None:
            self._hold(key)
        return True

    def _held(self, key: tuple[str, str]) -> bool:
        """Whether ``key``'s plan is held as queued here, so that the path asking leaves it to
        the one holding it (called under ``_lock``). One that :meth:`submit` holds is marked
        wanted: if its try does not send the plan, it gives the plan up (:meth:`_let_go`)
        rather than let go of it, so the plan the asking path left to it is not lost."""
        if key in self._submitting:
            self._submitting[key] = True
        return key in self._queued

    def _let_go(
        self,
        key: tuple[str, str],
        job: Job,
        sent: bool,
        failed: QueueServerError | None,
        limited: bool,
    ) -> None:
        """:meth:`submit`'s try of ``job`` is over: ``sent`` (still held, settled),
        ``failed`` (with this error), ``limited`` (the rate held it back: nothing was sent),
        or none of them (found queued, given up for good, or a plan no server takes: settled
        elsewhere). A plan another path wanted meanwhile (:meth:`_held`) is not dropped: one
        that failed is retried as the worker retries its own, that try its first
        (:meth:`_again`: ``retries`` more after the backoff, then given up, ``gave_up``),
        one the rate held back waits for its slot among the retries, as a plan the rate
        holds back behind retries does (:meth:`_wait_turn`, ``waited_rate``: no give-up);
        otherwise it is no longer held here."""
        with self._lock:
            wanted = self._submitting.pop(key, False) and (failed is not None or limited)
            if sent:
                self._queued[key] = True
            elif not wanted:
                self._queued.pop(key, None)
        if not wanted:
            return
        if failed is not None:  # still held while it waits: no path takes it meanwhile
            self._again(job, 1, failed)
        else:  # still held: its first try (tries 0) counts as a replay, as any first try
            self._wait_turn(job, 0, new=True)
        with self._lock:  # a worker, to look at it (none is after close)
            if not self._closing:
                self._start_worker()
        wake(self._queue)

    def _hold(self, key: tuple[str, str]) -> None:
        """Hold ``key``'s plan as queued by this process, so that neither path sends it
        again (called under ``_lock``), until it is settled (:meth:`_settle`) or given up.
        Past ``_REMEMBERED``, the oldest settled plans are forgotten, never one still queued,
        under way or waiting for a retry: a replay of its run would queue it a second time."""
        self._queued[key] = False
        excess = len(self._queued) - _REMEMBERED
        settled: list[tuple[str, str]] = []
        for held, done in self._queued.items():
            if len(settled) >= excess:
                break
            if done:
                settled.append(held)
        for held in settled:
            del self._queued[held]

    def _settle(self, job: Job) -> None:
        """``job``'s plan has its outcome (sent, found queued, or given up for good): still
        held as queued, it may be trimmed now (:meth:`_hold`)."""
        rec, raw_uid, rescan_only = job
        if raw_uid:
            key = submission_key(raw_uid, rec, rescan_only)
            with self._lock:
                if key in self._queued:
                    self._queued[key] = True

    def _unhold(self, job: Job) -> None:
        """``job``'s plan was not sent, and this path tries it no more: no longer held as
        queued, so that a replay of its run, or ``submit``, may (held as settled, it would
        be skipped as a repeat of a plan that never reached the server)."""
        rec, raw_uid, rescan_only = job
        if raw_uid:
            with self._lock:
                self._queued.pop(submission_key(raw_uid, rec, rescan_only), None)

    def _start_worker(self) -> None:
        """A worker thread, unless one runs (called under ``_lock``)."""
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(
                target=self._work, name="xasflow-queueserver", daemon=True
            )
            self._worker.start()

    def _work(self) -> None:
        while True:
            job, tries, waited = next_job(self._queue, self._retry, self._rate, self._look)
            try:
                if job is None:
                    return
                if self._closed:  # close() gave up on what is queued
                    self._give_up(job, "dropped_closed")
                    continue
                self._try(job, tries, waited)
            finally:
                if waited:
                    self._retry.done()
                else:
                    self._queue.task_done()

    def _try(self, job: Job, tries: int, waited: bool = False) -> None:
        """One try of a background submission (``waited``: it waited its turn in the line of
        retries); a failed one goes to :meth:`_again`. A first try the rate holds back is not
        sent (``skipped_rate``: a new plan went in since its enqueue, one whose try was under
        way then); a retry, or a plan behind retries, waits for its slot (:meth:`_wait_turn`)."""
        rec, raw_uid, rescan_only = job
        try:
            reply = self._send(rec, raw_uid, rescan_only, tries)
        except QueueServerError as exc:
            self._again(job, tries + 1, exc)
        except ValueError as exc:  # a plan no server takes: not tried again, nor held as sent
            self.stats["refused_invalid"] += 1  # once a replay of its run: nothing is sent
            logger.warning("queueserver submission refused: %s", exc)
            self._unhold(job)
        except Exception:
            logger.exception("queueserver submission failed")
            self._unhold(job)
        else:
            if reply is not LIMITED:
                self._settle(job)
                return
            if tries or waited or backlog(self._retry, self._rate):
                self._wait_turn(job, tries, new=not (tries or waited))
                return
            self.stats["skipped_rate"] += 1
            self._unhold(job)  # not queued after all: as if refused at enqueue

    def _wait_turn(self, job: Job, tries: int, new: bool) -> None:
        """Wait ``job`` beside the queue for its slot in the rate (:func:`next_job` waits for
        it); ``new``: a new run's plan behind retries (``waited_rate``), given up (and
        remembered, ``gave_up_waiting_full``) while ``max_pending`` wait already."""
        with self._lock:
            closing = self._closing
            full = new and len(self._retry) >= self.config.max_pending
            if not closing and not full:
                self._retry.push(job, tries)
        if closing:
            self._give_up(job, "dropped_closed")
        elif full:
            logger.error("queueserver plan of run %r given up: too many wait for the rate", job[1])
            self._give_up(job, "gave_up_waiting_full")
        elif new:
            self.stats["waited_rate"] += 1

    def _again(self, job: Job, tries: int, exc: Exception) -> None:
        """Schedule the next try of a submission that failed its ``tries``-th try, after
        ``retry_backoff_s * 2**(tries - 1)``; given up after ``retries`` retries or while
        ``max_pending`` retries wait; dropped (and remembered as given up) once close has
        begun."""
        cfg, raw_uid = self.config, job[1]
        with self._lock:
            closing = self._closing
            given_up = not closing and (tries > cfg.retries or len(self._retry) >= cfg.max_pending)
            if not closing and not given_up:
                wait = cfg.retry_backoff_s * 2 ** (tries - 1)
                self._retry.push(job, tries, wait)
        if closing:
            self._give_up(job, "dropped_closed")
        elif given_up:
            logger.error(
                "queueserver submission of run %r given up after %d tries: %s", raw_uid, tries, exc
            )
            self._give_up(job)
        else:
            logger.warning(
                "queueserver submission of run %r failed (try %d), again in %.1f s: %s",
                raw_uid,
                tries,
                wait,
                exc,
            )

    def _give_up(self, job: Job, counter: str = "gave_up", wait: bool = True) -> None:
        """Count a submission given up (``dropped_closed``: by close; ``gave_up_queue_full``,
        ``gave_up_waiting_full``: no place to wait) and remember its run's plan, with what
        rebuilds it: a restarted daemon may try it again (retry_given_up), and so may a
        later replay of the run in this one (no longer held as queued here), and, unless
        close dropped it, this daemon once ``given_up_retry_s`` has passed
        (:meth:`_try_deferred`: never sooner than the retry backoff's next step). Called on
        the worker (a plan enqueue refused at a full queue too, :meth:`_hand_over`), by
        ``submit`` and by close. Counted once remembered (on disk): a daemon that dies
        between the two has reported nothing it did not keep; but not ``wait`` (a plan
        enqueue drops once close has begun: the daemon's processing thread never waits on
        disk), counted once recorded, for close to write before it lets go of the memory."""
        rec, raw_uid, rescan_only = job
        if raw_uid:
            key = submission_key(raw_uid, rec, rescan_only)
            with self._lock:
                self._queued.pop(key, None)
            if not self._memory.give_up(key, plan_fields(rec), rescan_only, wait=wait):
                self._not_json(raw_uid, "it cannot be remembered as given up (not JSON)")
                return
            cfg = self.config
            if counter != "dropped_closed" and cfg.given_up_retry_s > 0:
                after = max(cfg.given_up_retry_s, cfg.retry_backoff_s * 2**cfg.retries)
                self._deferred.add(key, job, after)
        self.stats[counter] += 1

    def _not_json(self, raw_uid: str | None, why: str) -> None:
        """A plan JSON cannot write is lost: counted (``abandoned_not_json``, which the
        plans-lost alert selects) and logged at ERROR with its run, never dropped unseen."""
        self.stats["abandoned_not_json"] += 1
        logger.error("the queueserver plan of run %r is given up for good: %s", raw_uid, why)

    def _hand_over(self) -> None:
        """Give up the plans :meth:`enqueue` refused at a full queue (on the worker, which
        calls this at each look; close, for those it did not reach), and write the lines it
        recorded without waiting (plans given up for good): fsync'd here, never on the
        daemon's processing thread."""
        while (handed := self._give_ups.take()) is not None:
            try:
                self._give_up(*handed)
            except Exception:
                logger.exception("giving up the queueserver plan of run %r failed", handed[0][1])
            finally:
                self._give_ups.done()
        self._memory.write()

    def _look(self) -> float | None:
        """:meth:`_try_deferred`, which runs in the worker's wait for its next job: an error
        there is logged and counted (``deferred_errors``) instead of ending the worker (the
        plans it was looking at stay given up in the memory, for a replay or a restart).
        The plans enqueue handed over are given up first (:meth:`_hand_over`)."""
        self._hand_over()
        try:
            return self._try_deferred()
        except Exception:
            self.deferred_errors += 1  # only the worker looks: no lock
            logger.exception("trying again the queueserver plans given up in this daemon failed")
        return self._deferred.due_in()

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until every queued submission, and every retry, is done (tests); False on
        timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks or self._retry.unfinished or self._give_ups.unfinished:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True
