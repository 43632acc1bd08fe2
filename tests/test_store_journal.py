"""The analysis store's write-ahead journal: rows acknowledged at once, replayed after a crash."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row
from store_helpers import failing_appends

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_schema import column_types, row_fits, schema_for_descriptor
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def test_rows_are_acknowledged_from_the_journal_while_the_table_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xasflow.adapters.tiled_writer as tw

    made = threading.Event()
    real = tw.attach_run

    def slow_attach(root: Any, run: Any, **kw: Any) -> None:  # the catalog takes its time
        assert made.wait(30)
        real(root, run, **kw)

    monkeypatch.setattr(tw, "attach_run", slow_attach)
    acked: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
        for seq in (1, 2, 3):
            row = _row(seq, motifs=np.array([0.5, 0.3, 0.2]), cn=np.int64(4))
            assert store.add_event("run-a", row, on_stored=lambda s=seq: acked.append(s))
        # durable in the journal: acknowledged although the table does not exist yet
        assert acked == [1, 2, 3] and store.stats()["journalled"] == 3
        assert store.stats()["journal_rows"] == 3  # exported as xasflow_store_journal_rows
        assert Journal(tmp_path / "s" / JOURNAL_FILE).counts()["journal_rows"] == 3
        made.set()
        store.close_run("run-a", {"uid": "a-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        meta, frame = read_analysis(store, "run-a")
    assert list(frame["seq_num"]) == [1, 2, 3] and list(frame["cn"]) == [4, 4, 4]
    assert frame["motifs"][0] == [0.5, 0.3, 0.2] and meta["stop"]["exit_status"] == "success"
    # the catalog holds it all: nothing is left to replay
    assert Journal(tmp_path / "s" / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}


def test_a_row_that_will_not_fit_is_never_acknowledged(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.open_run("run-c", {"uid": "c-start"}, DESCRIPTOR)
        acked: list[int] = []
        for seq, cn in ((1, 4), (2, "four"), (3, 6), (4, True)):
            store.add_event("run-c", _row(seq, cn=cn), on_stored=lambda s=seq: acked.append(s))
        assert store.flush(timeout=30)
        assert sorted(acked) == [1, 3] and store.stats()["journalled"] == 2
        _, frame = read_analysis(store, "run-c")
    assert list(frame["cn"]) == [4, 6]


def test_row_fits_follows_the_column_types() -> None:
    types = column_types(*schema_for_descriptor(DESCRIPTOR))
    assert row_fits(_row(1, motifs=[1, "x"]), types)
    assert row_fits({"seq_num": np.int64(3), "cn": None, "distance": np.float32(2.0)}, types)
    assert not row_fits(_row(1, cn=2.5), types)  # a float in an integer column
    assert not row_fits(_row(1, distance=True), types)  # a boolean is not a number here
    assert not row_fits(_row(1, cn=2**70), types)  # beyond int64
    assert not row_fits(_row(1, cn=np.uint64(2**64 - 1)), types)  # numpy's too: Arrow refuses
    assert row_fits(_row(1, cn=np.uint64(4)), types)
    assert not row_fits(_row(1, status=3), types)
    assert not row_fits({"unknown": 1}, types)


def test_what_a_killed_process_left_in_the_journal_is_replayed(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with AnalysisStore(directory) as store:  # run-b's first row reached the catalog
        store.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
        assert store.add_event("run-b", _row(1))
        assert store.flush(timeout=30)
    journal = Journal(directory / JOURNAL_FILE)  # as the killed process left it
    journal.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
    assert journal.add("run-a", [_row(s, motifs=[0.1, 0.2, 0.7]) for s in (1, 2, 3)]) == [True] * 3
    journal.close_run("run-a", {"uid": "a-stop", "exit_status": "success"})
    journal.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
    assert journal.add("run-b", [_row(1), _row(2)]) == [True, True]  # row 1: in the catalog
    journal.close()

    with AnalysisStore(directory, journal=True) as store:
        unfinished = store.unfinished_runs()
        stats = store.stats()
        meta_a, frame_a = read_analysis(store, "run-a")
        _, frame_b = read_analysis(store, "run-b")
        assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 1, "journal_rows": 0}
        store.finish_run(
            "run-b", {"uid": "b-stop", "exit_status": "abort", "reason": "interrupted"}
        )
        assert store.flush(timeout=30)
    assert stats["replayed"] == 5 and stats["duplicates"] == 1 and stats["stored"] == 4
    assert meta_a["start"] == {"uid": "a-start"} and meta_a["stop"]["exit_status"] == "success"
    assert list(frame_a["seq_num"]) == [1, 2, 3] and frame_a["motifs"][2] == [0.1, 0.2, 0.7]
    assert list(frame_b["seq_num"]) == [1, 2]  # stored once
    # run-b had no stop: the daemon's recovery sees it with its rows, and ends it
    assert [(u["raw_uid"], u["rows"]) for u in unfinished] == [("run-b", 2)]
    assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}


def test_journal_rows_round_trip_as_msgpack_or_json(tmp_path: Path) -> None:
    """Rows are journalled as msgpack; one msgpack cannot hold (an integer beyond 64 bits)
    as JSON text, and JSON rows of an older journal read back the same way."""
    journal = Journal(tmp_path / JOURNAL_FILE)
    journal.open_run("raw", {"uid": "s"}, DESCRIPTOR)
    rows = [
        _row(1, distance=float("nan"), flags="a,b", weird=np.float64(2.5), n=np.int64(7)),
        _row(2, big=2**70),
    ]
    assert journal.add("raw", rows) == [True, True]
    stored = dict(journal._db.execute("SELECT seq, typeof(row) FROM rows").fetchall())
    assert stored == {1: "blob", 2: "text"}
    journal._db.execute(  # a row as an older journal wrote it
        "INSERT INTO rows (raw_uid, seq, row) VALUES ('raw', 3, ?)", ('{"seq_num": 3, "cn": 6}',)
    )
    (run,) = journal.pending()
    first, second, third = run.rows
    assert first["seq_num"] == 1 and first["weird"] == 2.5 and first["n"] == 7
    assert np.isnan(first["distance"]) and first["flags"] == "a,b"
    assert second["big"] == 2**70 and third == {"seq_num": 3, "cn": 6}
    journal.close()


def test_the_callers_connection_leaves_checkpoints_to_the_writers(tmp_path: Path) -> None:
    """Rows journalled on the callers' connection (the processing thread) stay in the log, and
    the writer's connection copies them into the database file at its next commit: the
    processing thread never pays for a checkpoint (4-6 ms each) while the writer keeps up."""
    from xasflow.adapters.store_journal import CALLER_CHECKPOINT_PAGES

    path = tmp_path / JOURNAL_FILE
    caller, writer = Journal(path, CALLER_CHECKPOINT_PAGES), Journal(path)
    caller.open_run("r", {"uid": "r"}, {"uid": "d"})
    empty = path.stat().st_size
    blob = "x" * 2000
    for page in range(160):  # ~5 MB of rows: past SQLite's default 1,000-page threshold
        rows = [{"seq_num": page * 16 + k + 1, "blob": blob} for k in range(16)]
        caller.add("r", rows)
    assert path.stat().st_size == empty  # nothing copied out of the log by the caller
    writer.moved("r", [1])
    assert path.stat().st_size > 4_000_000  # the writer's commit checkpointed
    assert caller.counts()["journal_rows"] == 160 * 16 - 1
    caller.close()
    writer.close()


def test_moved_forgets_exactly_the_rows_named(tmp_path: Path) -> None:
    """Rows are inserted in one statement per few hundred and forgotten by spans of
    consecutive seq_nums: a batch with gaps, repeats and disorder forgets only those rows."""
    journal = Journal(tmp_path / JOURNAL_FILE)
    journal.open_run("raw", {"uid": "s"}, DESCRIPTOR)
    journal.open_run("other", {"uid": "o"}, DESCRIPTOR)
    assert all(journal.add("raw", [_row(q) for q in range(1, 701)]))  # three statements
    journal.add("other", [_row(q) for q in range(1, 11)])
    assert journal.counts()["journal_rows"] == 710
    journal.moved("raw", [5, 3, 4, 4, 10, 11, 12, 600, *range(100, 400)])
    left = {run.raw_uid: [r["seq_num"] for r in run.rows] for run in journal.pending()}
    gone = {3, 4, 5, 10, 11, 12, 600, *range(100, 400)}
    assert left["raw"] == [q for q in range(1, 701) if q not in gone]
    assert left["other"] == list(range(1, 11))
    journal.moved("raw", [])
    assert journal.counts()["journal_rows"] == 710 - len(gone)
    journal.close()


def test_withdraw_leaves_a_record_as_open_run_found_it(tmp_path: Path) -> None:
    """A start the store refused (it was closing) is withdrawn: a new record goes (unless
    rows were journalled under it), a reopened one gets back the stop it had."""
    journal = Journal(tmp_path / JOURNAL_FILE)
    prior = journal.open_run("new", {"uid": "n"}, DESCRIPTOR)
    journal.withdraw("new", prior)
    journal.open_run("stopped", {"uid": "s"}, DESCRIPTOR)
    journal.close_run("stopped", {"uid": "s-stop", "exit_status": "success"})
    reopened = journal.open_run("stopped", {"uid": "s2"}, DESCRIPTOR)
    assert [r.stop for r in journal.pending()] == [None]  # open again, until withdrawn
    journal.withdraw("stopped", reopened)
    with_rows = journal.open_run("rows", {"uid": "r"}, DESCRIPTOR)
    journal.add("rows", [_row(1)])
    journal.withdraw("rows", with_rows)
    left = {run.raw_uid: (run.stop, len(run.rows)) for run in journal.pending()}
    journal.close()
    assert (prior.existed, reopened.existed) == (False, True)
    assert left == {"stopped": ({"uid": "s-stop", "exit_status": "success"}, 0), "rows": (None, 1)}


def test_a_stop_counts_as_journalled_only_in_a_record_of_its_run(tmp_path: Path) -> None:
    """Journal.close_run of a run the journal has no record of records nothing. Before, it
    said nothing either, and the store's finish_run (the stop recovery gives a run a killed
    predecessor left open, its rows all in the catalog) told the writer the journal held
    the stop, so the writer took the stop for one the journal could replay."""
    stop = {"uid": "x-stop", "exit_status": "fail", "interrupted": True}
    journal = Journal(tmp_path / JOURNAL_FILE)
    journal.open_run("run-a", {"uid": "a"}, DESCRIPTOR)
    answers = (journal.close_run("run-a", stop), journal.close_run("nobody", stop))
    held = [(run.raw_uid, run.stop) for run in journal.pending()]
    journal.close()
    assert answers == (True, False) and held == [("run-a", stop)]
    directory = tmp_path / "s"
    with AnalysisStore(directory) as store:  # a predecessor without the journal left R open
        store.open_run("R", {"uid": "r"}, DESCRIPTOR)
        store.add_events("R", [_row(1)])
    told: list[bool] = []
    with AnalysisStore(directory, journal=True) as store:
        real = store._finish

        def finish(raw_uid: str, stop_doc: dict, journalled: bool, **kw: Any) -> None:
            told.append(journalled)
            real(raw_uid, stop_doc, journalled, **kw)

        store._finish = finish  # type: ignore[method-assign]
        store.finish_run("R", stop)
        assert store.flush(30)
        meta = read_analysis(store, "R")[0]
    assert told == [False] and meta["stop"] == stop


def _seqs(store: AnalysisStore, raw_uid: str) -> list[int]:
    return sorted(int(s) for s in read_analysis(store, raw_uid)[1]["seq_num"])


def test_a_run_closed_and_reopened_at_once_keeps_the_new_copys_rows(tmp_path: Path) -> None:
    """A Kafka partition that comes back replays a handed-over run: its close and the new
    copy's open and rows reach the store in one turn, before the writer has written the
    close. Closing the first copy must not forget the rows journalled for the second: every
    acknowledged row is in the catalog or still in the journal, and the record is open."""
    acked: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=True, flush_interval=30.0) as store:
        store.open_run("R", {"uid": "a1"}, DESCRIPTOR)
        store.add_events("R", [_row(1), _row(2)])
        assert store.flush(30)
        go, busy = threading.Event(), threading.Event()
        blocker = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
        blocker.start()
        assert busy.wait(10)  # the writer is busy: what follows waits in its queue
        store.close_run("R", {"uid": "stop-1", "exit_status": "abort", "reason": "lost"})
        store.open_run("R", {"uid": "a2"}, DESCRIPTOR)
        ack = lambda s: lambda: acked.append(s)  # noqa: E731
        for seq in range(1, 6):
            store.add_event("R", _row(seq), on_stored=ack(seq))
        go.set()
        blocker.join()
        store._call(lambda: None, 30)  # the writer has handled the close and the reopen
        for seq in (6, 7):
            store.add_event("R", _row(seq), on_stored=ack(seq))
        assert acked == [1, 2, 3, 4, 5, 6, 7]
        (run,) = Journal(tmp_path / "s" / JOURNAL_FILE).pending()
        assert run.raw_uid == "R" and run.stop is None  # open again: no stop recorded
        in_journal = {int(r["seq_num"]) for r in run.rows}
        assert set(acked) <= in_journal | set(_seqs(store, "R"))  # a crash now loses none
        assert read_analysis(store, "R")[0]["stop"] is None  # the first copy's stop went
        store.close_run("R", {"uid": "stop-2", "exit_status": "success"})
        assert store.flush(30)
        assert _seqs(store, "R") == [1, 2, 3, 4, 5, 6, 7]
        assert read_analysis(store, "R")[0]["stop"]["uid"] == "stop-2"
    assert Journal(tmp_path / "s" / JOURNAL_FILE).counts() == {
        "journal_runs": 0,
        "journal_rows": 0,
    }


def test_rows_the_catalog_would_not_take_stay_in_the_journal_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose append fails past the retries (a locked or full disk) was acknowledged
    from the journal; the run's close no longer forgets those rows, and the next start
    replays them into the catalog."""
    failing_appends(monkeypatch, error="disk I/O error")  # more than the writer's retries
    acked: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.add_events("R", [_row(s) for s in (1, 2, 3)], on_stored=lambda: acked.append(1))
        assert store.flush(30)
        store.close_run("R", {"uid": "z", "exit_status": "success"})
        assert store.flush(30)
        assert store.stats()["errors"] == 1 and len(acked) == 3
    journal = Journal(tmp_path / "s" / JOURNAL_FILE)
    assert journal.counts() == {"journal_runs": 1, "journal_rows": 3}
    with AnalysisStore(tmp_path / "s", journal=True) as store:  # the next start
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        assert sorted(frame["seq_num"]) == [1, 2, 3] and meta["stop"]["exit_status"] == "success"
    assert journal.counts() == {"journal_runs": 0, "journal_rows": 0}


def test_a_duplicate_raw_start_keeps_a_finished_runs_stop(tmp_path: Path) -> None:
    """A raw start seen again (redelivered, duplicated) makes its table ahead (prepare_run)
    and is then rejected as a duplicate: the finished run it names keeps its stop (clearing
    it made the next start call the run unfinished and write a "fail" stop over it); a run
    opened again for analysis does lose its old stop."""
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.open_run("R", {"uid": "a1"}, DESCRIPTOR)
        store.add_events("R", [_row(1)])
        store.close_run("R", {"uid": "stop-1", "exit_status": "success"})
        store.prepare_run("R", DESCRIPTOR)
        assert store.flush(30)
        assert read_analysis(store, "R")[0]["stop"]["uid"] == "stop-1"
        assert store.unfinished_runs() == []
        store.open_run("R", {"uid": "a2"}, DESCRIPTOR)  # opened again: the old stop goes
        assert store.flush(30)
        assert read_analysis(store, "R")[0]["stop"] is None


@pytest.mark.parametrize("journal", [True, False])
def test_a_replayed_runs_stored_start_is_the_copy_whose_stop_closes_it(
    tmp_path: Path, journal: bool
) -> None:
    """Raw run R is analysed twice (a Kafka partition handed over and back: copy a1 stored
    rows 1-2 and was closed, copy a2 is the replay), with no table made ahead for a2 (its
    ``prepare_run`` failed, or came past the prepared runs' bound). The store keeps each
    result once, keyed on (raw uid, seq_num), in one container per raw run. Before: the
    reopened container kept a1's start, so a2's stop (run_start a2) was stored beside the
    start of another analysis run, and a2's results were listed under a1's uid; with a
    table made ahead, a2's start was written. Now both paths store a2's start with a2's stop."""
    with AnalysisStore(tmp_path / "s", journal=journal) as store:
        store.open_run("R", {"uid": "a1"}, DESCRIPTOR)
        store.add_events("R", [_row(1), _row(2)])
        store.close_run("R", {"uid": "stop-1", "run_start": "a1", "exit_status": "abort"})
        store.open_run("R", {"uid": "a2"}, DESCRIPTOR)
        store.add_events("R", [_row(s) for s in (1, 2, 3, 4)])
        store.close_run("R", {"uid": "stop-2", "run_start": "a2", "exit_status": "success"})
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        assert (meta["start"]["uid"], meta["stop"]["run_start"]) == ("a2", "a2")
        assert sorted(int(s) for s in frame["seq_num"]) == [1, 2, 3, 4]
        assert store.stats()["duplicates"] == 2


def test_the_journal_counts_never_wait_for_a_hung_write(tmp_path: Path) -> None:
    """A write hung in the kernel (its fsync, a stalled disk) holds the journal's lock and the
    database's write lock: the counts read for /metrics come anyway, those committed before
    it (before the fix they waited for the lock, as long as the write hung). A count that
    cannot start (another stuck on the disk) gives the last counts, marked stale."""
    journal = Journal(tmp_path / JOURNAL_FILE)
    journal.open_run("raw", {"uid": "s"}, DESCRIPTOR)
    journal.add("raw", [_row(1), _row(2)])
    with journal._lock:  # the hung write: its transaction open, its lock held
        journal._db.execute("BEGIN")
        journal._db.execute("DELETE FROM rows")
        counted: list[dict[str, int]] = []
        reader = threading.Thread(target=lambda: counted.append(journal.counts()))
        reader.start()
        reader.join(10)
        answered = list(counted)  # while the write hangs
        journal._db.execute("ROLLBACK")
    reader.join()
    assert answered == [{"journal_runs": 1, "journal_rows": 2}]
    assert journal.counts(stale=True) == {**answered[0], "journal_stale": 0}
    with journal._counter._lock:  # a count stuck on the disk
        assert journal.counts(stale=True) == {**answered[0], "journal_stale": 1}
    journal.close()


@pytest.mark.parametrize(
    ("damage", "named", "stored"),
    [
        ("UPDATE rows SET row = x'c1c1' WHERE seq = 2", "run run-a, row seq_num 2", [1, 3]),
        ("UPDATE runs SET start = '{\"uid\": '", "run run-a's record", []),
        ("UPDATE rows SET raw_uid = 'gone'", "3 rows of run gone, which has no record", []),
    ],
    ids=["row", "start", "orphan rows"],
)
def test_what_a_damaged_journal_cannot_give_back_is_said_counted_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, named: str, stored: list[int]
) -> None:
    """A damaged journal at start (a row msgpack cannot read, a start that is not JSON,
    rows whose run record is gone) holds acknowledged results the replay cannot place.
    Before: the start failed with the decoder's error alone (a msgpack FormatError has no
    text: ``xasflow serve`` said 'cannot start the daemon: ' and nothing else), or, for
    orphan rows, the store opened and skipped them without a word or a count. Now the rest
    is replayed, and what cannot be is logged naming the file and what, counted in
    ``errors`` (XasflowStoreNotStoring) and left in the journal for a person."""
    import sqlite3

    directory = tmp_path / "s"
    directory.mkdir()
    journal = Journal(directory / JOURNAL_FILE)
    journal.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
    assert journal.add("run-a", [_row(s) for s in (1, 2, 3)]) == [True] * 3
    journal.close()
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        db.execute(damage)
    with AnalysisStore(directory, journal=True) as store:
        assert store.flush(timeout=30)
        errors = store.stats()["errors"]
        frame = read_analysis(store, "run-a")[1] if "run-a" in store.client() else None
    assert errors == 1  # one thing in the journal it cannot give back
    assert ([] if frame is None else [int(s) for s in frame["seq_num"]]) == stored
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(directory / JOURNAL_FILE) in m and named in m for m in said), said
    with sqlite3.connect(directory / JOURNAL_FILE) as db:  # kept for a person
        left = db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    assert left == (1 if stored else 3)


def test_a_journal_that_is_not_a_database_is_refused_naming_it(tmp_path: Path) -> None:
    """Before: 'file is not a database', without the file's name."""
    from xasflow.adapters.tiled_schema import StoreError

    directory = tmp_path / "s"
    directory.mkdir()
    (directory / JOURNAL_FILE).write_bytes(b"torn " * 2000)
    with pytest.raises(StoreError, match="file is not a database") as refused:  # not opened
        AnalysisStore(directory, journal=True)
    assert str(directory / JOURNAL_FILE) in str(refused.value)


@pytest.mark.parametrize(
    ("column", "value", "what"),
    [
        ("descriptor", {"uid": "d-1", "name": "primary"}, "descriptor has no data_keys"),
        (
            "descriptor",
            {"data_keys": {"cn": {"dtype": "complex"}}},
            "data key 'cn' has unsupported dtype 'complex'",
        ),
        ("descriptor", [1, 2], "descriptor is a list, not a document"),
        ("start", "a-start", "start is a str, not a document"),
        ("stop", [], "stop is a list, not a document"),
        (
            "descriptor",
            {"name": "pri mary", "data_keys": {"cn": {"dtype": "integer"}}},
            "descriptor name 'pri mary' is not usable as a tiled key",
        ),
    ],
    ids=["no data_keys", "dtype", "descriptor list", "start text", "stop list", "stream name"],
)
def test_a_record_that_is_json_but_not_a_run_is_said_counted_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str, value: Any, what: str
) -> None:
    """A run's record whose start, descriptor or stop is JSON but not an event-model document
    the store can open a run with. Before: the store's start failed with the ValueError (or
    TypeError, AttributeError) of the first check it failed, naming neither the journal nor
    the run ('descriptor has no data_keys'), and no other run was replayed. Now it is left
    out and kept, as a record that is not JSON is (ebc6bf7), and the others replayed."""
    import json
    import sqlite3

    directory = tmp_path / "s"
    directory.mkdir()
    journal = Journal(directory / JOURNAL_FILE)
    for uid in ("run-a", "run-b"):
        journal.open_run(uid, {"uid": f"{uid}-start"}, DESCRIPTOR)
        assert journal.add(uid, [_row(s) for s in (1, 2)]) == [True] * 2
        journal.close_run(uid, {"uid": f"{uid}-stop", "exit_status": "success"})
    journal.close()
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        db.execute(f"UPDATE runs SET {column} = ? WHERE raw_uid = 'run-a'", (json.dumps(value),))
    with AnalysisStore(directory, journal=True) as store:
        assert store.flush(timeout=30)
        errors = store.stats()["errors"]
        in_catalog = "run-a" in store.client()
        meta, frame = read_analysis(store, "run-b")
    assert (errors, in_catalog) == (1, False)
    assert [int(s) for s in frame["seq_num"]] == [1, 2] and meta["stop"]["uid"] == "run-b-stop"
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    named = f"run run-a's record ({what})"
    assert any(str(directory / JOURNAL_FILE) in m and named in m for m in said), said
    with sqlite3.connect(directory / JOURNAL_FILE) as db:  # kept for a person
        left = db.execute("SELECT raw_uid, COUNT(*) FROM rows GROUP BY raw_uid").fetchall()
        runs = db.execute("SELECT raw_uid FROM runs").fetchall()
    assert (left, runs) == ([("run-a", 2)], [("run-a",)])
