"""The analysis store's write-ahead journal: a result is durable the moment it is journalled.

Creating a run's container and table in the tiled catalog takes 60-300 ms, and the store has
one writer thread, so with publish-after-store (``output.after_store``) the first results of
every run, and the results of every other run streaming meanwhile, waited that long for their
acknowledgement. With the journal, :meth:`AnalysisStore.add_event
<xasflow.adapters.tiled_store.AnalysisStore.add_event>` writes each row to ``journal.sqlite``
in the store's directory (SQLite, WAL, one short transaction; it survives SIGKILL of the
process) and acknowledges it at once; the writer thread moves rows into the catalog as before
and deletes them from the journal once they are committed there. The journal also holds each
open run's start, descriptor and (once closed) stop, so a process killed before the catalog
caught up replays it at the next start: the run is made or reopened, its rows appended
(``seq_num`` keeps that idempotent) and its stop recorded. What is in the journal at any time
is only what the catalog does not hold yet.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np

from xasflow.adapters.journal_records import ASIDE, JournalRun, aside_line, read_record, set_aside
from xasflow.adapters.tiled_schema import StoreError, _seq_key, json_default

__all__ = [
    "BUSY_TIMEOUT_S",
    "CALLER_CHECKPOINT_PAGES",
    "COUNT_WAIT_S",
    "JOURNAL_FILE",
    "Journal",
    "JournalRun",
    "Prior",
]

#: The journal's file in the store directory.
JOURNAL_FILE = "journal.sqlite"
#: How long a journal write waits for SQLite's write lock held by another connection before it
#: fails (SQLite's busy timeout; read when a journal connects, so tests can shorten it).
BUSY_TIMEOUT_S = 5.0
#: How long a count for monitoring waits for another one in progress (then: the last counts).
COUNT_WAIT_S = 0.05
#: The callers' connection checkpoints only past this many log pages (64 MB): the writer's
#: connection does it long before (see :class:`Journal`).
CALLER_CHECKPOINT_PAGES = 16384

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (raw_uid TEXT PRIMARY KEY, start TEXT NOT NULL,"
    " descriptor TEXT NOT NULL, stop TEXT)",
    "CREATE TABLE IF NOT EXISTS rows (raw_uid TEXT NOT NULL, seq INTEGER NOT NULL,"
    " row TEXT NOT NULL, PRIMARY KEY (raw_uid, seq))",
)


#: Rows per INSERT statement (3 parameters each, under SQLite's 999-parameter floor). One
#: statement, not one per row: each step releases and retakes the GIL, and on a busy daemon
#: every retake waits for the processing thread's switch interval.
_ROWS_PER_STATEMENT = 300


@contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """``BEGIN`` ... ``COMMIT``, rolled back when a statement or the commit fails (a write
    lock held past the busy timeout): left open, the transaction would fail every later
    ``BEGIN`` on the connection and keep what it wrote uncommitted, holding the lock.
    ``begin``: ``BEGIN IMMEDIATE`` for one that reads before it writes (the write lock first,
    so no other commit between its read and its write)."""
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _spans(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """``seqs`` as inclusive runs of consecutive integers (a commit's rows are usually one)."""
    out: list[tuple[int, int]] = []
    for q in sorted({int(s) for s in seqs}):
        if out and q == out[-1][1] + 1:
            out[-1] = (out[-1][0], q)
        else:
            out.append((q, q))
    return out


class Prior(NamedTuple):
    """A run's journal record as :meth:`Journal.open_run` found it: whether there was one,
    and its stop (JSON text, None while open)."""

    existed: bool
    stop: str | None


class Journal:
    """One SQLite file, written by the callers of the store and read back at its next start.

    ``synchronous=NORMAL`` in WAL mode: a committed transaction survives the process being
    killed (the operating system still holds it); only a power cut may lose the last ones.
    Thread-safe (one connection behind a lock); every method is one transaction.

    ``checkpoint_pages``: the write-ahead log's size (4 kB pages) at which a commit on this
    connection copies it into the database file (SQLite's automatic checkpoint, default 1000).
    A checkpoint holds its commit for 4-6 ms (scratch measurement, pages of 16 rows); the
    store gives its callers' connection :data:`CALLER_CHECKPOINT_PAGES`, so the processing
    thread leaves the checkpoints to the writer thread's connection, which commits its deletes
    after every catalog commit, and checkpoints itself only when that writer falls far behind.
    """

    def __init__(
        self,
        path: str | Path,
        checkpoint_pages: int = 1000,
        check: Callable[[JournalRun], object] | None = None,
    ) -> None:
        self.path = Path(path)
        self._check = check  # what a record must pass to be replayed (else: damaged)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
        )
        try:  # a damaged file (not a database, malformed): refused, naming it
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={int(checkpoint_pages)}")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise _damaged(self.path, exc) from exc
        self._counter = _Counter(self.path)

    def open_run(
        self,
        raw_uid: str,
        start: dict[str, Any],
        descriptor: dict[str, Any],
        *,
        fresh: bool = False,
        said: list[str] | None = None,
    ) -> Prior:
        """Record a run's start and descriptor (a reopened run keeps the first ones, and is
        open again: a stop recorded for it goes); returns the record it found, for
        :meth:`withdraw`. ``fresh``: a record found, and its rows, are an older copy's that a
        copy opened since without the journal superseded (:meth:`drop_run`): replaced. A
        damaged record found is set aside first (:mod:`~xasflow.adapters.journal_records`),
        and what the replay says of it from now on added to ``said``."""
        with self._lock, _transaction(self._db, "BEGIN IMMEDIATE"):
            if (aside := set_aside(self._db, raw_uid, self._check)) and said is not None:
                said.append(aside)
            if fresh:
                self._drop(raw_uid)
            found = self._db.execute(
                "SELECT stop FROM runs WHERE raw_uid = ?", (raw_uid,)
            ).fetchone()
            self._db.execute(
                "INSERT INTO runs (raw_uid, start, descriptor) VALUES (?, ?, ?)"
                " ON CONFLICT (raw_uid) DO UPDATE SET stop = NULL",
                (raw_uid, _dumps(start), _dumps(descriptor)),
            )
        return Prior(found is not None, None if found is None else found[0])

    def withdraw(self, raw_uid: str, prior: Prior) -> None:
        """Undo an :meth:`open_run` the store refused (it was closing): the run's record as
        ``prior`` found it: none (unless rows are listed for it, kept to be replayed), or
        its stop back (only while none was recorded since)."""
        with self._lock:
            if prior.existed:
                self._db.execute(
                    "UPDATE runs SET stop = ? WHERE raw_uid = ? AND stop IS NULL",
                    (prior.stop, raw_uid),
                )
            else:
                self._db.execute(
                    "DELETE FROM runs WHERE raw_uid = ?"
                    " AND NOT EXISTS (SELECT 1 FROM rows WHERE rows.raw_uid = runs.raw_uid)",
                    (raw_uid,),
                )

    def add(self, raw_uid: str, rows: list[dict[str, Any]]) -> list[bool]:
        """Journal rows of one run in one transaction (keyed by ``seq_num``); False for a row
        without one, which is then left to the catalog alone."""
        seqs = [_seq_key(row) for row in rows]
        keyed = [(raw_uid, q, _pack(r)) for r, q in zip(rows, seqs, strict=True) if q is not None]
        if keyed:
            with self._lock, _transaction(self._db):
                for start in range(0, len(keyed), _ROWS_PER_STATEMENT):
                    chunk = keyed[start : start + _ROWS_PER_STATEMENT]
                    self._db.execute(
                        "INSERT OR REPLACE INTO rows (raw_uid, seq, row) VALUES "
                        + ", ".join(["(?, ?, ?)"] * len(chunk)),
                        [value for key in chunk for value in key],
                    )
        return [q is not None for q in seqs]

    def close_run(
        self, raw_uid: str, stop: dict[str, Any], still: Callable[[], bool] | None = None
    ) -> bool:
        """Record a run's stop document (written to the catalog after its rows; also the
        stop ``finish_run`` gives a run a previous process left open) in its record; False
        when there is none (a run opened without the journal, or whose record was forgotten:
        nothing was recorded). Given ``still``, only if it holds once the write lock is
        taken (no open of the run came since the caller looked), else False."""
        with self._lock, _transaction(self._db, "BEGIN IMMEDIATE"):
            if still is not None and not still():
                return False
            done = self._db.execute(
                "UPDATE runs SET stop = ? WHERE raw_uid = ?", (_dumps(stop), raw_uid)
            )
        return done.rowcount > 0

    def moved(self, raw_uid: str, seqs: Iterable[int]) -> None:
        """Forget rows the catalog has committed."""
        spans = _spans(seqs)
        if not spans:
            return
        with self._lock, _transaction(self._db):
            self._db.executemany(
                "DELETE FROM rows WHERE raw_uid = ? AND seq BETWEEN ? AND ?",
                [(raw_uid, lo, hi) for lo, hi in spans],
            )

    def forget_run(
        self,
        raw_uid: str,
        stop: dict[str, Any] | None = None,
        still: Callable[[], bool] | None = None,
        *,
        record: dict[str, Any] | None = None,
    ) -> None:
        """Forget a run whose stop the catalog now holds.

        It stays while rows are still listed for it (a batch the catalog could not take: they
        are replayed at the next start, never dropped here) and, given ``stop``, unless that
        is still its stop: a run reopened since (a Kafka partition that came back replays it)
        keeps its record and the rows journalled for the new copy. Given ``still`` (a stop
        the journal could not record, so nothing in the record tells a reopen apart), it
        stays unless ``still()`` holds once the write lock is taken, as for :meth:`drop_run`;
        then ``record``, that stop, is put in a record its rows keep, so a replay closes the
        run with it (without it, a stopless record came back as an open run, its reopen
        cleared the catalog's stop, and recovery ended the finished run as interrupted).
        """
        sql = (
            "DELETE FROM runs WHERE raw_uid = ?"
            " AND NOT EXISTS (SELECT 1 FROM rows WHERE rows.raw_uid = runs.raw_uid)"
        )
        args = [raw_uid]
        if stop is not None:
            sql += " AND stop = ?"
            args.append(_dumps(stop))
        if still is None:
            with self._lock:
                self._db.execute(sql, args)
            return
        with self._lock, _transaction(self._db, "BEGIN IMMEDIATE"):
            if still():
                if record is not None:
                    self._db.execute(
                        "UPDATE runs SET stop = ? WHERE raw_uid = ?", (_dumps(record), raw_uid)
                    )
                self._db.execute(sql, args)

    def drop_run(
        self, raw_uid: str, still: Callable[[], bool], said: list[str] | None = None
    ) -> bool:
        """Forget a run's record and every row listed for it (an older copy's, superseded by
        one opened without the journal), if ``still()`` holds once the write lock is taken:
        no journal write of the run can come between the check and the delete. A damaged
        record is set aside instead, as by :meth:`open_run` (its line added to ``said``)."""
        with self._lock, _transaction(self._db, "BEGIN IMMEDIATE"):
            if not still():
                return False
            if (aside := set_aside(self._db, raw_uid, self._check)) and said is not None:
                said.append(aside)
            self._drop(raw_uid)
        return True

    def _drop(self, raw_uid: str) -> None:
        """Delete a run's rows and record (in the caller's transaction, which has set a
        damaged record aside first: kept for a person)."""
        self._db.execute("DELETE FROM rows WHERE raw_uid = ?", (raw_uid,))
        self._db.execute("DELETE FROM runs WHERE raw_uid = ?", (raw_uid,))

    def pending(
        self, unreadable: list[str] | None = None, damaged: set[str] | None = None
    ) -> list[JournalRun]:
        """Every run the journal holds, with its rows in ``seq_num`` order. What cannot be
        read back (a damaged record or row, one set aside, rows whose run has no record) is
        left out and left in the journal for a person: one line each added to ``unreadable``,
        and the raw_uid of each damaged record (not set aside) to ``damaged``."""
        with self._lock:
            try:
                runs = self._db.execute(
                    "SELECT raw_uid, start, descriptor, stop FROM runs ORDER BY rowid"
                ).fetchall()
                rows = self._db.execute(
                    "SELECT raw_uid, seq, row FROM rows ORDER BY raw_uid, seq"
                ).fetchall()
            except sqlite3.DatabaseError as exc:  # its pages damaged (a torn file)
                raise _damaged(self.path, exc) from exc
        said = unreadable if unreadable is not None else []
        out: dict[str, JournalRun] = {}
        bad: set[str] = set()
        for uid, s, d, x in runs:
            base, aside, _ = uid.partition(ASIDE)
            jr, reason = read_record(base, s, d, x, self._check)
            if aside:  # never replayed, whatever it holds now
                said.append(aside_line(base, uid, reason or "set aside"))
                bad.add(uid)
            elif jr is None:
                said.append(f"run {uid}'s record ({reason}), and its rows")
                bad.add(uid)
                if damaged is not None:
                    damaged.add(uid)
            else:
                out[uid] = jr
        orphans: dict[str, int] = {}
        for uid, seq, row in rows:
            if uid in bad:
                continue
            if uid not in out:  # cannot be placed: no start, no descriptor
                orphans[uid] = orphans.get(uid, 0) + 1
                continue
            try:
                out[uid].rows.append(_unpack(row))
            except Exception as exc:  # msgpack's errors are many (FormatError, ExtraData...)
                said.append(f"run {uid}, row seq_num {seq} ({type(exc).__name__}: {exc})")
        said.extend(f"{n} rows of run {uid}, which has no record" for uid, n in orphans.items())
        return list(out.values())

    def stops(self) -> dict[str, dict[str, Any]]:
        """The stops the journal's records hold, by raw_uid: runs whose close the catalog
        may lack (one it refused is replayed at the next start). A stop that cannot be read
        back is left out (the replay says so)."""
        with self._lock:
            found = self._db.execute(
                "SELECT raw_uid, stop FROM runs WHERE stop IS NOT NULL"
            ).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for uid, text in found:
            try:
                stop = json.loads(text)
            except (TypeError, ValueError):
                continue
            if isinstance(stop, dict):
                out[uid] = stop
        return out

    def counts(self, *, stale: bool = False) -> dict[str, int]:
        """Runs and rows the journal holds now, counted on a connection of its own
        (:class:`_Counter`: never waiting for this one's writes, for ``/metrics``); with
        ``stale``, also ``journal_stale``: 1 when they are the last counts, not new ones."""
        out = self._counter.counts()
        return out if stale else {k: v for k, v in out.items() if k != "journal_stale"}

    def close(self) -> None:
        """Close the connections (what was committed stays)."""
        with self._lock:
            self._db.close()
        self._counter.close()


class _Counter:
    """Counts what the journal holds on a connection of its own: a WAL reader sees the last
    commit and never waits for a writer, so a journal write hung in the kernel (its fsync, a
    stalled disk) holding a :class:`Journal`'s lock, or the database's write lock, does not
    hold a scrape. A count that cannot start within ``wait_s`` (another one stuck reading
    the disk) gives the last counts, with ``journal_stale`` 1."""

    def __init__(self, path: str | Path, wait_s: float = COUNT_WAIT_S) -> None:
        self.wait_s = float(wait_s)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA query_only=ON")
        self._last = {"journal_runs": 0, "journal_rows": 0}

    def counts(self) -> dict[str, int]:
        """Runs and rows the journal holds (``journal_stale``: 0 counted now, 1 the last)."""
        if not self._lock.acquire(timeout=self.wait_s):
            return {**self._last, "journal_stale": 1}
        try:
            self._last = _count(self._db)
        except sqlite3.Error:  # closed, or busy past SQLite's timeout: the last counts
            return {**self._last, "journal_stale": 1}
        finally:
            self._lock.release()
        return {**self._last, "journal_stale": 0}

    def close(self) -> None:
        """Close the connection, unless a count is stuck on it (it ends with the process)."""
        if self._lock.acquire(timeout=self.wait_s):
            try:
                self._db.close()
            finally:
                self._lock.release()


def _count(db: sqlite3.Connection) -> dict[str, int]:
    """The journal's runs and rows, read in one transaction (both of one commit)."""
    with _transaction(db):
        (runs,) = db.execute("SELECT COUNT(*) FROM runs").fetchone()
        (rows,) = db.execute("SELECT COUNT(*) FROM rows").fetchone()
    return {"journal_runs": int(runs), "journal_rows": int(rows)}


def _damaged(path: Path, exc: Exception) -> StoreError:
    """The refusal of a journal file SQLite cannot read: nothing of it can be replayed."""
    return StoreError(
        f"the store's journal {path} cannot be read ({exc}): the results it acknowledged "
        "are not replayed; keep it for a person, or move it aside (with its -wal and -shm "
        "files) to start without it"
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default, allow_nan=True, separators=(",", ":"))


def _pack(row: Mapping[str, Any]) -> bytes | str:
    """A row as msgpack (a quarter of JSON's time: rows are journalled on the processing
    thread), or as JSON text for what msgpack cannot hold (an integer beyond 64 bits)."""
    try:
        return msgpack.packb(row, default=_numpy_plain, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return _dumps(row)


def _numpy_plain(value: Any) -> Any:
    """msgpack's ``default``: numpy scalars and arrays as Python data; anything else (a huge
    integer, an unknown object) raises, and the row goes to JSON instead."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"msgpack cannot hold {type(value).__name__}")


def _unpack(data: bytes | str) -> dict[str, Any]:
    """A journalled row back (JSON text from :func:`_pack`'s fallback, or older journals)."""
    if isinstance(data, str):
        return dict(json.loads(data))
    return dict(msgpack.unpackb(data, raw=False))
