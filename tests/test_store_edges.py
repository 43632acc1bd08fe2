"""The analysis store at its edges: values Arrow refuses, a journal whose write lock is held
past its busy timeout, a start document whose write fails once.

Each case broke "a result the store acknowledged is in the catalog, and every run gets its
start and stop" before its fix (found by a read-only review, shown with these tests).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row
from store_helpers import HeldDb, wrap_metadata_writes

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _seqs(store: AnalysisStore, raw_uid: str) -> list[int]:
    return sorted(int(s) for s in read_analysis(store, raw_uid)[1]["seq_num"])


@pytest.mark.parametrize(
    "bad",
    [
        {"distance": 2**60},  # an int in a "number" column that float64 cannot hold exactly
        {"status": "bad \ud800 text"},  # a lone surrogate (a pickled raw document's key)
    ],
    ids=["big-int-in-number-column", "lone-surrogate-string"],
)
def test_an_acknowledged_journalled_row_is_in_the_catalog(tmp_path: Path, bad: dict) -> None:
    """A value Arrow refuses (an integer a double cannot hold, a lone surrogate) is not
    journalled, so not acknowledged early: the catalog refuses the row and it is told lost
    (``on_lost``, counted). Before, it was journalled and acknowledged, then dropped by the
    catalog and forgotten by the journal: in neither, and never counted lost."""
    stored: list[int] = []
    lost: list[int] = []
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        for seq, extra in ((1, {}), (2, bad), (3, {})):
            store.add_event(
                "R",
                _row(seq, **extra),
                on_stored=lambda s=seq: stored.append(s),
                on_lost=lambda s=seq: lost.append(s),
            )
        assert store.flush(30)
        in_catalog = _seqs(store, "R")
        in_journal = Journal(directory / JOURNAL_FILE).pending()
        errors = store.stats()["errors"]
    journal_seqs = {int(r["seq_num"]) for run in in_journal for r in run.rows}
    # the contract: every row told stored is in the catalog or still in the journal
    assert set(stored) <= set(in_catalog) | journal_seqs, (
        f"acknowledged {stored}, catalog {in_catalog}, journal {sorted(journal_seqs)}, "
        f"on_lost {lost}, errors {errors}"
    )
    assert sorted(stored) == [1, 3] and lost == [2] and in_catalog == [1, 3]


def test_one_failed_journal_write_does_not_wedge_the_journal(tmp_path: Path) -> None:
    """One journal write that fails (another connection, an operator's sqlite3 shell, held
    the write lock past the 5 s busy timeout) is rolled back: the rows after it are
    journalled again and a new run's record is committed. Before, the transaction stayed
    open: every later ``add`` failed at BEGIN and every flush waited out the timeout."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1)]) == [True]
        assert store.flush(30)
        other = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the journal's write lock for a while
        store.add_events("R", [_row(2)])  # waits 5 s, fails, falls back to the catalog
        other.execute("ROLLBACK")
        other.close()
        before = store.stats()["journalled"]
        store.add_events("R", [_row(3), _row(4)])  # the lock is free again
        after = store.stats()["journalled"]
        store.open_run("S", {"uid": "b"}, DESCRIPTOR)  # a new run's record
        t0 = time.monotonic()
        assert store.flush(60)
        flush_s = time.monotonic() - t0
        fresh = Journal(directory / JOURNAL_FILE)
        runs = {r.raw_uid for r in fresh.pending()}
        fresh.close()
    symptoms = {
        "rows journalled after the lock was released (of 2)": after - before,
        "new run S committed in the journal": "S" in runs,
        "flush seconds": round(flush_s, 1),
    }
    assert after == before + 2 and "S" in runs and flush_s < 5, symptoms


def test_a_journal_that_fails_at_close_run_still_records_the_stop(
    tmp_path: Path, short_busy_timeout: float
) -> None:
    """A stop the journal cannot record (its write lock held past the busy timeout) still
    reaches the catalog, as every other journal failure falls back to it. Before, close_run
    raised with the run already gone from the caller side: the stop was never written and
    the run stayed open."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
        assert store.flush(30)
        other = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        error = None
        try:
            store.close_run("R", {"uid": "z", "exit_status": "success"})
        except Exception as exc:
            error = repr(exc)
        other.execute("ROLLBACK")
        other.close()
        assert store.flush(30)
        stop = read_analysis(store, "R")[0]["stop"]
        still_open_in_writer = "R" in store._runs
    assert stop is not None, {
        "close_run raised": error,
        "writer still holds R": still_open_in_writer,
    }


def test_a_start_whose_write_failed_once_is_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table made ahead (prepare_run) gets its start document after the first rows. A
    write of it that fails past the retries while the catalog is up is tried again, at the
    close at the latest. Before, it was never tried again: the close wrote the stop, the
    journal forgot the run, and the catalog kept start None (bundle id, element, raw scan
    id gone)."""
    failures = {"left": 4}  # more than the store's retries

    def flaky(real: Any, node: Any, metadata_patch: Any, *args: Any, **kwargs: Any) -> Any:
        ops = metadata_patch or []
        if any(op["path"] == "/start" and op["value"] for op in ops) and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError("catalog busy")
        return real(node, metadata_patch, *args, **kwargs)

    wrap_metadata_writes(monkeypatch, flaky)
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.prepare_run("R", DESCRIPTOR)
        assert store.flush(30)
        store.open_run("R", {"uid": "a-start", "bundle_id": "b1"}, DESCRIPTOR)
        store.add_events("R", [_row(1)])
        assert store.flush(30)
        store.close_run("R", {"uid": "z", "exit_status": "success"})
        assert store.flush(30)
        meta = read_analysis(store, "R")[0]
        counts = Journal(directory / JOURNAL_FILE).counts()
    assert failures["left"] == 0  # the start's first write failed past the retries
    assert meta["start"] is not None, {"stop": meta["stop"], "journal": counts}


def _page(seqs: list[int]) -> dict[str, Any]:
    """An event page of :data:`DESCRIPTOR` rows, as the daemon's composer sends it."""
    rows = [_row(seq, motifs=[0.2, 0.3, 0.5]) for seq in seqs]
    return {
        "uid": f"ev{seqs[0]}",
        "descriptor": DESCRIPTOR["uid"],
        "seq_num": seqs,
        "time": [row.pop("time") for row in rows],
        "timestamps": {},
        "filled": {},
        "data": {k: [row[k] for row in rows] for k in rows[0] if k != "seq_num"},
    }


def test_a_journal_that_fails_at_open_run_still_stores_the_run(
    tmp_path: Path, short_busy_timeout: float
) -> None:
    """A run whose start the journal cannot record (its write lock held past SQLite's 5 s
    busy timeout: another connection here, the writer thread's hung COMMIT in the daemon)
    is opened all the same: its rows and its stop reach the catalog, acknowledged by the
    catalog's commit, not the journal's; the next run is journalled again. Before,
    ``open_run`` raised: the run never opened and all its rows were counted unstored."""
    from xasflow.adapters.store_writer import StoreWriter

    directory = tmp_path / "s"
    stored: list[int] = []
    with AnalysisStore(directory, journal=True) as store:
        writer = StoreWriter(store, on_stored=lambda: stored.append(1))
        other = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the journal's write lock past the timeout
        try:
            writer("start", {"uid": "a", "raw_uid": "R", "time": 0.0})
            writer("descriptor", {**DESCRIPTOR, "run_start": "a", "time": 0.0})
        finally:
            other.execute("ROLLBACK")
            other.close()
        writer("event_page", _page([1, 2, 3]))
        writer("stop", {"uid": "z", "run_start": "a", "exit_status": "success", "time": 1.0})
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        journalled = store.stats()["journalled"]
        left = Journal(directory / JOURNAL_FILE).counts()
        store.open_run("S", {"uid": "b"}, DESCRIPTOR)  # the journal answers again
        assert store.add_events("S", [_row(1), _row(2)]) == [True, True]
        journalled_s = store.stats()["journalled"] - journalled
        in_journal = {run.raw_uid for run in Journal(directory / JOURNAL_FILE).pending()}
    assert (writer.unstored, len(stored), journalled) == (0, 3, 0)
    assert [int(s) for s in frame["seq_num"]] == [1, 2, 3]
    assert meta["start"]["uid"] == "a" and meta["stop"]["uid"] == "z"
    assert left == {"journal_runs": 0, "journal_rows": 0}
    assert journalled_s == 2 and "S" in in_journal


def _fail_once(monkeypatch: pytest.MonkeyPatch, raw_uid: str) -> None:
    """The journal's record of ``raw_uid``'s start fails once, as a write lock held past the
    busy timeout makes it fail (the INSERT into its runs table raises)."""
    real = Journal.open_run
    left = {raw_uid: 1}

    def locked(self: Journal, uid: str, *args: Any, **kw: Any) -> Any:
        if left.get(uid):
            left[uid] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real(self, uid, *args, **kw)

    monkeypatch.setattr(Journal, "open_run", locked)


def test_a_run_the_journal_could_not_open_is_never_half_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal answers again after the start it could not record: the run's rows are
    still not journalled (rows without their run's record cannot be replayed, so a row
    acknowledged from the journal would be lost by a crash) but acknowledged once in the
    catalog, and a crash leaves nothing of the run to replay: the next start finds it as
    an unfinished run, with every acknowledged row, as without a journal."""
    _fail_once(monkeypatch, "R")
    directory = tmp_path / "s"
    acked: list[int] = []
    with AnalysisStore(directory, journal=True, flush_interval=30.0) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        go, busy = threading.Event(), threading.Event()
        blocker = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
        blocker.start()
        assert busy.wait(10)  # the catalog has not taken the rows yet
        for seq in (1, 2):
            assert store.add_event("R", _row(seq), on_stored=lambda s=seq: acked.append(s))
        early = list(acked)
        crash_now = Journal(directory / JOURNAL_FILE).pending()  # what a kill would replay
        go.set()
        blocker.join()
        assert store.flush(30)  # the process dies here, with R open
        committed = list(acked)
    with AnalysisStore(directory, journal=True) as store:
        replayed = store.stats()["replayed"]
        unfinished = [(u["raw_uid"], u["rows"]) for u in store.unfinished_runs()]
        counts = Journal(directory / JOURNAL_FILE).counts()
    assert early == [] and [(r.raw_uid, len(r.rows)) for r in crash_now] == []
    assert committed == [1, 2] and replayed == 0 and unfinished == [("R", 2)]
    assert counts == {"journal_runs": 0, "journal_rows": 0}


@pytest.mark.parametrize(
    ("call", "prefix"),
    [
        (lambda store: store.open_run("S", {"uid": "b"}, DESCRIPTOR), "INSERT INTO runs"),
        (lambda store: store.close_run("S", {"uid": "z"}), "UPDATE runs SET stop"),
        (lambda store: store.finish_run("X", {"uid": "z"}), "UPDATE runs SET stop"),
    ],
    ids=["open_run", "close_run", "finish_run"],
)
def test_a_hung_journal_write_of_a_run_does_not_stop_the_writer(
    tmp_path: Path, call: Any, prefix: str, short_busy_timeout: float
) -> None:
    """While a run's start or stop hangs in the journal, the writer thread goes on moving the
    other runs' rows into the catalog (a flush answers). Before, ``open_run``, ``close_run``
    and ``finish_run`` wrote the journal holding the store's lock, which the writer takes for
    every batch: it stopped, and so did every caller, flushes included."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True, flush_interval=30.0) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.open_run("S", {"uid": "s"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
        assert store._journal is not None
        held = HeldDb(store._journal._db, prefix)
        store._journal._db = held
        hung = threading.Thread(target=call, args=(store,))
        hung.start()
        try:
            assert held.entered.wait(30)
            flushed: list[bool] = []
            flusher = threading.Thread(target=lambda: flushed.append(store.flush(30)))
            flusher.start()
            flusher.join(20)
            answered, stored_while_hung = list(flushed), store.stats()["stored"]
        finally:
            held.release.set()
        hung.join(30)
        flusher.join(30)
        assert store.flush(30)
        seqs = _seqs(store, "R")
    assert (answered, stored_while_hung) == ([True], 2) and seqs == [1, 2]


def test_rows_never_journalled_are_not_forgotten_in_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of a run opened unjournalled (the journal could not record its start) are
    never in the journal, so their commit deletes nothing there. Before, the writer deleted
    them after every commit all the same: with the journal's write lock held elsewhere each
    delete waited out SQLite's 5 s busy timeout and failed, an error counted per batch and
    every other run's rows held meanwhile."""
    _fail_once(monkeypatch, "R")
    forgotten: list[tuple[str, list[int]]] = []
    real = Journal.moved

    def spy(self: Journal, raw_uid: str, seqs: Any) -> None:
        seqs = [int(s) for s in seqs]
        forgotten.append((raw_uid, seqs))
        real(self, raw_uid, seqs)

    monkeypatch.setattr(Journal, "moved", spy)
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)  # unjournalled
        store.open_run("S", {"uid": "b"}, DESCRIPTOR)  # journalled
        assert store.flush(30)
        other = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the journal's write lock
        try:
            assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
            assert store.flush(30)
            while_held = {k: store.stats()[k] for k in ("stored", "errors", "journalled")}
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert store.add_events("S", [_row(1)]) == [True]
        assert store.flush(30)
        seqs = _seqs(store, "R")
    assert while_held == {"stored": 2, "errors": 0, "journalled": 0}, forgotten
    assert forgotten == [("S", [1])] and seqs == [1, 2]


def test_an_open_run_refused_by_a_closing_store_leaves_no_journal_record(tmp_path: Path) -> None:
    """A run opened while the store closes (its start in the journal when ``close`` began)
    is refused with the store's StoreError and leaves nothing in the journal. Before, the
    refusal came after the start was journalled: the next start replayed an empty run,
    left it without a stop, and recovery ended a run that never had anything."""
    from helpers import wait_for

    from xasflow.adapters.tiled_schema import StoreError

    directory = tmp_path / "s"
    store = AnalysisStore(directory, journal=True)
    assert store._journal is not None
    held = HeldDb(store._journal._db, "INSERT INTO runs")
    store._journal._db = held
    raised: list[BaseException] = []

    def open_r() -> None:
        try:
            store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        except BaseException as exc:
            raised.append(exc)

    opener, closer = threading.Thread(target=open_r), threading.Thread(target=store.close)
    opener.start()
    try:
        assert held.entered.wait(30)  # its start is being journalled
        closer.start()
        wait_for(lambda: store._closing, "close to begin")
    finally:
        held.release.set()
    opener.join(30)
    closer.join(30)
    left = [run.raw_uid for run in Journal(directory / JOURNAL_FILE).pending()]
    with AnalysisStore(directory, journal=True) as store:
        replayed = store.stats()["replayed"]
        unfinished = [u["raw_uid"] for u in store.unfinished_runs()]
        in_catalog = "R" in store.client()
    assert [type(exc) for exc in raised] == [StoreError]
    assert (left, unfinished, in_catalog, replayed) == ([], [], False, 0)


def test_a_run_reopened_unjournalled_is_not_replayed_as_its_older_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's first copy leaves its record and rows in the journal (the catalog refused
    their batch), then the run is reopened and rewritten without the journal (it could not
    record the second start). A crash then replays nothing of the first copy: the catalog
    keeps the second's start, rows and stop. Before, the restart replayed the old record
    over it: its start and stop back, and its row 3, which the second copy never had."""
    import xasflow.adapters.tiled_writer as tw

    real_open, real_append = Journal.open_run, tw.append_pending
    calls = {"open": 0, "append": 0}

    def second_open_fails(self: Journal, uid: str, *args: Any, **kw: Any) -> Any:
        calls["open"] += 1
        if calls["open"] == 2:  # the journal's lock held past its busy timeout
            raise sqlite3.OperationalError("database is locked")
        return real_open(self, uid, *args, **kw)

    def first_append_fails(run: Any, pending: Any) -> Any:
        calls["append"] += 1
        if calls["append"] == 1:
            raise OSError("catalog refused the batch")
        return real_append(run, pending)

    monkeypatch.setattr(Journal, "open_run", second_open_fails)
    monkeypatch.setattr(tw, "append_pending", first_append_fails)
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "old"}, DESCRIPTOR)
        store.add_events("R", [_row(s, distance=1.0) for s in (1, 2, 3)])
        store.close_run("R", {"uid": "old-stop", "exit_status": "fail"})
        assert store.flush(30)
        stale = [(r.raw_uid, len(r.rows)) for r in Journal(directory / JOURNAL_FILE).pending()]
        store.open_run("R", {"uid": "new"}, DESCRIPTOR)  # unjournalled
        store.add_events("R", [_row(s, distance=2.0) for s in (1, 2)])
        store.close_run("R", {"uid": "new-stop", "exit_status": "success"})
        assert store.flush(30)
        crash_now = [(r.raw_uid, len(r.rows)) for r in Journal(directory / JOURNAL_FILE).pending()]
    with AnalysisStore(directory, journal=True) as store:  # the next start
        assert store.flush(30)
        replayed = store.stats()["replayed"]
        meta, frame = read_analysis(store, "R")
    got = {
        "start": meta["start"]["uid"],
        "stop": meta["stop"]["uid"],
        "seqs": [int(s) for s in frame["seq_num"]],
        "distance": [float(d) for d in frame["distance"]],
    }
    assert stale == [("R", 3)]  # the situation: the first copy's rows left in the journal
    assert (crash_now, replayed) == ([], 0), got
    assert got == {"start": "new", "stop": "new-stop", "seqs": [1, 2], "distance": [2.0, 2.0]}


def test_a_journalled_reopen_after_an_unjournalled_one_keeps_its_own_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is opened a third time, journalled again, before the writer reaches the
    second (unjournalled) open: the third copy's record replaces the first copy's stale one
    (its start, none of its rows), and the writer's drop of the superseded record, coming
    after, leaves the third copy's record and rows alone (they are all a crash replays)."""
    real_open = Journal.open_run
    calls = {"open": 0}

    def second_open_fails(self: Journal, uid: str, *args: Any, **kw: Any) -> Any:
        calls["open"] += 1
        if calls["open"] == 2:
            raise sqlite3.OperationalError("database is locked")
        return real_open(self, uid, *args, **kw)

    monkeypatch.setattr(Journal, "open_run", second_open_fails)
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True, flush_interval=30.0) as store:
        go, busy = threading.Event(), threading.Event()
        blocker = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
        blocker.start()
        assert busy.wait(10)  # the writer takes nothing of what follows yet
        try:
            store.open_run("R", {"uid": "first"}, DESCRIPTOR)
            store.add_events("R", [_row(s) for s in (1, 2, 3)])
            store.close_run("R", {"uid": "first-stop"})
            store.open_run("R", {"uid": "second"}, DESCRIPTOR)  # unjournalled
            store.add_events("R", [_row(1)])
            store.close_run("R", {"uid": "second-stop"})
            store.open_run("R", {"uid": "third"}, DESCRIPTOR)  # journalled again
            store.add_events("R", [_row(7)])
        finally:
            go.set()
            blocker.join()
        assert store.flush(30)
        left = [
            (r.raw_uid, r.start["uid"], [int(x["seq_num"]) for x in r.rows])
            for r in Journal(directory / JOURNAL_FILE).pending()
        ]
        errors = store.stats()["errors"]
    # the third copy is open: its record stays (row 7 was moved) for the next start to end
    assert (left, errors) == ([("R", "third", [])], 0)
