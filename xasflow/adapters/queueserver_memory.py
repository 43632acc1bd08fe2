"""The plans this daemon queued, remembered across its restarts (beside its store).

Before each submission the queueserver's queue and history are asked whether the raw run's
plan is there (:mod:`xasflow.adapters.queueserver`), but a plan an operator removed from the
queue is in neither, nor is one whose history was cleared: after a restart, a run that Kafka
replays would be queued again. :class:`SubmittedRuns` keeps the submission keys (``(raw uid,
what)``, :func:`~xasflow.adapters.queueserver_plan.submission_key`) of the plans the server
took or already held, the newest ``limit``, in a JSON-lines file: one ``[raw_uid, what]`` a
line, appended, rewritten with what is kept once it holds twice the limit or, if more, twice
what the last rewrite wrote (what is kept may pass twice the limit: ``limit`` keys, ``limit
// 2`` plans given up and two lines for each of ``limit`` given up for good; the trigger
leaving no room would rewrite the whole file at each line). So the file holds at most twice
that, about 28,700 lines for the default 4,096 (2 x 14,337, plus intents and lost replies in
flight: a few MB, read once at start), each line costing a few writes amortised. A missing,
unreadable or torn file is read as far as it goes (:mod:`~xasflow.adapters.queueserver_recall`
reads it) and a failed write is logged: the server's own record stays the first check, this
one only covers what it has forgotten.

A plan given up (its tries all failed, so it reached no queue as far as the server said, or
the daemon stopped before its next try) is recorded apart, with what rebuilds it:
``{"gave_up": [raw_uid, what], "rec": {...}, "rescan_only": false, "at": <time.time()>,
"rounds": 0, "replays": 0}`` (a later line of the same plan, with more rounds or replays,
replaces it). It does not count as queued, and
the next daemon may try it again (:meth:`SubmittedRuns.revive`), a bounded number of restarts
(``rounds``) and only while it is recent (a stale plan would scan whatever sample is in the
beam now). A later ``[raw_uid, what]`` line (the plan went in, or was found on the server)
supersedes it; the submitter asks the server's queue and history before each try, so a plan
whose last reply was lost after the server took it is not queued twice.

The rate is kept too: ``{"slot": <time.time()>}`` each time the server takes a plan
(:meth:`SubmittedRuns.took`), so a restarted daemon holds the slot the last one took
(:meth:`~SubmittedRuns.slot_age`) instead of sending at once. The lines' formats are
:mod:`~xasflow.adapters.queueserver_records`'.

Durable, and in this order. Each line is flushed and ``os.fsync``'d before the call that
writes it returns (and the directory once the file is made, or rewritten): the submitter
records its intent (``{"sending": [raw_uid, what]}``, :meth:`SubmittedRuns.sending`)
before the request that may queue the plan, then the outcome: ``[raw_uid, what]`` (taken,
:meth:`~SubmittedRuns.add`) before the submission counts as done, ``{"failed": [raw_uid,
what]}`` (:meth:`~SubmittedRuns.failed`: refused, or not reached; it settles a lost reply
before it) or ``{"lost_reply":
[raw_uid, what]}`` (:meth:`~SubmittedRuns.lost_reply`: the request timed out, the server may
have taken the plan) before it is tried again. So a crash leaves, for the plan being
submitted:

* before the intent is on disk: nothing; the plan was not sent (a replay queues it);
* after the intent, before the outcome: the plan *in doubt*, whether or not the server took
  it. The next daemon holds it as queued, so it is never queued twice (at most once: a plan
  the server never got is lost), and logs it for an operator to check;
* after the outcome: queued, or not queued (a replay queues it), or its reply lost. A plan
  whose reply a previous daemon lost is not queued again on the word of the server alone
  (:meth:`~SubmittedRuns.lost_before`): found in its queue or history it was taken, and in
  neither it may have been taken and removed by an operator since, so the submitter gives it
  up for good (:meth:`~SubmittedRuns.abandon`, ``{"abandoned": [raw_uid, what], "reason":
  "lost_reply"}`` after a ``[raw_uid, what]`` line, so the previous release, which skips the
  first, holds the plan as queued after a rollback rather than reviving it): re-adding a
  plan an operator removed is worse than not adding one the server never got. A later try in
  the daemon that lost the reply (its retries, seconds later) still asks the server and
  sends the plan when it is in neither.

A write that fails is logged (the next rewrites the file with all that is kept) and the
plan is sent all the same: the server's record stays the first check, and a daemon whose
disk fails has its store to worry about first.

No look waits on the disk. The lock on what is remembered is never held across a write: a
change is made under it and its line recorded, then written, one writer at a time, in the
order recorded (:mod:`~xasflow.adapters.queueserver_journal`), before the call returns. So
the daemon's processing thread, whose ``enqueue`` looks here, never waits for the worker's
fsync.

One daemon a file. Two daemons on one store directory would each check the memory, find a
run's plan missing and both queue it (and both try the plans given up). Locking each
check-and-record would make the file safe but not the daemons: they would still analyse the
same runs into one store, which the store refuses to a second writer anyway. So, as the
store does, :class:`SubmittedRuns` holds an exclusive ``flock`` on ``<file>.lock`` (beside
it, never replaced) from before it reads the file until :meth:`~SubmittedRuns.close`, and a
second daemon refuses to start (:class:`MemoryInUseError`, naming the file and the pid that
holds it, :func:`~.queueserver_journal.hold_file`) before it reads or sends anything. The kernel drops the lock when its process
ends, even by SIGKILL: there is no stale lock to clear.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xasflow.adapters.queueserver_journal import Journal, MemoryInUseError, hold_file, let_go
from xasflow.adapters.queueserver_recall import recall
from xasflow.adapters.queueserver_records import GivenUp, Key, abandoned_lines, slot_line

__all__ = ["SUBMITTED_FILE", "GivenUp", "MemoryInUseError", "SubmittedRuns"]

logger = logging.getLogger(__name__)

#: The file's name in the store's directory (``storage.directory``).
SUBMITTED_FILE = "queueserver-submitted.jsonl"


class SubmittedRuns:
    """Submission keys of queued plans, the newest ``limit``, kept in ``path`` (None: in this
    process only)."""

    def __init__(
        self, path: Path | None, limit: int = 4096, wall: Callable[[], float] = time.time
    ) -> None:
        """Lock ``path`` for this process (:class:`MemoryInUseError` when another holds it;
        see the module), then read what it holds (nothing if it does not exist); ``wall``
        dates the plans given up (a clock that outlives the process)."""
        self.path = path
        self.limit = limit
        self._wall = wall
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Plans given up, not queued since, the newest ``limit // 2`` (keyed like _keys)
        self._given_up: OrderedDict[Key, GivenUp] = OrderedDict()
        #: plans :meth:`revive` forgot, by why ("restarts", "expired", "crowded")
        self.forgotten: dict[str, int] = {}
        self._revivable: set[Key] = set()  # read from the file: a previous daemon's
        self._sending: set[Key] = set()  # intents this process recorded, no outcome yet
        self._lost: set[Key] = set()  # tries whose reply was lost, not settled since
        self._lost_before: set[Key] = set()  # those of them a previous daemon's
        #: Plans given up for good (never sent again), with why, the newest ``limit``
        self._abandoned: OrderedDict[Key, str] = OrderedDict()
        self._slot: float | None = None  # when the server last took a plan (wall clock)
        self._lock = threading.Lock()  # what is remembered: never held across a write
        self._journal: Journal | None = None  # the file's writes (see queueserver_journal)
        self._lock_fd: int | None = None
        self._closed = False
        if path is not None:
            self._lock_fd = hold_file(path)
            self._journal = Journal(path, limit)
            self._read(path)

    def close(self) -> None:
        """Release the file for another daemon; nothing more is written (a plan sent after
        this stays in doubt in the file: never queued twice). The lines recorded before
        are written first. Idempotent."""
        journal = self._journal
        if journal is None:
            with self._lock:
                self._closed = True
            return
        with journal.io:
            with self._lock:
                self._closed = True
            if self._lock_fd is not None:
                self._drain(journal)
                let_go(journal.path, self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> SubmittedRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[tuple[str, str]]:
        """The remembered keys, oldest first."""
        with self._lock:
            return list(self._keys)

    def __contains__(self, key: object) -> bool:
        """Whether ``key``'s plan is queued, or given up for good: not to be sent again."""
        with self._lock:
            return key in self._keys or key in self._abandoned

    def given_up(self) -> list[GivenUp]:
        """The plans given up and not queued since, oldest first."""
        with self._lock:
            return list(self._given_up.values())

    def add(self, key: tuple[str, str]) -> None:
        """Remember that ``key``'s plan is queued (on disk when this returns)."""
        with self._change():
            self._sending.discard(key)
            if key in self._keys:
                return
            self._keep(key)
            self._append(json.dumps(list(key)), key)

    def sending(self, key: Key) -> None:
        """Record, on disk before this returns, that ``key``'s plan is about to be sent: a
        crash before its outcome leaves it in doubt, held as queued (see the module)."""
        with self._change():
            self._sending.add(key)
            self._append(json.dumps({"sending": list(key)}), key)

    def failed(self, key: Key) -> None:
        """Record, on disk before this returns, that the try :meth:`sending` announced did
        not queue ``key``'s plan (refused, or the server was not reached). It settles a lost
        reply before it, as the file's reader does: that try asked the server's queue and
        history first and found the plan in neither."""
        with self._change():
            if key in self._sending:
                self._sending.discard(key)
                self._lost.discard(key)
                self._lost_before.discard(key)
                self._append(json.dumps({"failed": list(key)}), key)

    def took(self) -> None:
        """Record, on disk before this returns, that the server took a plan now: the rate's
        slot, for the next daemon to keep (:meth:`slot_age`)."""
        with self._change():
            self._slot = self._wall()
            self._append(slot_line(self._slot), None)

    def slot_age(self) -> float | None:
        """Seconds since the server last took a plan, as remembered (None: never; 0 for a
        time ahead of the clock, which went back)."""
        with self._lock:
            return None if self._slot is None else max(0.0, self._wall() - self._slot)

    def lost_reply(self, key: Key) -> None:
        """Record, on disk before this returns, that the try :meth:`sending` announced got no
        reply: the server may have taken ``key``'s plan (see the module)."""
        with self._change():
            if key in self._sending:
                self._sending.discard(key)
                self._lost.add(key)
                self._append(json.dumps({"lost_reply": list(key)}), key)

    def lost_before(self, key: Key) -> bool:
        """Whether a previous daemon's last try of ``key``'s plan lost its reply (nothing
        settled it since)."""
        with self._lock:
            return key in self._lost_before

    def abandon(self, key: Key, reason: str, wait: bool = True) -> None:
        """Give ``key``'s plan up for good (``reason``), on disk before this returns (not
        ``wait``: recorded, for the next :meth:`write`): it is neither revived nor sent for a
        replay again."""
        with self._change(wait):
            self._forget(key)
            self._abandoned[key] = reason
            while len(self._abandoned) > self.limit:
                self._abandoned.popitem(last=False)
            self._append(abandoned_lines(key, reason), key)

    def give_up(self, key: Key, rec: dict[str, Any], rescan_only: bool, wait: bool = True) -> bool:
        """Remember that ``key``'s plan was given up, with ``rec`` (a JSON-able
        recommendation) to rebuild it, on disk before this returns (not ``wait``: recorded,
        for the next :meth:`write`); False when ``rec`` is not JSON (nothing remembered:
        the caller counts the plan lost). One given up again after :meth:`revive` keeps its
        line (its date, and the restart it was tried in, are recorded already)."""
        with self._change(wait):
            if key in self._keys or key in self._given_up or key in self._abandoned:
                return True
            entry = GivenUp(key, rec, rescan_only, self._wall())
            try:
                line = entry.line()
            except (TypeError, ValueError) as exc:  # not JSON: it cannot be rebuilt later
                logger.warning("cannot remember the given-up plan of %r: %s", key[0], exc)
                return False
            self._keep_given_up(entry)
            self._append(line, key)
            return True

    def replays(self, key: Key) -> int | None:
        """For how many replays of its run ``key``'s plan given up was tried again (None: it
        is not given up)."""
        with self._lock:
            entry = self._given_up.get(key)
            return None if entry is None else entry.replays

    def replayed(self, key: Key) -> None:
        """Record, on disk before this returns, that a replay of its run tries ``key``'s plan
        given up again."""
        with self._change():
            entry = self._given_up.get(key)
            if entry is not None:
                entry.replays += 1
                self._append(entry.line(), key)

    def retry_spent(self, key: Key, replays: int, max_age_s: float) -> str | None:
        """Whether the daemon running on may try ``key``'s plan again: None when it may
        (given up and not queued since, nor given up for good, not a previous daemon's still
        waiting for :meth:`revive`, tried again for fewer than ``replays`` replays of its run
        and given up, first, less than ``max_age_s`` ago); else why not: ``"replays"`` or
        ``"expired"`` (spent: to give up for good), ``""`` (not given up, or waiting)."""
        with self._lock:
            entry = self._given_up.get(key)
            if entry is None or key in self._revivable:
                return ""
            if entry.replays >= replays:
                return "replays"
            return "expired" if self._wall() - entry.at >= max_age_s else None

    def revive(self, rounds: int, max_age_s: float, most: int) -> list[GivenUp]:
        """The plans a previous daemon gave up, to try again once in this one: tried in fewer
        than ``rounds`` restarts so far and given up less than ``max_age_s`` ago, the newest
        ``most``, oldest first. Each is recorded as tried once more before it is returned, so
        a daemon that dies while trying does not try it for ever; the rest are forgotten
        (logged, and counted in :attr:`forgotten` by why). Only the first call returns any (a plan this daemon gave up waits for the
        next daemon)."""
        with self._change():
            now, out, forgot = self._wall(), list[GivenUp](), False
            for key in list(reversed(self._given_up)):
                if key not in self._revivable:
                    continue
                entry = self._given_up[key]
                if entry.rounds >= rounds:
                    why = f"tried again in {entry.rounds} restarts (restart_retries {rounds})"
                    self.forgotten["restarts"] = self.forgotten.get("restarts", 0) + 1
                elif now - entry.at > max_age_s:
                    why = f"given up {now - entry.at:.0f} s ago (more than {max_age_s:g} s)"
                    self.forgotten["expired"] = self.forgotten.get("expired", 0) + 1
                elif len(out) >= most:
                    why = f"the {most} newer ones are tried"
                    self.forgotten["crowded"] = self.forgotten.get("crowded", 0) + 1
                else:
                    out.append(entry)
                    continue
                logger.error(
                    "the queueserver plan %r of run %r is not tried again: %s", key[1], key[0], why
                )
                del self._given_up[key]
                forgot = True
            self._revivable.clear()
            for entry in out:
                entry.rounds += 1
            if forgot and self._journal is not None:  # the file anew, without the forgotten
                self._journal.anew = True
            else:
                for entry in reversed(out):
                    self._append(entry.line(), entry.key)
            return out[::-1]

    @contextmanager
    def _change(self, wait: bool = True) -> Iterator[None]:
        """Change what is remembered under the lock, then (``wait``) write the lines
        recorded (:meth:`write`), outside it: on disk before the change's call returns."""
        try:
            with self._lock:
                yield
        finally:
            if wait:
                self.write()

    def _append(self, line: str, key: Key | None) -> None:
        """Record one line for the end of the file (called under the lock; written by
        :meth:`write`)."""
        if self._journal is None:
            return
        if self._closed:
            logger.warning("not remembered (the memory is closed): %s", line)
            return
        self._journal.pending.append((line, key))

    def write(self) -> None:
        """Write the lines recorded so far, this thread's among them: on disk when this
        returns (one writer at a time, never under the lock, see
        :mod:`~.queueserver_journal`); :meth:`close` writes those left."""
        if self._journal is not None:
            with self._journal.io:
                self._drain(self._journal)

    def _drain(self, journal: Journal) -> None:
        """Append the lines recorded, or rewrite the file (:meth:`_rewrite`) when due
        (holding ``journal.io``). A failed write is logged, and the next rewrites the file
        with all that is kept."""
        with self._lock:
            batch, journal.pending = journal.pending, []
            if not batch and not journal.anew:
                return
            rewrite = journal.due(sum(line.count("\n") + 1 for line, _ in batch))
        try:
            if rewrite:
                self._rewrite(journal.path)
            elif batch:
                journal.append([line for line, _ in batch])
        except OSError as exc:
            with self._lock:
                journal.anew = True
            what = [
                "when a plan last went in" if key is None else f"the plan of {key[0]!r}"
                for _, key in batch
            ]
            logger.warning("cannot remember %s in %s: %s", ", ".join(what) or "it", self.path, exc)

    def _keep(self, key: tuple[str, str], trim: bool = True) -> None:
        """Hold ``key`` as queued, the newest; past ``limit`` the oldest is forgotten
        (``trim``; the reader trims once read: a plan given up for good has its key line
        before its ``abandoned`` line, which takes the key out again)."""
        self._keys[key] = None
        self._keys.move_to_end(key)
        while trim and len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        self._forget(key)

    def _forget(self, key: Key) -> None:
        """``key``'s plan is settled: no longer given up, nor in doubt for a lost reply."""
        self._given_up.pop(key, None)
        self._revivable.discard(key)
        self._lost.discard(key)
        self._lost_before.discard(key)

    def _keep_given_up(self, entry: GivenUp) -> None:
        self._given_up[entry.key] = entry
        self._given_up.move_to_end(entry.key)
        while len(self._given_up) > max(1, self.limit // 2):
            self._revivable.discard(self._given_up.popitem(last=False)[0])

    def _read(self, path: Path) -> None:
        """Hold what ``path`` holds (:func:`~.queueserver_recall.recall`), logging a file
        that cannot be read and the plans left in doubt."""
        got = recall(path, self.limit)
        if got.error is not None:
            logger.warning("cannot read the queued plans remembered in %s: %s", path, got.error)
            return
        self._keys, self._given_up, self._abandoned = got.keys, got.given_up, got.abandoned
        self._slot = got.slot
        if self._journal is not None:
            self._journal.lines, self._journal.torn = got.lines, got.torn
        if got.doubt:
            logger.warning(
                "%d queueserver plans were being sent when the last daemon stopped; whether "
                "the server took them is not known, and they are not queued again (check the "
                "queue): %s",
                len(got.doubt),
                ", ".join(f"{what} of run {raw_uid!r}" for raw_uid, what in got.doubt),
            )
        self._revivable = set(self._given_up)
        self._lost = got.lost
        self._lost_before = set(self._lost)

    def _rewrite(self, path: Path) -> None:
        """The file anew with what is remembered: the keys, the plans given up and this
        process's intents (atomically and durably: a crash keeps the old file or the new).
        Called holding the journal's ``io``; what is remembered is read under the lock, with
        the lines recorded so far, which it holds already."""
        journal = self._journal
        assert journal is not None and path == journal.path
        with self._lock:
            lines = [json.dumps(list(key)) for key in self._keys]
            lines += [entry.line() for entry in self._given_up.values()]
            # lost replies before intents: a retry in flight after a lost reply stays in doubt
            lines += [json.dumps({"lost_reply": list(key)}) for key in self._lost]
            lines += [json.dumps({"sending": list(key)}) for key in self._sending]
            lines += [abandoned_lines(*entry) for entry in self._abandoned.items()]
            lines += [] if self._slot is None else [slot_line(self._slot)]
            journal.pending.clear()
            journal.anew = False
        journal.replace(lines)
