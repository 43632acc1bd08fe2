"""The embedded tiled analysis store on its own: acknowledgement, idempotency, salvage, restart."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import held_elsewhere
from helpers import store_row as _row
from store_helpers import wrap_metadata_writes

from xasflow.adapters.tiled_store import AnalysisStore, StoreError, read_analysis


def _fill(store: AnalysisStore, raw_uid: str, seqs: list[int]) -> list[int]:
    acked: list[int] = []
    lock = threading.Lock()
    for seq in seqs:

        def ack(seq: int = seq) -> None:
            with lock:
                acked.append(seq)

        assert store.add_event(raw_uid, _row(seq, motifs=[0.5, 0.3, 0.2]), on_stored=ack)
    assert store.flush(timeout=30)
    return acked


def test_rows_are_acknowledged_once_committed_and_read_back(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s", batch_size=4) as store:
        store.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
        acked = _fill(store, "run-a", [1, 2, 3, 4, 5])
        assert sorted(acked) == [1, 2, 3, 4, 5]
        store.close_run("run-a", {"uid": "a-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        stats = store.stats()
        assert stats["stored"] == 5 and stats["queued"] == 0 and stats["duplicates"] == 0
    meta, frame = read_analysis(tmp_path / "s", "run-a")  # from the directory, store closed
    assert meta["stop"]["exit_status"] == "success"
    assert list(frame["seq_num"]) == [1, 2, 3, 4, 5]
    assert frame["motifs"][0] == [0.5, 0.3, 0.2]  # array column decoded from JSON


def test_reading_a_store_drops_only_tileds_version_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """read_analysis starts tiled's app in the user's process: its "Tiled version" line is
    dropped while it starts, and tiled's logger is left as the user had it afterwards."""
    import logging

    with AnalysisStore(tmp_path / "s") as store:
        store.open_run("run-q", {"uid": "q-start"}, DESCRIPTOR)
        _fill(store, "run-q", [1])
    app_logger = logging.getLogger("tiled.server.app")
    with caplog.at_level(logging.INFO, logger="tiled.server.app"):
        read_analysis(tmp_path / "s", "run-q")
        app_logger.info("Tiled version 0.0 (after the read: the user's own logging again)")
    messages = [r.getMessage() for r in caplog.records if r.name == "tiled.server.app"]
    assert messages == ["Tiled version 0.0 (after the read: the user's own logging again)"]
    assert app_logger.filters == []


def test_redelivered_rows_are_acknowledged_but_stored_once_across_restarts(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s") as store:
        store.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
        _fill(store, "run-b", [1, 2, 3])
    # a new process (as after SIGKILL) sees the run unfinished and gets 2..5 again
    with AnalysisStore(tmp_path / "s") as store:
        unfinished = store.unfinished_runs()
        assert [(u["raw_uid"], u["rows"], u["max_seq"]) for u in unfinished] == [("run-b", 3, 3)]
        store.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
        acked = _fill(store, "run-b", [2, 3, 3, 4, 5])
        assert sorted(acked) == [2, 3, 3, 4, 5]  # duplicates acknowledged too
        assert store.stats()["duplicates"] == 3 and store.stats()["stored"] == 2
        _, frame = read_analysis(store, "run-b")
    assert list(frame["seq_num"]) == [1, 2, 3, 4, 5]


def test_a_row_that_does_not_fit_is_dropped_alone_and_never_acknowledged(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s") as store:
        store.open_run("run-c", {"uid": "c-start"}, DESCRIPTOR)
        acked: list[int] = []
        lost: list[int] = []
        for seq, cn in ((1, 4), (2, "four"), (3, 6)):
            store.add_event(
                "run-c",
                _row(seq, cn=cn),
                on_stored=lambda s=seq: acked.append(s),
                on_lost=lambda s=seq: lost.append(s),
            )
        assert store.flush(timeout=30)
        assert sorted(acked) == [1, 3] and lost == [2]
        assert store.stats()["errors"] == 1 and store.stats()["stored"] == 2
        _, frame = read_analysis(store, "run-c")
    assert list(frame["cn"]) == [4, 6]


def test_back_pressure_refuses_and_counts_rows_beyond_max_queue(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s", max_queue=2, flush_interval=30) as store:
        store.open_run("run-d", {"uid": "d-start"}, DESCRIPTOR)
        results = [store.add_event("run-d", _row(seq)) for seq in (1, 2, 3)]
        assert results == [True, True, False]
        assert store.stats()["dropped"] == 1
        with pytest.raises(ValueError, match="not in the descriptor"):
            store.add_event("run-d", {"seq_num": 9, "bogus": 1})
        with pytest.raises(KeyError):
            store.add_event("no-such-run", _row(1))


def test_a_full_store_waits_for_room_when_told_to(tmp_path: Path) -> None:
    """With ``full_wait_s`` a row that finds the store full waits for the writer to make
    room: taken once a commit frees some, a page larger than ``max_queue`` taken whole into
    an empty queue, refused once the wait is over (cut short by ``stop_waiting``), and after
    a refusal nobody waits any more; every wait is counted."""
    with AnalysisStore(tmp_path / "s", max_queue=2, flush_interval=30, full_wait_s=30) as store:
        store.open_run("run-w", {"uid": "w-start"}, DESCRIPTOR)
        assert [store.add_event("run-w", _row(seq)) for seq in (1, 2)] == [True, True]
        commit = threading.Timer(0.3, store.flush, args=(10.0,))
        commit.start()
        assert store.add_event("run-w", _row(3)) is True  # waited for the commit's room
        commit.join()
        assert store.stats()["full_waits"] == 1 and store.stats()["full_wait_ms"] >= 250
        store.flush(10.0)
        page = [_row(seq) for seq in (4, 5, 6)]  # more than max_queue, into an empty queue
        assert store.add_events("run-w", page) == [True] * 3
        assert store.stats()["full_waits"] == 1  # nothing to wait for
        t0 = time.monotonic()
        threading.Timer(0.3, store.stop_waiting).start()
        assert store.add_event("run-w", _row(7)) is False  # the wait cut short: refused
        assert 0.25 <= time.monotonic() - t0 < 10
        store.full_wait_s = 30.0
        assert store.add_event("run-w", _row(8)) is False  # refused at once after a refusal
        stats = store.stats()
        assert (stats["dropped"], stats["full_waits"], store.refused) == (2, 2, 2)
    with AnalysisStore(tmp_path / "s") as again:
        _, frame = read_analysis(again, "run-w")
    assert sorted(frame["seq_num"]) == [1, 2, 3, 4, 5, 6]


def test_a_full_store_refuses_after_its_wait_and_when_it_closes(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s", max_queue=1, flush_interval=30, full_wait_s=0.3) as store:
        store.open_run("run-x", {"uid": "x-start"}, DESCRIPTOR)
        assert store.add_event("run-x", _row(1)) is True
        t0 = time.monotonic()
        assert store.add_event("run-x", _row(2)) is False  # nothing commits within 0.3 s
        assert time.monotonic() - t0 >= 0.29 and store.stats()["full_wait_ms"] >= 290
    with AnalysisStore(tmp_path / "t", max_queue=1, flush_interval=30, full_wait_s=30) as store:
        store.open_run("run-y", {"uid": "y-start"}, DESCRIPTOR)
        assert store.add_event("run-y", _row(1)) is True
        closing = threading.Timer(0.3, store.close)
        closing.start()
        with pytest.raises(StoreError, match="closed"):
            store.add_event("run-y", _row(2))
        closing.join()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="full_wait_s"):
            AnalysisStore(tmp_path / "u", full_wait_s=bad)


def test_one_writer_per_store_directory(tmp_path: Path) -> None:
    with (
        AnalysisStore(tmp_path / "s"),
        pytest.raises(StoreError, match="already open in this process"),
    ):
        AnalysisStore(tmp_path / "s")


def test_a_second_process_on_a_store_directory_is_refused_naming_its_pid(tmp_path: Path) -> None:
    """Another process writes the store (its flock on ``.writer.lock``): opening it here is
    refused with the holder's pid, so an operator knows which process to stop; once that
    process is gone (even killed) the store opens here."""
    setup = (
        "from xasflow.adapters.tiled_store import AnalysisStore\n"
        f"store = AnalysisStore(Path({str(tmp_path / 's')!r}))"
    )
    with (
        held_elsewhere(setup) as holder,
        pytest.raises(StoreError, match=rf"another process \(pid {holder.pid}\)"),
    ):
        AnalysisStore(tmp_path / "s")
    AnalysisStore(tmp_path / "s").close()


def test_a_table_prepared_at_the_raw_start_is_adopted_by_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xasflow.adapters.tiled_writer as ts

    attached: list[str] = []
    real = ts.attach_run
    monkeypatch.setattr(
        ts,
        "attach_run",
        lambda root, run, **kw: (attached.append(run.raw_uid), real(root, run, **kw)),
    )
    with AnalysisStore(tmp_path / "s") as store:
        store.prepare_run("run-e", DESCRIPTOR)
        store.prepare_run("run-e", DESCRIPTOR)  # twice (a redelivered start): made once
        assert store.flush(timeout=30) and attached == ["run-e"]
        # the run's table exists before its analysis starts; its start is not known yet
        assert store.client()["run-e"].metadata["start"] is None
        store.open_run("run-e", {"uid": "e-start"}, DESCRIPTOR)
        acked = _fill(store, "run-e", [1, 2])
        assert attached == ["run-e"] and sorted(acked) == [1, 2]  # adopted, not made again
        store.close_run("run-e", {"uid": "e-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        meta, frame = read_analysis(store, "run-e")
    assert meta["start"] == {"uid": "e-start"} and meta["stop"]["exit_status"] == "success"
    assert list(frame["seq_num"]) == [1, 2]


def test_the_out_of_domain_column_reads_back_as_booleans(tmp_path: Path) -> None:
    """A run with a rejected row keeps ``out_of_domain`` a boolean column: the rejected row
    holds False, not null (tiled reads a boolean column with nulls back as text), and tells
    itself apart by ``status``."""
    from xasflow.daemon.analysis_rows import DATA_KEYS, rejected_row

    desc = {"uid": "d-2", "name": "primary", "data_keys": DATA_KEYS}
    ok = {**rejected_row(1, ""), "status": "ok", "reason": "", "cn": 4}
    rows = [ok, {**ok, "out_of_domain": True}, rejected_row(3, "no_model", "no bundle")]
    with AnalysisStore(tmp_path / "s", batch_size=3) as store:
        store.open_run("run-r", {"uid": "r-start"}, desc)
        for seq, data in enumerate(rows, start=1):
            assert store.add_event("run-r", {"seq_num": seq, "time": 1.0 + seq, **data})
        store.close_run("run-r", {"uid": "r-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
    _, frame = read_analysis(tmp_path / "s", "run-r")
    assert frame["out_of_domain"].dtype == bool
    assert frame["out_of_domain"].tolist() == [False, True, False]
    answers = frame[(frame["status"] == "ok") & ~frame["out_of_domain"]]
    assert answers["seq_num"].tolist() == [1]


def test_a_runs_metadata_writes_keep_no_revisions(tmp_path: Path) -> None:
    """A run made ahead gets its start, then its stop, as metadata writes. The catalog holds
    the run's metadata once: tiled's default kept each write's old version as a revision
    row (two full copies of the start and data keys per run, for nobody)."""
    import sqlite3

    from xasflow.adapters.tiled_schema import CATALOG_FILE

    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.prepare_run("run-v", DESCRIPTOR)
        assert store.flush(timeout=30)
        store.open_run("run-v", {"uid": "v-start"}, DESCRIPTOR)
        _fill(store, "run-v", [1])
        store.close_run("run-v", {"uid": "v-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        meta, _ = read_analysis(store, "run-v")
    assert meta["start"] == {"uid": "v-start"} and meta["stop"]["uid"] == "v-stop"
    with contextlib.closing(sqlite3.connect(tmp_path / "s" / CATALOG_FILE)) as db:
        assert db.execute("SELECT COUNT(*) FROM revisions").fetchone() == (0,)


def test_a_run_that_opens_before_its_table_is_made_ahead_is_made_with_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw start's table is made ahead only after ``PREPARE_DELAY_S``: a fly scan's first
    result opens the run within milliseconds, and that open makes it, start included. Before,
    the table was made at once, empty, and its start written by a request more."""
    import xasflow.adapters.tiled_writer as tw

    monkeypatch.setattr(tw, "PREPARE_DELAY_S", 60.0, raising=False)  # the open comes first
    patches: list[Any] = []

    def counted(real: Any, node: Any, metadata_patch: Any, *args: Any, **kwargs: Any) -> Any:
        patches.append([op["path"] for op in metadata_patch or []])
        return real(node, metadata_patch, *args, **kwargs)

    wrap_metadata_writes(monkeypatch, counted)
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.prepare_run("run-f", DESCRIPTOR)
        store.open_run("run-f", {"uid": "f-start"}, DESCRIPTOR)
        assert sorted(_fill(store, "run-f", [1, 2])) == [1, 2]
        store.close_run("run-f", {"uid": "f-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        meta, frame = read_analysis(store, "run-f")
    assert meta["start"] == {"uid": "f-start"} and meta["stop"]["uid"] == "f-stop"
    assert list(frame["seq_num"]) == [1, 2]
    assert patches == [["/stop"]]  # the stop alone: no start written after the table


@pytest.mark.parametrize("key", [".", "..", "a b", ""])
def test_a_key_a_url_cannot_carry_is_refused_at_open(tmp_path: Path, key: str) -> None:
    """A raw uid or stream name of "." or ".." passed the key check before and made the
    catalog routes' URL name the parent container (the run's open then failed in the writer,
    counted, not said at the call); now it is refused where it is given, as a space is."""
    with AnalysisStore(tmp_path / "s") as store:
        with pytest.raises(ValueError, match="not usable as a tiled key"):
            store.open_run(key, {"uid": "k-start"}, DESCRIPTOR)
        with pytest.raises(ValueError, match="not usable as a tiled key"):
            store.open_run("run-k", {"uid": "k-start"}, {**DESCRIPTOR, "name": key or ".."})
        store.open_run("run...k", {"uid": "k-start"}, DESCRIPTOR)  # dots inside a key are fine
        assert store.flush(timeout=30)
