"""The writer-thread half of :class:`~xasflow.adapters.tiled_store.AnalysisStore`.

One thread owns the tiled client: it takes the queued items in order (open, prepare, row,
replay (a row from the journal), close, finish, call, flush, release, stop), groups rows per
run and appends each batch in one transaction, then acknowledges the rows (and, with the
journal, forgets them there). Kept apart from the caller side so each half reads in one
sitting; :class:`WriterThread` is a mixin that only
:class:`~xasflow.adapters.tiled_store.AnalysisStore` uses. Closes and finishes, and what
becomes of each run's journal record then, are in :mod:`xasflow.adapters.writer_stops`.

When the catalog's child process dies, the queued work the journal holds is left to it, the
rest waits in memory; once :class:`~xasflow.adapters.catalog_supervisor.CatalogSupervisor`
has started a new child, the open runs are reattached, the journal is replayed (the start-up
code path; ``seq_num`` keeps it idempotent) and what waited follows
(:mod:`xasflow.adapters.writer_outage`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from xasflow.adapters.store_journal import Journal, JournalRun
from xasflow.adapters.tiled_batch import (
    acknowledge,
    append_pending,
    attach_run,
    clear_stop,
    set_metadata,
    with_retries,
)
from xasflow.adapters.tiled_schema import (
    _KEY_NAME,
    DEFAULT_STREAM,
    Ack,
    StoreError,
    _Run,
    _seq_key,
    run_metadata,
    schema_for_descriptor,
)
from xasflow.adapters.writer_outage import UNJOURNALLED_CLOSE, UNJOURNALLED_OPEN, CatalogOutage
from xasflow.adapters.writer_stops import RunStops, start_of

__all__ = [
    "STATS_WAIT_S",
    "UNJOURNALLED_CLOSE",
    "UNJOURNALLED_OPEN",
    "WriterThread",
    "journalled_run",
]

logger = logging.getLogger("xasflow.adapters.tiled_store")

#: Tables made ahead of their run that are kept ready (older ones are forgotten, not deleted).
_MAX_PREPARED = 64
#: How long a raw start's table waits to be made ahead: a run whose analysis opens meanwhile
#: (a fly scan's first spectrum comes within milliseconds) is made by its open, start
#: included, instead of made empty and given its start by a request more (a PATCH: ~1.5 ms
#: of the writer's CPU under the daemon's GIL and ~12-15 ms of the catalog process's, per run).
PREPARE_DELAY_S = 0.1
#: How long the store's ``stats()`` (read by /metrics) waits for its lock before reading its
#: counters without it (no journal write is made under it: one hung in the kernel held it).
STATS_WAIT_S = 0.05
#: Writes of a made-ahead table's start tried in the writer's turns before the close (each
#: with the store's retries, ~1.3 s): a start the catalog keeps refusing must not slow every
#: turn of the only writer.
_START_TRIES = 3


class WriterThread(CatalogOutage, RunStops):
    """The store's writer thread: every method here runs on it (``_replay`` before it starts);
    the catalog's outages in :class:`CatalogOutage`."""

    _cond: threading.Condition
    _room: threading.Condition  # on _cond's lock: callers waiting for the backlog to shrink
    _items: deque[tuple[Any, ...]]
    _runs: dict[str, _Run]
    _prepared: dict[str, _Run]
    _prepare_due: dict[str, tuple[float, _Run]]  # raw starts' tables to make at that time
    _counts: dict[str, int]
    _backlog: int
    _progress_at = 0.0  # monotonic: rows last left the backlog, or it filled from empty
    _journal_w: Journal | None  # the writer thread's connection to the journal
    _root: Any
    _catalog_up: Callable[[], bool]
    _opened: dict[str, int]  # the callers' count of opens of each raw_uid
    _superseded: dict[str, int]  # raw_uid -> its unjournalled open's count: record to drop
    _said_unreadable: set[str]  # what the journal cannot give back, logged and counted once
    _damaged: set[str]  # raw_uids whose journal record cannot be read back: kept as it is
    batch_size: int
    flush_interval: float

    def _catalog(self, action: Callable[[], Any], what: str, *, retries: bool = True) -> Any:
        """A catalog operation, with the store's retries (``retries``; without, one try);
        at once a StoreError when the catalog's process is gone (tiled's client would retry
        each request for 45 s, and what waits is in the journal, replayed at the next
        start)."""
        if not self._catalog_up():
            raise StoreError(f"{what}: the catalog's process is not running")
        return with_retries(action, what) if retries else action()

    def _writer_loop(self) -> None:
        stop = False
        while not stop:
            try:
                stop = self._writer_step()
            except Exception:  # keep the only writer alive whatever happens
                logger.exception("analysis store: writer step failed")
                self._count("errors")
        self._drop_held()
        self._stops_left()

    def _writer_step(self) -> bool:
        """Wait for work or a batch deadline, handle what is queued, commit what is due."""
        stop = False
        with self._cond:
            while not self._items:
                deadline = self._next_deadline()
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            items = list(self._items)
            self._items.clear()
        items = self._supervise(items)
        for item in items:
            try:
                stop = self._handle(item) or stop
            except Exception:
                logger.exception("analysis store: %s failed", item[0])
                self._count("errors")
        if not stop:
            self._prepare_due_now(time.monotonic())
        try:  # a failure here must not lose the stop: close() waits for this thread
            self._commit_due(force=stop)
            for run in list(self._runs.values()):
                # after the first rows (they were what results waited for); with the catalog up
                if run.start_due and run.start_tries < _START_TRIES and self._catalog_up():
                    self._write_start(run)
        except Exception:
            logger.exception("analysis store: commit or start failed")
            self._count("errors")
        if self._stops_due and not stop:  # refused stops, tried again when due (never raises)
            self._retry_stops(time.monotonic())
        return stop

    def _next_deadline(self) -> float | None:
        starts = [
            run.first_pending_at + self.flush_interval for run in self._runs.values() if run.pending
        ]
        if self._supervisor is not None:  # its next look at the catalog's process
            starts.append(self._supervisor.next_check(time.monotonic()))
        starts.extend(due.due for due in self._stops_due.values())  # refused stops' next try
        starts.extend(at for at, _ in self._prepare_due.values())  # tables to make ahead
        return min(starts) if starts else None

    def _handle(self, item: tuple[Any, ...]) -> bool:
        kind = item[0]
        if kind in ("row", "replay"):
            _, raw_uid, row, callback = item[:4]
            if kind == "replay":  # counted as it is taken: a long journal never fills the queue
                with self._cond:
                    self._rows_queued(1)
            run = self._runs.get(raw_uid)
            if run is None or run.failed:
                self._finish_rows(1, errors=1, lost=[callback])
                return False
            if not run.pending:
                run.first_pending_at = time.monotonic()
            run.pending.append((row, callback))
            if (kind == "replay" or item[4]) and (seq := _seq_key(row)) is not None:
                run.journalled.append(seq)  # forgotten there once committed; no other row is
            if len(run.pending) >= self.batch_size:
                self._commit(run)
        elif kind in ("open", UNJOURNALLED_OPEN):
            self._open(item[1])
            if kind == "open":  # its record in the journal is the live one (a damaged one
                self._superseded.pop(item[1].raw_uid, None)  # was set aside by the open)
                with self._cond:
                    self._damaged.discard(item[1].raw_uid)
            else:  # one left by an earlier copy is not, and must not be replayed
                self._superseded[item[1].raw_uid] = item[1].opened
                self._end_superseded(item[1].raw_uid)
        elif kind == "prepare":  # made ahead after PREPARE_DELAY_S, unless its run opens first
            run = item[1]
            if run.raw_uid not in self._prepare_due:
                self._prepare_due[run.raw_uid] = (time.monotonic() + PREPARE_DELAY_S, run)
        elif kind in ("close", UNJOURNALLED_CLOSE):
            self._close(item[1], item[2], None if kind == "close" else item[3])
        elif kind == "release":  # a replayed run left without a stop: the service ends it
            run = self._runs.pop(item[1], None)
            if run is not None and not run.failed:
                self._commit(run)
                if run.start_due:
                    self._write_start(run)
        elif kind == "finish":
            self._finish(item[1], item[2], journalled=item[3], opens=item[4])
        elif kind == "call":
            _, fn, box, done = item
            try:
                box["result"] = fn()
            except Exception as exc:
                box["error"] = exc
            finally:
                done.set()
        elif kind == "flush":  # what came before it is committed, or given up: counted
            self._prepare_due_now(float("inf"))
            self._commit_due(force=True)
            item[1].settle(self._counts["write_lost"])
        elif kind == "stop":
            return True
        return False

    def _open(self, run: _Run) -> None:
        self._prepare_due.pop(run.raw_uid, None)  # made by this open, its start included
        self._stops_due.pop(run.raw_uid, None)  # a refused stop of an earlier copy: its own now
        previous = self._runs.get(run.raw_uid)
        if previous is not None and not previous.failed:
            self._commit(previous)
            if previous.schema.equals(run.schema) and previous.stream == run.stream:
                return  # already open here: nothing to do
        ready = self._prepared.pop(run.raw_uid, None)
        if ready is not None and ready.schema.equals(run.schema) and ready.stream == run.stream:
            run.adapter, run.node, run.stored_seq = ready.adapter, ready.node, ready.stored_seq
            run.start_due = True
            self._runs[run.raw_uid] = run
            try:
                self._catalog(lambda: clear_stop(run.node), f"reopen {run.raw_uid}")
            except Exception:  # its rows still go in; the stop is rewritten at its close
                logger.exception("analysis store: cannot clear the old stop of %s", run.raw_uid)
            return
        self._runs[run.raw_uid] = run
        try:
            self._catalog(lambda: attach_run(self._root, run, reopen=True), f"open {run.raw_uid}")
        except Exception:
            run.failed = True
            self._count("errors")
            logger.exception("analysis store: cannot open run %s", run.raw_uid)

    def _prepare_due_now(self, now: float) -> None:
        """Make ahead the raw starts' tables whose wait is over (in the order they came)."""
        for raw_uid, (at, run) in list(self._prepare_due.items()):
            if at <= now:
                del self._prepare_due[raw_uid]
                self._prepare(run)

    def _prepare(self, run: _Run) -> None:
        if run.raw_uid in self._runs or run.raw_uid in self._prepared:
            return
        try:
            self._catalog(lambda: attach_run(self._root, run), f"prepare {run.raw_uid}")
        except Exception:
            logger.exception("analysis store: cannot prepare run %s", run.raw_uid)
            return  # open_run will try again
        self._prepared[run.raw_uid] = run
        while len(self._prepared) > _MAX_PREPARED:  # runs that never started analysis
            self._prepared.pop(next(iter(self._prepared)))

    def _write_start(self, run: _Run) -> None:
        """The start and descriptor of a table made ahead; due until written (a failure is
        tried again at the next turns, :data:`_START_TRIES` in all, and the close writes it
        with the stop)."""
        run.start_tries += 1
        self._catalog(lambda: set_metadata(run.node, start_of(run)), f"start {run.raw_uid}")
        run.start_due = False

    def _commit_due(self, force: bool = False) -> None:
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.pending and (force or now - run.first_pending_at >= self.flush_interval):
                self._commit(run)

    def _commit(self, run: _Run) -> None:
        """Append the run's pending rows in one transaction, then acknowledge them."""
        pending, run.pending = run.pending, []
        journalled, run.journalled = run.journalled, []
        if not pending:
            return
        try:
            stored, duplicates, acks, dropped = append_pending(run, pending)
        except Exception:
            logger.exception("analysis store: lost a batch of %d rows", len(pending))
            self._finish_rows(len(pending), errors=1, lost=[ack for _, ack in pending])
            return
        # the rows the journal holds are in the catalog now (or never to fit it); the others
        # (an unjournalled run's) are not looked for there: with the journal's lock held
        # elsewhere each delete waited out the busy timeout (5 s), holding every other run
        if self._journal_w is not None and journalled:
            try:
                self._journal_w.moved(run.raw_uid, journalled)
            except Exception:  # left in the journal: replayed at the next start, as duplicates
                logger.exception(
                    "analysis store: cannot forget %d rows in the journal", len(journalled)
                )
                self._count("errors")
        with self._cond:
            self._rows_left(len(pending))
            self._counts["stored"] += stored
            self._counts["batches"] += 1 if stored else 0
            self._counts["duplicates"] += duplicates
            self._counts["errors"] += len(dropped)
        acknowledge(acks)
        acknowledge(dropped, lost=True)

    def _replay(self, journal: Journal, still_open: frozenset[str] = frozenset()) -> list[Any]:
        """The items that put what the journal holds into the catalog (at start-up, and after
        a restart of its process): each run made or reopened, its rows appended (duplicates
        skipped by seq_num), its stop recorded if it had one. A run in ``still_open`` (open
        on the caller side when the queue was taken) stays open: its close, if any came
        since, is queued after these. What cannot be read back is said and counted once."""
        items: list[Any] = []
        unreadable: list[str] = []
        damaged: set[str] = set()
        for jr in journal.pending(unreadable, damaged):  # checked there (the journal's check,
            items.append(("open", journalled_run(jr)))  # this): a record it fails is left out
            items.extend(("replay", jr.raw_uid, row, None) for row in jr.rows)
            with self._cond:
                self._counts["replayed"] += len(jr.rows)
            if jr.raw_uid in still_open:
                state = "open"
            elif jr.stop is not None:
                items.append(("close", jr.raw_uid, jr.stop))
                state = "stopped"
            else:
                items.append(("release", jr.raw_uid))
                state = "no stop"
            logger.warning(
                "analysis store: replaying run %s from the journal (%d rows, %s)",
                jr.raw_uid,
                len(jr.rows),
                state,
            )
        # not replayed, kept there; counted, so the errors alert fires: once per store, not
        # at each replay into a restarted catalog process (nothing new happened then)
        with self._cond:  # left as they are (writer_stops): finish_run reads it too
            self._damaged.update(damaged)
        new = [said for said in dict.fromkeys(unreadable) if said not in self._said_unreadable]
        if new:
            self._said_unreadable.update(new)
            logger.error(
                "analysis store: the journal %s holds what cannot be read back, left there "
                "for a person and not replayed: %s",
                journal.path,
                "; ".join(new),
            )
            self._count("errors", len(new))
        return items

    def _finish_rows(self, n: int, errors: int, lost: list[Ack | None] | None = None) -> None:
        """``n`` rows leave the backlog without a commit; ``lost``: their acknowledgements,
        told that the rows are given up (rows the journal holds have none: they come back).
        Every caller gives rows up because the catalog would not take them (a failed append
        or table, a catalog down at the end), so those told lost count in ``write_lost``."""
        with self._cond:
            self._rows_left(n)
            self._counts["errors"] += errors
            self._counts["write_lost"] += sum(ack is not None for ack in lost or ())
        if lost:
            acknowledge(lost, lost=True)

    def _rows_queued(self, n: int) -> None:
        """``n`` rows join the backlog (lock held); the stall clock starts if none waited."""
        if n and self._backlog == 0:
            self._progress_at = time.monotonic()
        self._backlog += n

    def _rows_left(self, n: int) -> None:
        """``n`` rows leave the backlog, written or given up (lock held): the store moves."""
        self._backlog -= n
        self._progress_at = time.monotonic()
        self._room.notify_all()

    def _stalled_s(self) -> float:
        """Seconds the backlog has waited since rows last left it, or since it filled from
        empty (0 while it is empty): a catalog write or a journal fsync hung on this thread
        shows here, while the queue's size alone looks like a store keeping up."""
        if self._backlog <= 0:
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    def _count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._counts[name] += n


def journalled_run(jr: JournalRun) -> _Run:
    """The run a journal record replays, checked as :meth:`AnalysisStore.open_run` checks
    its documents (a record is JSON, not always documents: a hand-edited or foreign file);
    ValueError (or TypeError...) saying what is wrong with it."""
    for name, doc in (("start", jr.start), ("descriptor", jr.descriptor), ("stop", jr.stop)):
        if not isinstance(doc, dict) and (doc is not None or name != "stop"):
            raise TypeError(f"{name} is a {type(doc).__name__}, not a document")
    if not _KEY_NAME.match(jr.raw_uid):
        raise ValueError(f"raw_uid {jr.raw_uid!r} is not usable as a tiled key")
    schema, arrays = schema_for_descriptor(jr.descriptor)
    stream = jr.descriptor.get("name") or DEFAULT_STREAM
    if not isinstance(stream, str) or not _KEY_NAME.match(stream):
        raise ValueError(f"descriptor name {stream!r} is not usable as a tiled key")
    return _Run(jr.raw_uid, stream, schema, arrays, run_metadata(jr.start, jr.descriptor, stream))
