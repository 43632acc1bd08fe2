"""The analysis store's journal when a run is opened again before the writer has reached the
close of its earlier copy, that close one the journal could not record (the copy was opened
without the journal, or its stop could not be written): the later copy's record must
survive that close, or its acknowledged rows have nothing to be replayed under. And a
stop the journal could not record, of a run whose record its rows keep: the record must
not come back as an open run.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row
from helpers import wait_for
from store_helpers import HeldDb

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_schema import StoreError
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


class _Killed(BaseException):
    """Ends the writer thread where it stands (no commit, no close), as SIGKILL would."""


def _hold(store: AnalysisStore) -> tuple[threading.Event, threading.Thread]:
    """Hold the writer thread in a call until the returned event is set: what is queued
    meanwhile waits behind it."""
    go, busy = threading.Event(), threading.Event()
    thread = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
    thread.start()
    assert busy.wait(10)
    return go, thread


def _hold_then_kill(store: AnalysisStore, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the writer thread until the returned event is set, then end it there (no
    commit, no close), as SIGKILL would: what is queued meanwhile is never handled."""
    go, busy = threading.Event(), threading.Event()

    def die() -> None:
        busy.set()
        assert go.wait(30)
        raise _Killed

    hook = threading.excepthook  # the writer's death is the point, not an error to report
    monkeypatch.setattr(
        threading, "excepthook", lambda a: None if a.exc_type is _Killed else hook(a)
    )
    with store._cond:
        store._items.append(("call", die, {}, threading.Event()))
        store._cond.notify()
    assert busy.wait(10)
    return go


def _crash(store: AnalysisStore, go: threading.Event) -> None:
    """Let the held writer die, then drop the store without closing it: its catalog and
    lock released, the journal left as the killed process wrote it."""
    go.set()
    store._writer.join(30)
    assert not store._writer.is_alive()
    for journal in (store._journal, store._journal_w):
        if journal is not None:
            journal.close()
    store._release()


def _fail_first(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The journal's first ``name`` call fails: its write lock held past the busy timeout."""
    real = getattr(Journal, name)
    calls = {"n": 0}

    def locked(self: Journal, *args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(self, *args, **kw)

    monkeypatch.setattr(Journal, name, locked)


@pytest.mark.parametrize("unrecorded", ["open_run", "close_run"])
def test_a_reopen_before_the_writer_reached_an_unjournalled_close_keeps_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unrecorded: str
) -> None:
    """Copy a of run R is opened (or closed) without the journal, copy b is opened with it
    before the writer reaches a's close; b's rows 3 and 4, journalled and so acknowledged at
    once, are still uncommitted when the process is killed. The next start replays them from
    b's record. Before, the writer's close of a forgot R's record whatever came since (b's,
    no rows yet), so b's rows had no record to be replayed under: lost, although
    acknowledged (catalog [1, 2], journal record gone, its two rows orphaned)."""
    _fail_first(monkeypatch, unrecorded)
    directory = tmp_path / "s"
    acked: list[int] = []
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    go, thread = _hold(store)
    store.open_run("R", {"uid": "a"}, DESCRIPTOR)
    store.add_events("R", [_row(s, distance=1.0) for s in (1, 2)])
    store.close_run("R", {"uid": "a-stop", "exit_status": "success"})
    store.open_run("R", {"uid": "b"}, DESCRIPTOR)  # journalled
    go.set()
    thread.join()
    store._call(lambda: None, 30)  # the writer has handled a's close and b's open
    record = [(r.raw_uid, r.start["uid"]) for r in Journal(directory / JOURNAL_FILE).pending()]
    go = _hold_then_kill(store, monkeypatch)  # b's rows: acknowledged, never committed
    for seq in (3, 4):
        assert store.add_event(
            "R", _row(seq, distance=2.0), on_stored=lambda s=seq: acked.append(s)
        )
    _crash(store, go)
    with AnalysisStore(directory, journal=True) as store:  # the next start
        assert store.flush(30)
        replayed = store.stats()["replayed"]
        meta, frame = read_analysis(store, "R")
        unfinished = [(u["raw_uid"], u["rows"]) for u in store.unfinished_runs()]
    seqs = sorted(int(s) for s in frame["seq_num"])
    assert acked == [3, 4]
    assert (record, replayed, seqs) == (
        [("R", "b" if unrecorded == "open_run" else "a")],
        2,
        [1, 2, 3, 4],
    )
    assert meta["stop"] is None and unfinished == [("R", 4)]  # b was open: recovery ends it


def _refused_opens(
    store: AnalysisStore, raw_uid: str, n: int
) -> tuple[list[BaseException], threading.Thread]:
    """Open ``raw_uid`` again ``n`` times at once (threads), the first start held in the
    journal (the others wait for its lock) until ``close()`` began: the store refuses them
    all, in either order. Returns what open_run raised, and the thread closing the store (it
    ends once the writer, which may be held elsewhere, has ended)."""
    assert store._journal is not None
    held = HeldDb(store._journal._db, "INSERT INTO runs")
    store._journal._db = held
    raised: list[BaseException] = []
    before = store._opened.get(raw_uid, 0)

    def open_again() -> None:
        try:
            store.open_run(raw_uid, {"uid": "refused"}, DESCRIPTOR)
        except BaseException as exc:
            raised.append(exc)

    openers = [threading.Thread(target=open_again) for _ in range(n)]
    closer = threading.Thread(target=store.close)
    for opener in openers:
        opener.start()
    try:
        assert held.entered.wait(30)  # a start is being journalled
        wait_for(lambda: store._opened.get(raw_uid) == before + n, "every open in flight")
        closer.start()
        wait_for(lambda: store._closing, "close to begin")
    finally:
        held.release.set()
    for opener in openers:
        opener.join(30)
    return raised, closer


@pytest.mark.parametrize("refused", [1, 2])
def test_an_open_refused_by_a_closing_store_leaves_an_earlier_copys_close_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: int
) -> None:
    """Copy a of run R is opened, given rows 1-2 and closed, its stop not journalled; the
    run is opened again while the store closes, before the writer reaches a's close, and
    that open is refused. a's close then forgets R's record (nothing of R is left to
    replay), and the next start finds R stopped. Before, the refused open's count of R's
    opens stayed raised: a's close saw a later open and kept the record (no rows), which
    the next start replayed as an interrupted run (stop cleared, R unfinished). Two opens
    refused at once, in either order, leave the count where it was before both."""
    _fail_first(monkeypatch, "close_run")
    directory = tmp_path / "s"
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    go, thread = _hold(store)
    store.open_run("R", {"uid": "a"}, DESCRIPTOR)
    store.add_events("R", [_row(s) for s in (1, 2)])
    store.close_run("R", {"uid": "a-stop", "exit_status": "success"})  # unjournalled
    raised, closer = _refused_opens(store, "R", refused)  # the writer has not reached a's close
    go.set()
    thread.join()
    closer.join(30)  # a's close handled, then the store's stop
    left = [(r.raw_uid, len(r.rows)) for r in Journal(directory / JOURNAL_FILE).pending()]
    with AnalysisStore(directory, journal=True) as store:  # the next start
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        unfinished = [u["raw_uid"] for u in store.unfinished_runs()]
    assert [type(exc) for exc in raised] == [StoreError] * refused
    assert (left, unfinished) == ([], [])
    assert (meta["start"]["uid"], (meta["stop"] or {}).get("uid")) == ("a", "a-stop")
    assert sorted(int(s) for s in frame["seq_num"]) == [1, 2]


def test_an_open_refused_by_a_closed_store_leaves_nothing(tmp_path: Path) -> None:
    """The ordinary refusal: a run opened after the store closed raises StoreError and
    leaves no record, no count of its opens and no run behind, for the next start either."""
    directory = tmp_path / "s"
    store = AnalysisStore(directory, journal=True)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.open_run("R", {"uid": "late"}, DESCRIPTOR)
    behind = (dict(store._opened), dict(store._columns), store._opening)
    with AnalysisStore(directory, journal=True) as store:  # the next start
        left = [r.raw_uid for r in Journal(directory / JOURNAL_FILE).pending()]
        unfinished = [u["raw_uid"] for u in store.unfinished_runs()]
        in_catalog = "R" in store.client()
        replayed = store.stats()["replayed"]
    assert behind == ({}, {}, 0)
    assert (left, unfinished, in_catalog, replayed) == ([], [], False, 0)


def test_a_stop_the_journal_missed_with_rows_it_kept_is_not_undone_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A run's moved rows the journal could not forget, then its stop it could not record
    (each a write past the busy timeout: a stalled disk does both): the catalog holds rows
    and stop, and the journal a record with no stop, kept for its rows. Before, the next
    start, even after a clean close, replayed that record as an open run: its reopen cleared
    the catalog's stop and recovery closed the finished run as interrupted. Now the writer
    puts the stop it wrote into the record it cannot forget, so the replay closes with it."""
    from xasflow.adapters.recovery import InterruptedRuns

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise OSError("database is locked")

    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        assert store._journal_w is not None and store._journal is not None
        store._journal_w.moved = locked  # type: ignore[method-assign]
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
        assert store.flush(30)
        store._journal.close_run = locked  # type: ignore[method-assign]
        store.close_run("R", {"uid": "z", "exit_status": "success"})
        assert store.flush(30)
        assert read_analysis(store, "R")[0]["stop"]["uid"] == "z"
    with AnalysisStore(directory, journal=True) as store:
        interrupted = InterruptedRuns(store)
        interrupted.find()
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        assert interrupted.pending() == [] and list(frame["seq_num"]) == [1, 2]
    assert meta["stop"]["uid"] == "z" and meta["stop"]["exit_status"] == "success"
    assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}


@pytest.mark.parametrize("rows_kept", [False, True], ids=["record", "record with rows"])
def test_an_interrupted_stop_the_journal_missed_is_not_given_again_at_the_next_start(
    tmp_path: Path, rows_kept: bool
) -> None:
    """Recovery closes a run a killed process left open (its journal record has no stop)
    and the journal cannot record that interrupted stop (its write lock held past the busy
    timeout); the catalog takes it. Before, the record stayed stopless, so the next start
    replayed it as an open run: the reopen cleared the catalog's stop and recovery closed
    the run a second time, its raw count now unknown (a second stop on the bus, the
    interrupted count +1). Now the writer, once the catalog holds the stop, forgets the
    record, or puts the stop in it when rows keep it (rows moved it could not forget)."""
    from xasflow.adapters.recovery import InterruptedRuns

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:  # closed with R open, as if killed
        assert store._journal_w is not None
        if rows_kept:
            store._journal_w.moved = locked  # type: ignore[method-assign]
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
    with AnalysisStore(directory, journal=True) as store:
        assert store._journal is not None and store._journal_w is not None
        if rows_kept:
            store._journal_w.moved = locked  # type: ignore[method-assign]
        interrupted = InterruptedRuns(store)
        assert interrupted.find() == 1
        store._journal.close_run = locked  # type: ignore[method-assign]
        stop = interrupted.close("R", {"exit_status": "success", "num_events": {"primary": 3}})
        assert stop is not None and stop["raw_missing_events"] == 1
        assert store.flush(30)
        assert read_analysis(store, "R")[0]["stop"]["uid"] == stop["uid"]
    with AnalysisStore(directory, journal=True) as store:
        again = InterruptedRuns(store)
        found = again.find()
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
    assert (found, [int(s) for s in frame["seq_num"]]) == (0, [1, 2])
    assert meta["stop"]["uid"] == stop["uid"] and meta["stop"]["raw_missing_events"] == 1
    assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}


def test_a_start_redelivered_while_finish_run_journals_keeps_its_record_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finish_run`` of a run a killed predecessor left open checks that the run is not open
    here, then journals the interrupted stop outside the store's lock; the raw start
    redelivered in between (another thread) reopens the run's record. Before, the finish's
    stop went into that fresh record: a crash then replayed the reopened copy as a run that
    had ended with the old interrupted stop, so recovery never closed it (its acknowledged
    rows 3 and 4 under a stop that counts 2). Now the finish journals its stop only while no
    open came since its check, in the same journal transaction."""
    from xasflow.adapters.recovery import InterruptedRuns

    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:  # closed with R open, as if killed
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
    real = Journal.close_run
    redelivered: list[str] = []

    def open_in_the_gap(self: Journal, raw_uid: str, *args: Any, **kw: Any) -> Any:
        if not redelivered:  # the redelivered start lands between finish_run's two steps
            redelivered.append(raw_uid)
            store.open_run("R", {"uid": "a2"}, DESCRIPTOR)
        return real(self, raw_uid, *args, **kw)

    acked: list[int] = []
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    assert [u["raw_uid"] for u in store.unfinished_runs()] == ["R"]
    monkeypatch.setattr(Journal, "close_run", open_in_the_gap)
    store.finish_run("R", {"uid": "old-stop", "exit_status": "fail", "interrupted": True})
    store._call(lambda: None, 30)  # the writer has handled the open and the finish
    record = {r.raw_uid: r.stop for r in Journal(directory / JOURNAL_FILE).pending()}
    go = _hold_then_kill(store, monkeypatch)  # the new copy's rows: acknowledged, uncommitted
    for seq in (3, 4):
        assert store.add_event("R", _row(seq), on_stored=lambda s=seq: acked.append(s))
    _crash(store, go)
    with AnalysisStore(directory, journal=True) as store:  # the next start
        interrupted = InterruptedRuns(store)
        found = interrupted.find()
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
    assert (redelivered, acked, record) == (["R"], [3, 4], {"R": None})
    assert found == 1 and [int(s) for s in frame["seq_num"]] == [1, 2, 3, 4]
    assert meta["stop"] is None  # left to recovery, which counts the 4 rows


def _damaged_record(directory: Path) -> tuple[list[Any], list[Any]]:
    """A journal left holding run R's record, its start not JSON, and its rows 1 and 2 (a
    torn or hand-edited file): what the replay cannot read back, kept for a person.
    Returns the record's (start, descriptor, stop) and its rows' (seq, row), as written."""
    directory.mkdir()
    journal = Journal(directory / JOURNAL_FILE)
    journal.open_run("R", {"uid": "a"}, DESCRIPTOR)
    assert journal.add("R", [_row(s, distance=1.0) for s in (1, 2)]) == [True, True]
    journal.close()
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        db.execute("UPDATE runs SET start = '{\"uid\": ' WHERE raw_uid = 'R'")
        record = db.execute("SELECT start, descriptor, stop FROM runs").fetchall()
        rows = db.execute("SELECT seq, row FROM rows ORDER BY seq").fetchall()
    return record, rows


def _kept(directory: Path) -> tuple[list[Any], list[Any]]:
    """The journal's records and rows other than run R's own."""
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        return (
            db.execute(
                "SELECT raw_uid, start, descriptor, stop FROM runs WHERE raw_uid != 'R'"
            ).fetchall(),
            db.execute(
                "SELECT raw_uid, seq, row FROM rows WHERE raw_uid != 'R' ORDER BY seq"
            ).fetchall(),
        )


def test_a_run_whose_record_is_damaged_opened_again_is_replayed_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Run R's journal record is damaged (its start not JSON): the store's start says so and
    keeps it. R is then opened again (a redelivered raw start, the next analysis copy) and
    its rows 1-3, journalled and so acknowledged at once, are still uncommitted when the
    process is killed. Before, the open kept the damaged record (it only cleared its stop)
    and the new rows went under it, over the old copy's rows 1 and 2: the next start said
    the record again and replayed nothing (R's table empty, the old rows gone). Now the
    damaged record is set aside with its rows under R/damaged-1 (kept, said at each start,
    never replayed) and the new copy has a record of its own, replayed."""
    directory = tmp_path / "s"
    record, rows = _damaged_record(directory)
    acked: list[int] = []
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    said = store.stats()["errors"]
    store.open_run("R", {"uid": "b"}, DESCRIPTOR)
    store._call(lambda: None, 30)  # the writer has handled the open
    go = _hold_then_kill(store, monkeypatch)  # the rows: acknowledged, never committed
    new = [_row(s, distance=2.0) for s in (1, 2, 3)]
    assert store.add_events("R", new, on_stored=lambda: acked.append(1)) == [True] * 3
    _crash(store, go)
    caplog.clear()
    with AnalysisStore(directory, journal=True) as store:  # the next start
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        errors = store.stats()["errors"]
    assert (said, len(acked), errors) == (1, 3, 1)
    assert meta["start"]["uid"] == "b" and [int(s) for s in frame["seq_num"]] == [1, 2, 3]
    assert list(frame["distance"]) == [2.0] * 3
    key = "R/damaged-1"
    assert _kept(directory) == ([(key, *record[0])], [(key, *row) for row in rows])
    assert any(f"set aside as {key}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dropped_by", ["drop_run", "open_run"])
def test_a_damaged_record_is_kept_when_a_superseded_copy_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dropped_by: str
) -> None:
    """Run R's journal record is damaged. Copy b of R is opened without the journal (its
    write fails), so what the journal holds of R is an older copy's, superseded: the writer
    drops it when it reaches b's open (``drop_run``) or, that drop failing, the next
    journalled open replaces it (``open_run(fresh=True)``). Before, either deleted the
    damaged record and its rows: what a person was told to look at was gone, and the next
    start said nothing. Now it is set aside as at a reopen (R/damaged-1), kept and said."""
    directory = tmp_path / "s"
    record, rows = _damaged_record(directory)
    _fail_first(monkeypatch, "open_run")  # b: unjournalled
    if dropped_by == "open_run":
        _fail_first(monkeypatch, "drop_run")  # the writer's drop fails: c's open replaces
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "b"}, DESCRIPTOR)
        store._call(lambda: None, 30)  # the writer has handled b's open, and its drop
        store.open_run("R", {"uid": "c"}, DESCRIPTOR)  # journalled: a record of its own
        assert store.add_events("R", [_row(s, distance=2.0) for s in (1, 2, 3)]) == [True] * 3
        store.close_run("R", {"uid": "c-stop", "exit_status": "success"})
        assert store.flush(30)
        frame = read_analysis(store, "R")[1]
    key = "R/damaged-1"
    assert _kept(directory) == ([(key, *record[0])], [(key, *row) for row in rows])
    assert [int(s) for s in frame["seq_num"]] == [1, 2, 3]
    with AnalysisStore(directory, journal=True) as store:  # the next start says it
        assert store.flush(30)
        assert store.stats()["errors"] == 1


def test_a_finish_queued_after_a_redelivered_open_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The raw start of a run a killed predecessor left open is redelivered while
    ``finish_run`` of it journals its stop (another thread): the open is queued before the
    finish, so the writer meets a finish of a run open here. Before, that was logged as an
    error ('finish of run R that is open or absent') and counted in ``errors`` (the alert)
    for a harmless race: the new copy owns the run and writes its own stop. Now the finish
    is left to that copy, and said at INFO."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:  # closed with R open, as if killed
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
    real = Journal.close_run
    store = AnalysisStore(directory, journal=True)

    def open_in_the_gap(self: Journal, raw_uid: str, *args: Any, **kw: Any) -> Any:
        monkeypatch.setattr(Journal, "close_run", real)
        store.open_run("R", {"uid": "a2"}, DESCRIPTOR)
        return real(self, raw_uid, *args, **kw)

    try:
        monkeypatch.setattr(Journal, "close_run", open_in_the_gap)
        store.finish_run("R", {"uid": "old-stop", "exit_status": "fail", "interrupted": True})
        store._call(lambda: None, 30)  # the writer has handled the open, then the finish
        errors = store.stats()["errors"]
        store.close_run("R", {"uid": "a2-stop", "exit_status": "success"})
        assert store.flush(30)
        meta = read_analysis(store, "R")[0]
    finally:
        store.close()
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert (errors, said, meta["start"]["uid"], meta["stop"]["uid"]) == (0, [], "a2", "a2-stop")
