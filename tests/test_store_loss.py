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
from helpers import store_row

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
    from tiled.adapters.sql import SQLAdapter

    real = SQLAdapter.append_partition
    failures = {"left": 4}  # more than the writer's retries: the first batch is lost

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError("database is locked")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SQLAdapter, "append_partition", flaky)
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
        for seq in (1, 2, 3):
            doc = _page(seq)
            writer("event_page", doc)
            handed[doc["uid"]] = time.monotonic()
            gate("event_page", doc)
            assert store.flush(30)
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


def test_rows_of_a_run_whose_table_would_not_open_are_told_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xasflow.adapters.tiled_writer as tw

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tw, "attach_run", refuse)
    monkeypatch.setattr(tw, "with_retries", lambda action, what: action())  # no back-off waits
    lost: list[int] = []
    stored: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=False) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.add_events(
            "R",
            [store_row(s) for s in (1, 2, 3)],
            on_stored=lambda: stored.append(1),
            on_lost=lambda: lost.append(1),
        )
        assert store.flush(30)
        assert len(lost) == 3 and stored == []
        assert store.stats()["queued"] == 0


def test_journalled_rows_are_stored_once_journalled_never_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the journal a row is stored for good once journalled: a catalog that then refuses
    it loses nothing (the next start replays it), so ``on_lost`` is never called."""
    import xasflow.adapters.tiled_writer as tw

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tw, "attach_run", refuse)
    monkeypatch.setattr(tw, "with_retries", lambda action, what: action())
    lost: list[int] = []
    stored: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.add_events(
            "R",
            [store_row(s) for s in (1, 2)],
            on_stored=lambda: stored.append(1),
            on_lost=lambda: lost.append(1),
        )
        assert store.flush(30)
        assert len(stored) == 2 and lost == []
