"""Rows the store accepts and then gives up: each is told lost (never stored), counted, and
resolved at the commit gate, so later results are not held back for a commit that cannot
come (the gate counts rows, and one never resolved shifted every later document)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row, wait_for
from store_helpers import failing_appends

from xasflow.adapters.commit_gate import CommitGate
from xasflow.adapters.store_writer import StoreWriter
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _page(seq: int) -> dict[str, Any]:
    row = store_row(seq, motifs=[0.2, 0.3, 0.5])
    return {
        "uid": f"ev{seq}",
        "descriptor": DESCRIPTOR["uid"],
        "seq_num": [seq],
        "time": [row.pop("time")],
        "timestamps": {},
        "filled": {},
        "data": {k: [v] for k, v in row.items() if k != "seq_num"},
    }


def test_a_failed_batch_is_told_lost_and_does_not_hold_later_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the journal, a batch whose append fails past the retries is lost: its row is
    counted ``lost`` and resolved at the gate; the next results, whose rows commit, go out at
    once and none is counted as released unstored."""
    failing_appends(monkeypatch)  # more than the writer's retries: the first batch is lost
    sent: list[tuple[str, float]] = []
    with AnalysisStore(tmp_path / "s", journal=False, flush_interval=0.05) as store:
        gate = CommitGate(
            lambda name, doc: sent.append((doc["uid"], time.monotonic())),
            timeout_s=30.0,
            commit_now=lambda: store.flush(0.0),
        )
        stored: list[int] = []

        def on_stored() -> None:  # as the daemon's: counted, and resolved at the gate
            stored.append(1)
            gate.row_resolved()

        writer = StoreWriter(store, on_stored=on_stored)
        writer.gate = gate
        for name, doc in (
            ("start", {"uid": "a", "raw_uid": "R", "time": 0.0}),
            ("descriptor", {**DESCRIPTOR, "run_start": "a", "time": 0.0}),
        ):
            writer(name, doc)
            gate(name, doc)
        handed: dict[str, float] = {}
        flushed: list[bool] = []
        for seq in (1, 2, 3):
            doc = _page(seq)
            writer("event_page", doc)
            handed[doc["uid"]] = time.monotonic()
            gate("event_page", doc)
            flushed.append(store.flush(30))
        assert flushed == [False, False, False]  # a row was lost: the loss is not forgotten
        assert gate.drained(10.0)  # all out long before the gate's 30 s timeout
        gate.close(5.0)
        assert writer.lost == 1 and len(stored) == 2
        assert store.stats()["errors"] == 1
        assert gate.stats()["released_unstored"] == 0
        _, frame = read_analysis(store, "R")
    assert list(frame["seq_num"]) == [2, 3]
    assert [uid for uid, _ in sent] == ["a", "d-1", "ev1", "ev2", "ev3"]
    waits = {uid: at - handed[uid] for uid, at in sent if uid in handed}
    assert max(waits.values()) < 10.0


@pytest.mark.parametrize("journal", [False, True])
def test_a_flush_that_waited_for_a_lost_batch_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    """A flush whose commit loses the batch queued before it (the append failing past the
    retries) answers False without the journal: those rows are given up for good, told
    lost, and so does the next flush (they were queued before it too), though its own row
    is stored. With the journal the rows are safe there (replayed at the next start): True.
    Before, both answered True without the journal too, as if every row were committed."""
    failing_appends(monkeypatch)  # more than the writer's retries: the first batch is lost
    with AnalysisStore(tmp_path / "s", journal=journal, flush_interval=30.0) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.flush(30)
        stored, lost = _add_counted(store, [1, 2])  # committed by the flush alone
        first = store.flush(30)
        later_stored, later_lost = _add_counted(store, [3])
        second = store.flush(30)
        stats = store.stats()
    assert (first, second) == (journal, journal)
    assert (len(stored), len(lost)) == ((2, 0) if journal else (0, 2))
    assert (len(later_stored), later_lost, stats["write_lost"]) == (1, [], 0 if journal else 2)


def _no_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run's table fails to open (a full disk), at once (no back-off waits); its
    reattachment after a catalog restart too (adapters.writer_outage)."""
    import xasflow.adapters.tiled_writer as tw
    import xasflow.adapters.writer_outage as wo

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tw, "attach_run", refuse)
    monkeypatch.setattr(wo, "attach_run", refuse)
    monkeypatch.setattr(tw, "with_retries", lambda action, what: action())


def _add_counted(store: AnalysisStore, seqs: list[int]) -> tuple[list[int], list[int]]:
    """Rows of run R handed to the store; the lists its stored and lost callbacks fill."""
    stored: list[int] = []
    lost: list[int] = []
    store.add_events(
        "R",
        [store_row(s) for s in seqs],
        on_stored=lambda: stored.append(1),
        on_lost=lambda: lost.append(1),
    )
    return stored, lost


def test_rows_of_a_run_whose_table_would_not_open_are_told_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_table(monkeypatch)
    with AnalysisStore(tmp_path / "s", journal=False) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        stored, lost = _add_counted(store, [1, 2, 3])
        assert store.flush(30) is False  # the rows queued before it were given up
        assert len(lost) == 3 and stored == []
        assert store.stats()["queued"] == 0


def test_rows_given_up_without_callbacks_count_in_write_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows added with neither callback that the store then gives up (their run's table
    would not open) count in ``write_lost`` as those with callbacks do, so the flush after
    them answers False. Before, only rows with a callback were counted: write_lost 0, and
    the flush said True as if they were stored."""
    _no_table(monkeypatch)
    with AnalysisStore(tmp_path / "s", journal=False) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.add_events("R", [store_row(1), store_row(2)])
        flushed = store.flush(30)
        stats = store.stats()
    assert (flushed, stats["write_lost"], stats["stored"], stats["queued"]) == (False, 2, 0, 0)


def test_journalled_rows_are_stored_once_journalled_never_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the journal a row is stored for good once journalled: a catalog that then refuses
    it loses nothing (the next start replays it), so ``on_lost`` is never called."""
    _no_table(monkeypatch)
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        stored, lost = _add_counted(store, [1, 2])
        assert store.flush(30)
        assert len(stored) == 2 and lost == []


def test_a_journal_that_cannot_forget_moved_rows_still_acknowledges_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows the journal refused carry their acknowledgement to the catalog's commit; when
    the journal then cannot forget the batch, the rows are in the catalog all the same: they
    are told stored (the journal replays them as duplicates), and the store's close does not
    hang on the error."""
    from xasflow.adapters.store_journal import Journal

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise OSError("database is locked")

    store = AnalysisStore(tmp_path / "s", journal=True, flush_interval=30.0)
    try:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.flush(10)
        monkeypatch.setattr(Journal, "add", locked)
        monkeypatch.setattr(Journal, "moved", locked)
        stored, lost = _add_counted(store, [1, 2])
        assert store.flush(30)
        assert len(stored) == 2 and lost == [] and store.stats()["queued"] == 0
        store.add_events("R", [store_row(3)], on_stored=lambda: stored.append(1))
    finally:
        store.close()  # its final commit fails the same way, and close still returns
    assert not store._writer.is_alive() and len(stored) == 3
    _, frame = read_analysis(tmp_path / "s", "R")
    assert sorted(frame["seq_num"]) == [1, 2, 3]


class _Restarting:
    """A catalog supervisor whose process is down until polled; the poll brings it back."""

    restarts = failures = 0

    def __init__(self, root: Any) -> None:
        self.down, self.root = False, root

    def __call__(self) -> bool:
        return not self.down

    def poll(self, now: float) -> Any:
        self.down = False
        return self.root

    def next_check(self, now: float) -> float:
        return now + 1000.0


def test_rows_of_a_run_that_cannot_be_reattached_after_a_catalog_restart_are_told_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AnalysisStore(tmp_path / "s", journal=False, flush_interval=30.0, batch_size=1000)
    try:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.flush(10)
        supervisor = _Restarting(store._root)
        with store._cond:
            store._supervisor = supervisor  # type: ignore[assignment]
        stored, lost = _add_counted(store, [1, 2])
        wait_for(lambda: len(store._runs["R"].pending) == 2, what="the rows pending in R")
        _no_table(monkeypatch)  # the restarted catalog does not take the run back
        with store._cond:
            supervisor.down = True  # the catalog's process dies; the run's stop comes
        store.close_run("R", {"uid": "z", "exit_status": "success"})
        wait_for(lambda: len(lost) == 2, what="the pending rows told lost")
        assert stored == [] and store.stats()["queued"] == 0
    finally:
        store.close()


def test_rows_the_store_will_not_take_are_resolved_at_the_gate(tmp_path: Path) -> None:
    """An event page the store raises on (a key not in the descriptor, the store closing)
    takes none of its rows: they are counted unstored and resolved, so the gate does not
    hold later results for them."""
    with AnalysisStore(tmp_path / "s", journal=False) as store:
        gate = CommitGate(lambda name, doc: None, timeout_s=30.0)
        writer = StoreWriter(store)
        writer.gate = gate
        writer("start", {"uid": "a", "raw_uid": "R", "time": 0.0})
        writer("descriptor", {**DESCRIPTOR, "run_start": "a", "time": 0.0})
        page = _page(1)
        page["data"]["extra"] = [1]
        writer("event_page", page)
        assert writer.unstored == 1
        assert (gate._submitted, gate._resolved) == (1, 1)
        gate.close(1.0)


@pytest.mark.parametrize("case", ["write_fails", "write_fails_journalled", "does_not_fit"])
def test_results_the_store_lost_hold_the_kafka_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A result the store accepted and then lost to a catalog that would not take it must not
    be committed past on Kafka: a later flush finds nothing failing (the batch is gone), so
    the Kafka input's commit hold names the loss, and a restart redelivers it. A journalled
    row is not lost (the next start replays it), and a row that does not fit its columns
    would fail the same way when redelivered (holding then would redeliver it for ever):
    no hold for either, though both are told lost or counted."""
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.service import Daemon

    if case != "does_not_fit":
        failing_appends(monkeypatch, times=1_000)  # every try of this test's appends
    page = _page(1)
    if case == "does_not_fit":
        page["data"]["cn"] = ["four"]  # a word in an integer column
    daemon = Daemon(DaemonConfig.model_validate({"input": {"kind": "kafka"}}))
    journal = case == "write_fails_journalled"
    with AnalysisStore(tmp_path / "s", journal=journal, flush_interval=0.05) as store:
        writer = StoreWriter(store)
        daemon.parts.store, daemon.parts.writer = store, writer
        writer("start", {"uid": "a", "raw_uid": "R", "time": 0.0})
        writer("descriptor", {**DESCRIPTOR, "run_start": "a", "time": 0.0})
        writer("event_page", page)
        store.flush(30)  # the failed batch has left the queue
        stats = store.stats()
        hold = daemon._commit_hold()
    assert stats["queued"] == 0 and stats["errors"] >= 1 and stats["dropped"] == 0
    if case == "write_fails":
        assert writer.lost == 1 and stats["write_lost"] == 1
        assert hold is not None and "lost 1 results" in hold and "restart" in hold
    else:
        assert writer.lost == (case == "does_not_fit") and stats["write_lost"] == 0
        assert hold is None
