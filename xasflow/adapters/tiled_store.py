"""Analysis runs stored in an embedded tiled catalog: no server to install, writes off the hot path.

Layout of ``directory`` (everything the store owns lives there)::

    catalog.db       tiled catalog (SQLite, WAL): one container per raw run, keyed by raw_uid
    tables.sqlite    tabular storage (SQLite, WAL) for the appendable event tables
                     (or tables.duckdb with ``table_backend="duckdb"``)
    .writer.lock     flock held by the one process writing this store

Each raw run becomes a container ``/<raw_uid>`` whose metadata is
``{"start": <analysis start doc>, "descriptor": {uid, name, data_keys}, "stop": None | <stop doc>}``
with one appendable table ``/<raw_uid>/<descriptor name, default "primary">`` holding one row per
analysed spectrum. Columns are ``seq_num`` (int64), ``time`` (float64), then the descriptor's
data keys in order: ``number`` -> float64, ``integer`` -> int64, ``string`` -> string,
``boolean`` -> bool, ``array`` (e.g. a motif probability vector) -> a JSON-encoded string column,
decoded back to a list by :func:`read_analysis`. All columns are nullable.

Write path. ``add_event`` only validates the keys and appends to an in-memory queue; one writer
thread groups rows per run and appends each batch (up to ``batch_size`` rows, or whatever a run
has collected after ``flush_interval`` seconds) in a single SQL transaction. Only after that
transaction commits are the rows' ``on_stored`` callbacks called: that is the store's
acknowledgement, and an acknowledged row survives SIGKILL of the process. Catalog changes (new
run containers and tables, stop metadata) go through tiled's own HTTP API served in-process
(``Context.from_app``); row batches are appended by calling tiled's ``SQLAdapter.append_partition``
on the same table directly, because the in-process HTTP round trip costs ~80 ms per batch
against ~4 ms for the direct append. Reads go through the tiled client.

Back-pressure. At most ``max_queue`` rows may be accepted but not yet committed; beyond that
``add_event`` returns ``False`` at once, counts the row in ``stats()["dropped"]`` and never
acknowledges it (the daemon can count it as not stored). Control calls are never dropped.

Restart. ``seq_num`` is the per-run idempotency key (:func:`~xasflow.adapters.tiled_batch.split_fresh`): reopening an existing raw_uid leaves the
container's metadata untouched, appends to the existing table, and a row whose ``seq_num`` is
already stored is acknowledged without being written again (counted in ``duplicates``).
A process killed while runs were open leaves them with ``stop: None``; the next process finds
them with :meth:`AnalysisStore.unfinished_runs` (what each holds) and records their end with
:meth:`AnalysisStore.finish_run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from xasflow.adapters.tiled_batch import acknowledge, append_pending, attach_run, with_retries
from xasflow.adapters.tiled_read import OPEN_STORES, OPEN_STORES_LOCK, read_analysis, unfinished_in
from xasflow.adapters.tiled_schema import (
    _KEY_NAME,
    CATALOG_FILE,
    DEFAULT_STREAM,
    LOCK_FILE,
    TABLE_FILES,
    StoreError,
    _ensure_catalog,
    _plain,
    _Run,
    _serve,
    schema_for_descriptor,
)

__all__ = ["AnalysisStore", "StoreError", "read_analysis"]

logger = logging.getLogger(__name__)

#: Tables made ahead of their run that are kept ready (older ones are forgotten, not deleted).
_MAX_PREPARED = 64


class AnalysisStore:
    """Writes analysis runs into an embedded tiled catalog from one background writer thread."""

    def __init__(
        self,
        directory: str | Path,
        batch_size: int = 256,
        flush_interval: float = 0.2,
        *,
        max_queue: int = 100_000,
        table_backend: Literal["sqlite", "duckdb"] = "sqlite",
    ) -> None:
        """Open (creating if needed) the store in ``directory`` and start the writer thread."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not flush_interval > 0:
            raise ValueError("flush_interval must be positive")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if table_backend not in TABLE_FILES:
            raise ValueError(f"table_backend must be one of {sorted(TABLE_FILES)}")
        self.directory = Path(directory).expanduser().resolve()
        self.batch_size = int(batch_size)
        self.flush_interval = float(flush_interval)
        self.max_queue = int(max_queue)
        self.table_backend = table_backend

        self._cond = threading.Condition()
        self._items: deque[tuple[Any, ...]] = deque()
        self._columns: dict[str, frozenset[str]] = {}  # open runs, as seen by callers
        self._backlog = 0  # rows accepted but not yet committed, failed or deduplicated
        self._closing = False
        self._closed = False
        self._counts = {"stored": 0, "batches": 0, "errors": 0, "dropped": 0, "duplicates": 0}
        self._runs: dict[str, _Run] = {}  # writer thread only
        self._prepared: dict[str, _Run] = {}  # tables made ahead of their run (writer only)
        self._reader: Any = None

        self.directory.mkdir(parents=True, exist_ok=True)
        with OPEN_STORES_LOCK:  # said before the flock, which would blame "another process"
            if self.directory in OPEN_STORES:
                raise StoreError(f"{self.directory} is already open in this process")
        self._lock_fd: int | None = self._acquire_lock()
        self._serving: contextlib.ExitStack | None = None
        try:
            with OPEN_STORES_LOCK:
                if self.directory in OPEN_STORES:
                    raise StoreError(f"{self.directory} is already open in this process")
                OPEN_STORES[self.directory] = self
            _ensure_catalog(self.directory / CATALOG_FILE)
            table_path = self.directory / TABLE_FILES[table_backend]
            if table_backend == "sqlite":
                # WAL: readers never block the writer; it persists in the file.
                with contextlib.closing(sqlite3.connect(table_path)) as con:
                    con.execute("PRAGMA journal_mode=WAL")
            self._serving = contextlib.ExitStack()
            self._root = self._serving.enter_context(
                _serve(self.directory, [f"{table_backend}:///{table_path}"])
            )
        except BaseException:
            self._release()
            raise
        self._writer = threading.Thread(
            target=self._writer_loop,
            name=f"xasflow-tiled-writer:{self.directory.name}",
            daemon=True,
        )
        self._writer.start()

    # ------------------------------------------------------------------ caller side
    def open_run(self, raw_uid: str, start_doc: dict, descriptor: dict) -> None:
        """Declare an analysis run (validated now, created or reopened by the writer thread)."""
        if not isinstance(raw_uid, str) or not _KEY_NAME.match(raw_uid):
            raise ValueError(f"raw_uid {raw_uid!r} is not usable as a tiled key")
        schema, arrays = schema_for_descriptor(descriptor)
        stream = descriptor.get("name") or DEFAULT_STREAM
        if not isinstance(stream, str) or not _KEY_NAME.match(stream):
            raise ValueError(f"descriptor name {stream!r} is not usable as a tiled key")
        run = _Run(raw_uid, stream, schema, arrays, _metadata(start_doc, descriptor, stream))
        with self._cond:
            self._check_open()
            self._columns[raw_uid] = frozenset(schema.names)
            self._items.append(("open", run))
            self._cond.notify()

    def prepare_run(self, raw_uid: str, descriptor: dict) -> None:
        """Create the run's container and table now, before its analysis starts (best effort).

        A beamline usually moves for a while between a raw run's start and its first spectrum;
        made then, the table is ready when the first result comes, which then waits only for
        its row's transaction. :meth:`open_run` later adopts it and writes the start document
        after the first rows. Nothing happens if the run is open or prepared already.
        """
        if not isinstance(raw_uid, str) or not _KEY_NAME.match(raw_uid):
            raise ValueError(f"raw_uid {raw_uid!r} is not usable as a tiled key")
        schema, arrays = schema_for_descriptor(descriptor)
        stream = descriptor.get("name") or DEFAULT_STREAM
        run = _Run(raw_uid, stream, schema, arrays, _metadata(None, descriptor, stream))
        with self._cond:
            self._check_open()
            self._items.append(("prepare", run))
            self._cond.notify()

    def add_event(
        self, raw_uid: str, row: dict[str, Any], on_stored: Callable[[], None] | None = None
    ) -> bool:
        """Queue one result row without blocking; ``on_stored`` runs once its batch has committed.

        Returns False (and never calls ``on_stored``) when ``max_queue`` rows are already waiting.
        """
        columns = self._columns.get(raw_uid)
        if columns is None:
            raise KeyError(f"analysis run {raw_uid!r} is not open")
        if not columns.issuperset(row):
            raise ValueError(f"row has keys not in the descriptor: {sorted(set(row) - columns)}")
        with self._cond:
            self._check_open()
            if self._backlog >= self.max_queue:
                self._counts["dropped"] += 1
                return False
            self._backlog += 1
            self._items.append(("row", raw_uid, dict(row), on_stored))
            if len(self._items) == 1 or len(self._items) >= self.batch_size:
                self._cond.notify()
        return True

    def close_run(self, raw_uid: str, stop_doc: dict) -> None:
        """Record the stop document in the run's metadata once its queued rows are written."""
        with self._cond:
            self._check_open()
            if self._columns.pop(raw_uid, None) is None:
                raise KeyError(f"analysis run {raw_uid!r} is not open")
            self._items.append(("close", raw_uid, _plain(dict(stop_doc))))
            self._cond.notify()

    def unfinished_runs(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Runs stored without a stop (their writer died) and not open here, with their rows.

        Each: ``raw_uid``, ``start``, ``descriptor`` (metadata as stored), ``rows`` (stored
        rows), ``spectra`` (rows with ``index >= 0``), ``n_ok`` / ``n_rejected`` (by
        ``status``, when the table has it) and ``max_seq``. Runs on the writer thread.
        """
        return self._call(lambda: unfinished_in(self._root, frozenset(self._runs)), timeout)

    def finish_run(self, raw_uid: str, stop_doc: dict) -> None:
        """Record the stop of a run stored earlier that is not open here (see unfinished_runs)."""
        with self._cond:
            self._check_open()
            if raw_uid in self._columns:
                raise ValueError(f"analysis run {raw_uid!r} is open here: use close_run")
            self._items.append(("finish", raw_uid, _plain(dict(stop_doc))))
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is committed; False on timeout."""
        done = threading.Event()
        with self._cond:
            if self._closed or self._closing:
                closing = True
            else:
                closing = False
                self._items.append(("flush", done))
                self._cond.notify()
        if closing:
            self._writer.join(timeout)
            return self.stats()["queued"] == 0
        return done.wait(timeout)

    def close(self) -> None:
        """Write everything queued, stop the writer thread and release the catalog."""
        with self._cond:
            if self._closed or self._closing:
                return
            self._closing = True
            self._items.append(("stop",))
            self._cond.notify()
        self._writer.join()
        with self._cond:
            self._closed = True
        self._release()

    def stats(self) -> dict[str, int]:
        """Counters: queued (accepted, not yet committed), stored, batches, errors, dropped, duplicates."""
        with self._cond:
            return {"queued": self._backlog, **self._counts}

    def client(self) -> Any:
        """A tiled client (root container) over this store's catalog, for readers and tests."""
        self._check_open()
        if self._reader is None:
            from tiled.client import from_context

            self._reader = from_context(self._root.context)
        return self._reader

    def __enter__(self) -> AnalysisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the writer thread (which owns the catalog client) and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}
        with self._cond:
            self._check_open()
            self._items.append(("call", fn, box, done))
            self._cond.notify()
        if not done.wait(timeout):
            raise StoreError(f"the store's writer did not answer within {timeout:.0f} s")
        if "error" in box:
            raise StoreError("reading the analysis store failed") from box["error"]
        return box["result"]

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise StoreError("the analysis store is closed")

    def _acquire_lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"{self.directory} is being written by another process "
                "(the lock is released when that process exits, even by SIGKILL)"
            ) from None
        return fd

    def _release(self) -> None:
        if self._serving is not None:
            self._serving.close()
            self._serving = None
        with OPEN_STORES_LOCK:
            if OPEN_STORES.get(self.directory) is self:
                del OPEN_STORES[self.directory]
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ writer thread
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
            with_retries(lambda: attach_run(self._root, run), f"open {run.raw_uid}")
        except Exception:
            run.failed = True
            self._count("errors")
            logger.exception("analysis store: cannot open run %s", run.raw_uid)

    def _prepare(self, run: _Run) -> None:
        if run.raw_uid in self._runs or run.raw_uid in self._prepared:
            return
        try:
            with_retries(lambda: attach_run(self._root, run), f"prepare {run.raw_uid}")
        except Exception:
            logger.exception("analysis store: cannot prepare run %s", run.raw_uid)
            return  # open_run will try again
        self._prepared[run.raw_uid] = run
        while len(self._prepared) > _MAX_PREPARED:  # runs that never started analysis
            self._prepared.pop(next(iter(self._prepared)))

    def _write_start(self, run: _Run) -> None:
        run.start_due = False
        meta = {"start": run.metadata["start"], "descriptor": run.metadata["descriptor"]}
        with_retries(lambda: run.node.update_metadata(meta), f"start {run.raw_uid}")

    def _close(self, raw_uid: str, stop_doc: dict) -> None:
        run = self._runs.pop(raw_uid, None)
        if run is None or run.failed:
            self._count("errors")
            logger.error("analysis store: close of run %s that did not open", raw_uid)
            return
        self._commit(run)
        if run.start_due:
            self._write_start(run)
        with_retries(lambda: run.node.update_metadata({"stop": stop_doc}), f"close {raw_uid}")

    def _finish(self, raw_uid: str, stop_doc: dict) -> None:
        if raw_uid in self._runs or raw_uid not in self._root:
            self._count("errors")
            logger.error("analysis store: finish of run %s that is open or absent", raw_uid)
            return
        node = self._root[raw_uid]
        with_retries(lambda: node.update_metadata({"stop": stop_doc}), f"finish {raw_uid}")

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
        with self._cond:
            self._backlog -= len(pending)
            self._counts["stored"] += stored
            self._counts["batches"] += 1 if stored else 0
            self._counts["duplicates"] += duplicates
            self._counts["errors"] += bad
        acknowledge(acks)

    def _finish_rows(self, n: int, errors: int) -> None:
        with self._cond:
            self._backlog -= n
            self._counts["errors"] += errors

    def _count(self, name: str) -> None:
        with self._cond:
            self._counts[name] += 1


def _metadata(start: dict | None, descriptor: dict, stream: str) -> dict[str, Any]:
    """A run container's metadata: its analysis start (None while prepared ahead), the
    descriptor's uid, stream and data keys, and no stop yet."""
    desc = {"uid": descriptor.get("uid"), "name": stream, "data_keys": descriptor["data_keys"]}
    return _plain(
        {"start": None if start is None else dict(start), "descriptor": desc, "stop": None}
    )
