"""The daemon's output: the store fan-out, the commit gate, output.after_store, losses exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from event_model import compose_run
from helpers import Harness, LoopbackProxy, daemon_config, fly_scan, publish, transmission, wait_for

from xasflow.adapters.tiled_store import read_analysis


def test_store_fanout_keeps_the_primary_stream_only() -> None:
    from xasflow.adapters.store_writer import StoreWriter

    class FakeStore:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def open_run(self, raw_uid: str, start: dict, descriptor: dict) -> None:
            self.calls.append(("open", raw_uid, descriptor["name"]))

        def add_events(self, raw_uid: str, rows: list[dict], **acks: Any) -> list[bool]:
            self.calls.extend(("row", raw_uid, row["seq_num"], row["cn"]) for row in rows)
            return [True] * len(rows)

        def close_run(self, raw_uid: str, stop: dict) -> None:
            self.calls.append(("close", raw_uid, stop["exit_status"]))

    store = FakeStore()
    fan = StoreWriter(store)
    run = compose_run(metadata={"raw_uid": "raw-1"})
    keys = {"cn": {"source": "x", "dtype": "integer", "shape": []}}
    primary = run.compose_descriptor(name="primary", data_keys=keys)
    advice = run.compose_descriptor(
        name="recommendations", data_keys={"next": {"source": "x", "dtype": "string", "shape": []}}
    )
    fan("start", run.start_doc)
    fan("descriptor", primary.descriptor_doc)
    fan("event", primary.compose_event(data={"cn": 4}, timestamps={"cn": 0.0}))
    fan("descriptor", advice.descriptor_doc)
    fan("event", advice.compose_event(data={"next": "rescan"}, timestamps={"next": 0.0}))
    fan(
        "event_page",
        primary.compose_event_page(
            data={"cn": [2, 6]}, timestamps={"cn": [0.0, 0.0]}, seq_num=[2, 3]
        ),
    )
    fan("stop", run.compose_stop())
    assert store.calls == [
        ("open", "raw-1", "primary"),
        ("row", "raw-1", 1, 4),
        ("row", "raw-1", 2, 2),
        ("row", "raw-1", 3, 6),
        ("close", "raw-1", "success"),
    ]
    assert fan.unstored == 0 and fan.open_runs == 0


@pytest.mark.parametrize("journal", [False, True])
def test_after_store_publishes_nothing_the_store_does_not_hold(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path, journal: bool
) -> None:
    """With output.after_store, every result on the bus is already acknowledged by the store
    (issue 13: "published but never stored"); the stop arrives only after its rows. Checked
    as each document goes to the publisher: without the journal a row is acknowledged only
    when the catalog commits it (0.3 s batches), so a gate that did not hold would publish
    rows not yet acknowledged; with it, the journal acknowledges them first."""
    cfg = daemon_config(models_dir, proxy, tmp_path / "store").with_updates(
        {
            "output": {"after_store": True},
            "storage": {"flush_interval_s": 0.3, "journal": journal},
        }
    )
    h = Harness(cfg, proxy)
    try:
        gate = h.daemon.parts.gate
        assert gate is not None
        publish_now = gate.publish
        seen: list[tuple[int, int]] = []  # (rows published so far, acknowledged then)
        stored: set[str] = set()  # descriptors of the stored stream (recommendations are not)

        def publish_checked(name: str, doc: dict[str, Any]) -> None:
            if name == "descriptor" and doc.get("name") == "primary":
                stored.add(doc["uid"])
            if name in ("event", "event_page") and doc["descriptor"] in stored:
                rows = len(doc["seq_num"]) if name == "event_page" else 1
                published = (seen[-1][0] if seen else 0) + rows
                seen.append((published, h.daemon.view.store_stats()["acknowledged"]))
            publish_now(name, doc)

        gate.publish = publish_checked
        fly_e = np.linspace(8800.0, 9400.0, 600)
        uid, docs = fly_scan(fly_e, [transmission(fly_e, seed=i) for i in range(6)])
        publish(h.pub, docs)
        run = h.results.wait([uid])[uid]
        assert seen and seen[-1][0] == 6
        assert all(acked >= published for published, acked in seen), seen
        stats = h.daemon.view.store_stats()
        assert stats["acknowledged"] == 6 and stats["journalled"] == (6 if journal else 0)
        assert h.daemon.parts.store is not None and h.daemon.parts.store.flush(timeout=30)
        _md, rows = read_analysis(tmp_path / "store", uid)
        assert len(rows) == len(run["events"]) == 6
        out = h.daemon.view.output_stats()
        assert out["after_store.released_unstored"] == 0 and out["after_store.held"] == 0
    finally:
        h.close()


def test_a_publisher_refusal_without_the_gate_is_counted_on_metrics(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``output.after_store: false`` the processing loop hands documents to the
    publisher itself; one it refuses (raises) is counted as
    ``xasflow_output_dropped_total{cause="publish_error"}``, as the commit gate's are, so
    XasflowOutputDropped sees it. Before, it was only logged: the count stayed 0."""
    from xasflow.adapters.zmq_bus import ZmqDocumentPublisher
    from xasflow.daemon.http import _output_losses

    cfg = daemon_config(models_dir, proxy, tmp_path / "store").with_updates(
        {"output": {"after_store": False}}
    )
    h = Harness(cfg, proxy)
    try:
        assert h.daemon.parts.gate is None
        daemon_publisher, send = h.daemon.parts.publisher, ZmqDocumentPublisher.__call__
        refused: list[Any] = []

        def refusing(self: ZmqDocumentPublisher, name: str, doc: dict[str, Any]) -> None:
            if self is daemon_publisher and name in ("event", "event_page"):
                refused.append(doc["uid"])
                raise RuntimeError("the bus refused it")  # a closed socket, an encoding error
            send(self, name, doc)

        monkeypatch.setattr(ZmqDocumentPublisher, "__call__", refusing)
        fly_e = np.linspace(8800.0, 9400.0, 600)
        uid, docs = fly_scan(fly_e, [transmission(fly_e, seed=i) for i in range(3)])
        publish(h.pub, docs)
        h.results.wait([uid])  # the run's stop went out
        dropped = {
            s.labels["cause"]: s.value
            for family in _output_losses(h.daemon.view.output_stats())
            for s in family.samples
            if s.name == "xasflow_output_dropped_total"
        }
        assert refused and dropped["publish_error"] == len(refused)  # pages or events: 1 to 3
        assert h.results.runs()[uid]["events"] == []  # none of the 3 spectra's results went out
    finally:
        h.close()


def test_output_losses_are_exported_by_cause() -> None:
    """What the commit gate and a Kafka producer could not publish reaches /metrics."""
    from xasflow.daemon.http import _output_losses

    stats = {
        "after_store.publish_errors": 2,
        "after_store.dropped_on_close": 5,
        "after_store.released_unstored": 7,
        "after_store.held": 3,
        "delivery_failures": 1,
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in _output_losses(stats)
        for s in family.samples
    }
    assert samples[("xasflow_output_dropped_total", (("cause", "publish_error"),))] == 2
    assert samples[("xasflow_output_dropped_total", (("cause", "held_at_close"),))] == 5
    assert samples[("xasflow_output_dropped_total", (("cause", "delivery_failure"),))] == 1
    assert samples[("xasflow_output_released_unstored_total", ())] == 7
    assert samples[("xasflow_output_held", ())] == 3


def test_commit_gate_holds_documents_until_their_rows_commit() -> None:
    from xasflow.adapters.commit_gate import CommitGate

    sent: list[str] = []
    gate = CommitGate(lambda name, doc: sent.append(doc["uid"]), timeout_s=30.0)
    try:
        gate("start", {"uid": "s"})  # no rows before it: goes out at once
        wait_for(lambda: sent == ["s"], "the start")
        gate.row_submitted()
        gate.row_submitted()
        gate("event", {"uid": "e1"})
        gate("stop", {"uid": "x"})
        assert gate.stats()["held"] == 2 and sent == ["s"]  # its rows are not committed
        gate.row_resolved()
        gate.row_resolved()
        wait_for(lambda: sent == ["s", "e1", "x"], "the rest, in order")
    finally:
        gate.close()
    late = CommitGate(lambda name, doc: sent.append(doc["uid"]), timeout_s=0.2)
    try:  # a store that never commits: published after the timeout, and counted
        late.row_submitted()
        late("event", {"uid": "e2"})
        wait_for(lambda: "e2" in sent, "the timed-out document")
        assert late.stats()["released_unstored"] == 1
    finally:
        late.close()
