"""Analysis runs stored in an embedded tiled catalog: no server to install, writes off the hot path.

Layout of ``directory`` (everything the store owns lives there)::

    catalog.db       tiled catalog (SQLite, WAL): one container per raw run, keyed by raw_uid
    tables.sqlite    tabular storage (SQLite, WAL) for the appendable event tables
                     (or tables.duckdb with ``table_backend="duckdb"``)
    journal.sqlite   write-ahead journal (``journal=True``): rows not yet in the catalog
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
acknowledgement, and an acknowledged row survives SIGKILL of the process. With ``journal=True``
the rows of each :meth:`AnalysisStore.add_events` call are first written to the journal in one
transaction and acknowledged then (:mod:`xasflow.adapters.store_journal`), so no result waits
for a catalog operation; the writer thread (:mod:`xasflow.adapters.tiled_writer`) moves them. Catalog changes (new
run containers and tables, stop metadata) go through tiled's own HTTP API served in-process
(``Context.from_app``); row batches are appended by calling tiled's ``SQLAdapter.append_partition``
on the same table directly, because the in-process HTTP round trip costs ~80 ms per batch
against ~4 ms for the direct append. Reads go through the tiled client.

Back-pressure. At most ``max_queue`` rows may be accepted but not yet committed; beyond that
``add_event`` returns ``False``, counts the row in ``stats()["dropped"]`` and never
acknowledges it (the daemon can count it as not stored). With ``full_wait_s`` it first waits
that long for the writer to make room (``full_waits``, ``full_wait_ms``; a page larger
than ``max_queue`` waits for an empty queue and is then taken whole): a caller whose input
can hold back (a Kafka consumer stops polling) then slows down instead of losing rows. Once a
row was refused anyway, nobody waits any more (what follows a refused row is redelivered
after a restart anyway, and a long block would only stall the input).
Control calls are never dropped.

Restart. ``seq_num`` is the per-run idempotency key (:func:`~xasflow.adapters.tiled_batch.split_fresh`): reopening a raw_uid appends to its table, a
row whose ``seq_num`` is stored is acknowledged, not written again (``duplicates``), and the
start becomes the reopening copy's (a replay's, so that it and its stop are one run's).
A process killed while runs were open leaves them with ``stop: None``; the next process finds
them with :meth:`AnalysisStore.unfinished_runs` (what each holds) and records their end with
:meth:`AnalysisStore.finish_run`. A catalog child process (``catalog_process=True``) that dies
is restarted by the writer thread, which then replays the journal into it the same way
(:mod:`xasflow.adapters.catalog_supervisor`); the callers' rows go on into the journal meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from xasflow.adapters.catalog_supervisor import CatalogSupervisor
from xasflow.adapters.file_lock import release
from xasflow.adapters.journal_fallback import JournalFallback
from xasflow.adapters.store_closing import StoreClosing
from xasflow.adapters.store_journal import CALLER_CHECKPOINT_PAGES, JOURNAL_FILE, Journal
from xasflow.adapters.store_moved import follow_move
from xasflow.adapters.store_room import Backpressure
from xasflow.adapters.tiled_batch import acknowledge
from xasflow.adapters.tiled_read import OPEN_STORES, OPEN_STORES_LOCK, read_analysis
from xasflow.adapters.tiled_schema import (
    _KEY_NAME,
    CATALOG_FILE,
    DEFAULT_STREAM,
    TABLE_FILES,
    Ack,
    StoreError,
    _ensure_catalog,
    _plain,
    _Run,
    _serve,
    column_types,
    hold_writer_lock,
    run_metadata,
    schema_for_descriptor,
)
from xasflow.adapters.tiled_writer import (
    STATS_WAIT_S,
    UNJOURNALLED_CLOSE,
    UNJOURNALLED_OPEN,
    WriterThread,
    journalled_run,
)
from xasflow.adapters.writer_stops import StopDue

__all__ = ["AnalysisStore", "StoreError", "read_analysis"]

logger = logging.getLogger(__name__)


class AnalysisStore(WriterThread, JournalFallback, Backpressure, StoreClosing):
    """Writes analysis runs into an embedded tiled catalog from one background writer thread."""

    def __init__(
        self,
        directory: str | Path,
        batch_size: int = 256,
        flush_interval: float = 0.2,
        *,
        max_queue: int = 100_000,
        table_backend: Literal["sqlite", "duckdb"] = "sqlite",
        journal: bool = False,
        catalog_process: bool = False,
        full_wait_s: float = 0.0,
    ) -> None:
        """Open (creating if needed) the store in ``directory`` and start the writer thread.

        ``journal``: acknowledge rows once in the write-ahead journal
        (:mod:`xasflow.adapters.store_journal`), not once in the catalog; what a killed
        process left there is replayed into the catalog now. ``catalog_process``: serve the
        catalog from a child process (:mod:`xasflow.adapters.tiled_server`), so its HTTP work
        runs off this process's GIL; one that dies is restarted and the journal replayed
        into it (:mod:`xasflow.adapters.catalog_supervisor`). ``full_wait_s``: how long
        :meth:`add_events` waits for room when ``max_queue`` rows are waiting (0: refuse
        at once).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not flush_interval > 0:
            raise ValueError("flush_interval must be positive")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not (0 <= full_wait_s < threading.TIMEOUT_MAX):  # NaN and inf too: always an answer
            raise ValueError(f"full_wait_s must be finite and >= 0, got {full_wait_s}")
        if table_backend not in TABLE_FILES:
            raise ValueError(f"table_backend must be one of {sorted(TABLE_FILES)}")
        self.directory = Path(directory).expanduser().resolve()
        self.batch_size = int(batch_size)
        self.flush_interval = float(flush_interval)
        self.max_queue = int(max_queue)
        self.full_wait_s = float(full_wait_s)
        self.table_backend = table_backend

        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # the writer waits on it for work
        self._room = threading.Condition(lock)  # callers wait on it for room in the backlog
        self._full_wait = 0.0  # seconds callers waited for room
        self._items: deque[tuple[Any, ...]] = deque()
        self._columns: dict[str, frozenset[str]] = {}  # open runs, as seen by callers
        self._types: dict[str, dict[str, tuple[type, ...]]] = {}  # their columns' value types
        self._unjournalled: set[str] = set()  # open runs whose start the journal lacks
        self._superseding: set[str] = set()  # runs last opened unjournalled (journal_fallback)
        self._opened: dict[str, int] = {}  # opens of each raw_uid so far (callers)
        self._refused_opens: dict[str, set[int]] = {}  # refused while a later open ran
        self._superseded: dict[str, int] = {}  # their journal records to drop (writer only)
        self._said_unreadable: set[str] = set()  # journal damage logged, counted (writer)
        self._damaged: set[str] = set()  # runs whose journal record is damaged: kept as is
        self._stops_due: dict[str, StopDue] = {}  # stops the catalog refused (writer only)
        self._backlog = 0  # rows accepted but not yet committed, failed or deduplicated
        self._closing = False
        self._closed = False
        self._opening = 0  # open_run calls writing the journal
        #: add_events, close_run and finish_run calls between their two lock sections: what
        #: they accept is queued before close()'s stop (which waits for them), never after it
        self._calls = 0
        self._counts = {
            **dict.fromkeys(("stored", "batches", "errors", "dropped", "duplicates"), 0),
            **dict.fromkeys(("journalled", "replayed", "full_waits", "write_lost"), 0),
        }
        self._runs: dict[str, _Run] = {}  # writer thread only
        self._prepared: dict[str, _Run] = {}  # tables made ahead of their run (writer only)
        self._prepare_due: dict[str, tuple[float, _Run]] = {}  # to make ahead then (writer)
        self._reader: tuple[Any, Any] | None = None  # (the writer's root, a client over it)
        self._journal: Journal | None = None
        self._journal_w: Journal | None = None
        self._catalog_up: Callable[[], bool] = lambda: True  # in-process: up while open
        self._supervisor: CatalogSupervisor | None = None
        self._held: list[tuple[Any, ...]] = []

        self.directory.mkdir(parents=True, exist_ok=True)
        with OPEN_STORES_LOCK:  # said before the flock, which would blame "another process"
            if self.directory in OPEN_STORES:
                raise StoreError(f"{self.directory} is already open in this process")
        self._lock_fd: int | None = hold_writer_lock(self.directory)
        self._serving: contextlib.ExitStack | None = None
        try:
            with OPEN_STORES_LOCK:
                if self.directory in OPEN_STORES:
                    raise StoreError(f"{self.directory} is already open in this process")
                OPEN_STORES[self.directory] = self
            follow_move(self.directory, writing=True)  # moved or copied: name its tables
            if not catalog_process:  # the child makes it otherwise, while this one goes on
                _ensure_catalog(self.directory / CATALOG_FILE)
            table_path = self.directory / TABLE_FILES[table_backend]
            if table_backend == "sqlite":
                # WAL: readers never block the writer; it persists in the file.
                with contextlib.closing(sqlite3.connect(table_path)) as con:
                    con.execute("PRAGMA journal_mode=WAL")
            self._serving = contextlib.ExitStack()
            uris = [f"{table_backend}:///{table_path}"]
            if catalog_process:
                self._supervisor = self._catalog_up = CatalogSupervisor(self.directory, uris)
                self._serving.callback(self._supervisor.close)
                self._root = self._supervisor.start(time.monotonic())
            else:
                self._root = self._serving.enter_context(_serve(self.directory, uris))
            if journal:  # one connection for the callers, one for the writer thread
                path = self.directory / JOURNAL_FILE  # a record the replay cannot open: damaged
                self._journal = Journal(path, CALLER_CHECKPOINT_PAGES, journalled_run)
                self._journal_w = Journal(path, check=journalled_run)
                self._items.extend(self._replay(self._journal))
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
        run = _Run(raw_uid, stream, schema, arrays, run_metadata(start_doc, descriptor, stream))
        with self._cond:  # open for the callers first: a catalog restart meanwhile keeps it so
            self._check_open()
            self._columns[raw_uid] = frozenset(schema.names)
            self._types[raw_uid] = column_types(schema, arrays)
            run.opened = self._opened[raw_uid] = self._opened.get(raw_uid, 0) + 1
            self._opening += 1  # close() waits for it: a refused start is withdrawn first
        try:  # its documents before its rows, for a replay (one the journal cannot record:
            # unjournalled), outside the lock: a hung journal write must not stop the writer
            journalled, prior = self._journal_start(raw_uid, start_doc, descriptor)
            with self._cond:
                refused = self._closing or self._closed
                if refused:  # before the withdrawal: the writer may forget the record now
                    self._unopen(run)
                else:
                    self._items.append(("open" if journalled else UNJOURNALLED_OPEN, run))
                    self._cond.notify()
            if refused:
                self._journal_withdraw(raw_uid, prior)
                raise StoreError("the analysis store is closed")
        finally:
            with self._cond:
                self._opening -= 1
                self._cond.notify_all()

    def prepare_run(self, raw_uid: str, descriptor: dict) -> None:
        """Create the run's container and table ahead of its analysis (best effort), after
        :data:`~xasflow.adapters.tiled_writer.PREPARE_DELAY_S` unless the run opens first.

        A beamline usually moves for a while between a raw run's start and its first spectrum;
        made then, the table is ready when the first result comes, which then waits only for
        its row's transaction. :meth:`open_run` later adopts it and writes the start document
        after the first rows; a run that opens within the delay (a fly scan) is made by its
        open, start included, one catalog request fewer. Nothing happens if the run is open or
        prepared already.
        """
        if not isinstance(raw_uid, str) or not _KEY_NAME.match(raw_uid):
            raise ValueError(f"raw_uid {raw_uid!r} is not usable as a tiled key")
        schema, arrays = schema_for_descriptor(descriptor)
        stream = descriptor.get("name") or DEFAULT_STREAM
        run = _Run(raw_uid, stream, schema, arrays, run_metadata(None, descriptor, stream))
        with self._cond:
            self._check_open()
            self._items.append(("prepare", run))
            self._cond.notify()

    def add_event(
        self,
        raw_uid: str,
        row: dict[str, Any],
        on_stored: Callable[[], None] | None = None,
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> bool:
        """Queue one result row; ``on_stored`` runs once its batch has committed (with the
        journal: once the row is journalled, before this returns), or ``on_lost`` when the
        store gives the accepted row up (the failure counted in ``errors``): never both.

        Returns False (and calls neither) when ``max_queue`` rows are waiting: at once, or
        after waiting up to ``full_wait_s`` for room (see the module docstring).
        """
        return self.add_events(raw_uid, [row], on_stored, on_lost=on_lost)[0]

    def add_events(
        self,
        raw_uid: str,
        rows: list[dict[str, Any]],
        on_stored: Callable[[], None] | None = None,
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> list[bool]:
        """:meth:`add_event` for several rows of one run (an event page): one journal
        transaction for all of them; ``on_stored`` or ``on_lost`` runs once per row accepted."""
        columns = self._columns.get(raw_uid)
        if columns is None:
            raise KeyError(f"analysis run {raw_uid!r} is not open")
        for row in rows:
            if not columns.issuperset(row):
                extra = sorted(set(row) - columns)
                raise ValueError(f"row has keys not in the descriptor: {extra}")
        with self._cond:
            self._check_open()
            if (
                self._may_wait()
                and self._backlog > 0
                and self._backlog + len(rows) > self.max_queue
            ):
                self._wait_for_room(len(rows))
            if self._may_wait() and self._backlog == 0:
                room = len(rows)  # a page larger than max_queue, taken whole when it may wait
            else:
                room = max(0, min(len(rows), self.max_queue - self._backlog))
            self._counts["dropped"] += len(rows) - room
            self._rows_queued(room)  # reserved: the journal is written outside the lock
            self._calls += 1
        try:  # acknowledged early: the rows now in the journal (not those that will not fit)
            journalled = self._journalled(raw_uid, rows[:room])
            ack = Ack(on_stored, on_lost)  # every unjournalled row's: its loss is counted
            with self._cond:
                self._counts["journalled"] += sum(journalled)
                for row, early in zip(rows[:room], journalled, strict=True):
                    self._items.append(("row", raw_uid, dict(row), None if early else ack, early))
                if room and (len(self._items) == room or len(self._items) >= self.batch_size):
                    self._cond.notify()
        finally:
            self._call_done()
        if on_stored is not None:  # a journalled row is stored for good: it cannot be lost now
            acknowledge([ack] * sum(journalled))
        return [True] * room + [False] * (len(rows) - room)

    def close_run(self, raw_uid: str, stop_doc: dict) -> None:
        """Record the stop document in the run's metadata once its queued rows are written."""
        stop = _plain(dict(stop_doc))
        with self._cond:
            self._check_open()
            if raw_uid not in self._columns:
                raise KeyError(f"analysis run {raw_uid!r} is not open")
            self._calls += 1
        try:  # outside the lock, the run still open for the callers (see open_run); a stop the
            # journal cannot record: the catalog records it, the writer holds it
            journalled = self._journal is None or self._journal_stop(raw_uid, stop)
            with self._cond:  # close() waits for this call: its stop comes after this close
                self._types.pop(raw_uid, None)
                if self._columns.pop(raw_uid, None) is None:
                    raise KeyError(f"analysis run {raw_uid!r} is not open")
                # unjournalled: with the callers' count of its opens (a later one keeps its record)
                opens = () if journalled else (self._opened.get(raw_uid, 0),)
                self._items.append(
                    ("close" if journalled else UNJOURNALLED_CLOSE, raw_uid, stop, *opens)
                )
                self._cond.notify()
        finally:
            self._call_done()

    def unfinished_runs(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Runs stored without a stop (their writer died) and not open here, with their rows
        (not one whose journal record holds its stop: its close failed, and is tried again).

        Each: ``raw_uid``, ``start``, ``descriptor`` (metadata as stored), ``rows`` (stored
        rows), ``spectra`` (rows with ``index >= 0``), ``n_ok`` / ``n_rejected`` (by
        ``status``, when the table has it) and ``max_seq``. Runs on the writer thread.
        """
        return self._call(self._unfinished, timeout)

    def finish_run(self, raw_uid: str, stop_doc: dict) -> None:
        """Record the stop of a run stored earlier that is not open here (see unfinished_runs)."""
        stop = _plain(dict(stop_doc))
        with self._cond:
            self._check_open()
            if raw_uid in self._columns:
                raise ValueError(f"analysis run {raw_uid!r} is open here: use close_run")
            opens = self._opened.get(raw_uid, 0)  # one since: its record is not forgotten
            damaged = raw_uid in self._damaged  # its record is kept as it is, for a person
            self._calls += 1
        try:  # journalled (outside the lock) only while no open came since: its record
            journalled = not damaged and self._journal_stop(raw_uid, stop, opens)
            with self._cond:  # before close()'s stop, which waits for this call
                self._items.append(("finish", raw_uid, stop, journalled, opens))
                self._cond.notify()
        finally:
            self._call_done()

    def stats(self) -> dict[str, int]:
        """Counters: queued (accepted, not yet committed), stored, batches, errors, dropped,
        duplicates, journalled, replayed, write_lost (:attr:`write_lost`), full_waits and
        full_wait_ms (callers that waited for room, and for how long in all); ``catalog_up``
        (1 while the catalog answers: its child process runs), ``catalog_restarts`` and
        ``catalog_restart_failures`` (tries that did not bring a dead one back);
        ``stalled_ms``, how long rows have waited with none written (0 while none wait); with
        the journal, the runs and rows it holds now (``journal_stale`` 1: the last counts).
        Never waits on a hung journal write: the lock if free within ``STATS_WAIT_S``, else
        each int read whole without it."""
        sup = self._supervisor
        locked = self._cond.acquire(timeout=STATS_WAIT_S)
        try:
            out = {"queued": self._backlog, **self._counts}
            out["full_wait_ms"] = round(1e3 * self._full_wait)
            out["stalled_ms"] = round(1e3 * self._stalled_s())
            out["catalog_up"] = int(not self._closed and self._catalog_up())
            out["catalog_restarts"] = sup.restarts if sup is not None else 0
            out["catalog_restart_failures"] = sup.failures if sup is not None else 0
            journal = None if self._closed else self._journal
        finally:
            if locked:
                self._cond.release()
        if journal is not None:
            with contextlib.suppress(Exception):  # closed meanwhile: the counters alone
                out.update(journal.counts(stale=True))
        return out

    def client(self) -> Any:
        """A tiled client (root container) over this store's catalog, for readers and tests."""
        self._check_open()
        root = self._root  # a new one once a dead catalog process is replaced
        if self._reader is None or self._reader[0] is not root:
            from tiled.client import from_context

            self._reader = (root, from_context(root.context))
        return self._reader[1]

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

    def _call_done(self) -> None:
        with self._cond:
            self._calls -= 1
            if self._closing:
                self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise StoreError("the analysis store is closed")

    def _release(self) -> None:
        if self._serving is not None:
            self._serving.close()
            self._serving = None
        with OPEN_STORES_LOCK:
            if OPEN_STORES.get(self.directory) is self:
                del OPEN_STORES[self.directory]
        if self._lock_fd is not None:
            release(self._lock_fd)
            self._lock_fd = None
