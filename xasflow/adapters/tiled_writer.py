"""The writer-thread half of :class:`~xasflow.adapters.tiled_store.AnalysisStore`.

One thread owns the tiled client: it takes the queued items in order (open, prepare, row,
close, finish, call, flush, release, stop), groups rows per run and appends each batch in one
transaction, then acknowledges the rows (and, with the journal, forgets them there). Kept apart
from the caller side so each half reads in one sitting; :class:`WriterThread` is a mixin that
only :class:`~xasflow.adapters.tiled_store.AnalysisStore` uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from xasflow.adapters.store_journal import Journal
from xasflow.adapters.tiled_batch import acknowledge, append_pending, attach_run, with_retries
from xasflow.adapters.tiled_schema import (
    DEFAULT_STREAM,
    StoreError,
    _Run,
    _seq_key,
    run_metadata,
    schema_for_descriptor,
)

__all__ = ["WriterThread"]

logger = logging.getLogger("xasflow.adapters.tiled_store")

#: Tables made ahead of their run that are kept ready (older ones are forgotten, not deleted).
_MAX_PREPARED = 64


class WriterThread:
    """The store's writer thread: every method here runs on it (``_replay`` before it starts)."""

    _cond: threading.Condition
    _items: deque[tuple[Any, ...]]
    _runs: dict[str, _Run]
    _prepared: dict[str, _Run]
    _counts: dict[str, int]
    _backlog: int
    _journal_w: Journal | None  # the writer thread's connection to the journal
    _root: Any
    _catalog_up: Callable[[], bool]
    batch_size: int
    flush_interval: float

    def _catalog(self, action: Callable[[], Any], what: str) -> Any:
        """A catalog operation, with the store's retries; at once a StoreError when the
        catalog's process is gone (tiled's client would retry each request for 45 s, and
        what waits is in the journal, replayed at the next start)."""
        if not self._catalog_up():
            raise StoreError(f"{what}: the catalog's process is not running")
        return with_retries(action, what)

    def _writer_loop(self) -> None:
        stop = False
        while not stop:
            try:
                stop = self._writer_step()
            except Exception:  # keep the only writer alive whatever happens
                logger.exception("analysis store: writer step failed")
                self._count("errors")

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
        for item in items:
            try:
                stop = self._handle(item) or stop
            except Exception:
                logger.exception("analysis store: %s failed", item[0])
                self._count("errors")
        self._commit_due(force=stop)
        for run in list(self._runs.values()):
            if run.start_due:  # after the first rows: they were what results waited for
                self._write_start(run)
        return stop

    def _next_deadline(self) -> float | None:
        starts = [run.first_pending_at for run in self._runs.values() if run.pending]
        return min(starts) + self.flush_interval if starts else None

    def _handle(self, item: tuple[Any, ...]) -> bool:
        kind = item[0]
        if kind == "row":
            _, raw_uid, row, callback = item
            run = self._runs.get(raw_uid)
            if run is None or run.failed:
                self._finish_rows(1, errors=1)
                return False
            if not run.pending:
                run.first_pending_at = time.monotonic()
            run.pending.append((row, callback))
            if len(run.pending) >= self.batch_size:
                self._commit(run)
        elif kind == "open":
            self._open(item[1])
        elif kind == "prepare":
            self._prepare(item[1])
        elif kind == "close":
            self._close(item[1], item[2])
        elif kind == "release":  # a replayed run left without a stop: the service ends it
            run = self._runs.pop(item[1], None)
            if run is not None and not run.failed:
                self._commit(run)
        elif kind == "finish":
            self._finish(item[1], item[2])
        elif kind == "call":
            _, fn, box, done = item
            try:
                box["result"] = fn()
            except Exception as exc:
                box["error"] = exc
            finally:
                done.set()
        elif kind == "flush":
            self._commit_due(force=True)
            item[1].set()
        elif kind == "stop":
            return True
        return False

    def _open(self, run: _Run) -> None:
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
            return
        self._runs[run.raw_uid] = run
        try:
            self._catalog(lambda: attach_run(self._root, run), f"open {run.raw_uid}")
        except Exception:
            run.failed = True
            self._count("errors")
            logger.exception("analysis store: cannot open run %s", run.raw_uid)

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
        run.start_due = False
        meta = {"start": run.metadata["start"], "descriptor": run.metadata["descriptor"]}
        self._catalog(lambda: run.node.update_metadata(meta), f"start {run.raw_uid}")

    def _close(self, raw_uid: str, stop_doc: dict) -> None:
        run = self._runs.pop(raw_uid, None)
        if run is None or run.failed:
            self._count("errors")
            logger.error("analysis store: close of run %s that did not open", raw_uid)
            return
        self._commit(run)
        if run.start_due:
            self._write_start(run)
        self._catalog(lambda: run.node.update_metadata({"stop": stop_doc}), f"close {raw_uid}")
        if self._journal_w is not None:
            self._journal_w.forget_run(raw_uid)

    def _finish(self, raw_uid: str, stop_doc: dict) -> None:
        if raw_uid in self._runs or raw_uid not in self._root:
            self._count("errors")
            logger.error("analysis store: finish of run %s that is open or absent", raw_uid)
            return
        node = self._root[raw_uid]
        self._catalog(lambda: node.update_metadata({"stop": stop_doc}), f"finish {raw_uid}")
        if self._journal_w is not None:
            self._journal_w.forget_run(raw_uid)

    def _commit_due(self, force: bool = False) -> None:
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.pending and (force or now - run.first_pending_at >= self.flush_interval):
                self._commit(run)

    def _commit(self, run: _Run) -> None:
        """Append the run's pending rows in one transaction, then acknowledge them."""
        pending, run.pending = run.pending, []
        if not pending:
            return
        try:
            stored, bad, duplicates, acks = append_pending(run, pending)
        except Exception:
            logger.exception("analysis store: lost a batch of %d rows", len(pending))
            self._finish_rows(len(pending), errors=1)
            return
        if self._journal_w is not None:  # in the catalog now (or never to fit it)
            self._journal_w.moved(
                run.raw_uid, [s for row, _ in pending if (s := _seq_key(row)) is not None]
            )
        with self._cond:
            self._backlog -= len(pending)
            self._counts["stored"] += stored
            self._counts["batches"] += 1 if stored else 0
            self._counts["duplicates"] += duplicates
            self._counts["errors"] += bad
        acknowledge(acks)

    def _replay(self, journal: Journal) -> None:
        """Queue what the journal holds (before the writer starts): each run made or reopened,
        its rows appended (duplicates skipped by seq_num), its stop recorded if it had one."""
        for jr in journal.pending():
            schema, arrays = schema_for_descriptor(jr.descriptor)
            stream = jr.descriptor.get("name") or DEFAULT_STREAM
            meta = run_metadata(jr.start, jr.descriptor, stream)
            self._items.append(("open", _Run(jr.raw_uid, stream, schema, arrays, meta)))
            self._items.extend(("row", jr.raw_uid, row, None) for row in jr.rows)
            self._backlog += len(jr.rows)
            self._counts["replayed"] += len(jr.rows)
            end = ("close", jr.raw_uid, jr.stop) if jr.stop is not None else ("release", jr.raw_uid)
            self._items.append(end)
            logger.warning(
                "analysis store: replaying run %s from the journal (%d rows, %s)",
                jr.raw_uid,
                len(jr.rows),
                "stopped" if jr.stop is not None else "no stop",
            )

    def _finish_rows(self, n: int, errors: int) -> None:
        with self._cond:
            self._backlog -= n
            self._counts["errors"] += errors

    def _count(self, name: str) -> None:
        with self._cond:
            self._counts[name] += 1
