"""The processing loop's micro-batching: it waits for more documents only under load."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import RecordingPipeline

from xasflow.daemon.batching import BatchPolicy, RateMeter
from xasflow.daemon.config import AnalysisConfig, load_config
from xasflow.daemon.counters import Counters
from xasflow.daemon.outputs import ScanSpectrum, SpectrumReady
from xasflow.daemon.processor import Processor


class FakeQueue:
    """``get(timeout)`` over a list; records each timeout asked for."""

    def __init__(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        self.items = list(items)
        self.timeouts: list[float] = []

    def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        self.timeouts.append(timeout)
        return self.items.pop(0) if self.items else None


class ArrivingQueue(FakeQueue):
    """``items`` are queued; ``arriving`` come one per wait (a ``get`` with a timeout > 0)."""

    def __init__(self, items: list[Any], arriving: list[Any]) -> None:
        super().__init__(items)
        self.arriving = list(arriving)

    def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        got = super().get(timeout)
        if got is None and timeout > 0 and self.arriving:
            return self.arriving.pop(0)
        return got


class OneSpectrumPerEvent:
    """An event is one spectrum; an event page of ``n`` rows is ``n`` spectra."""

    def feed(self, name: str, doc: dict[str, Any]) -> list[Any]:
        rows = range(doc["n"]) if name == "event_page" else [doc["i"]] if name == "event" else []
        return [
            SpectrumReady(
                ScanSpectrum("r", i, None, {}, "Cu", "K", "transmission", (1,), 0.0, 0.0)  # type: ignore[arg-type]
            )
            for i in rows
        ]

    def check_timeouts(self) -> list[Any]:
        return []


def _processor(q: FakeQueue, policy: BatchPolicy | None) -> tuple[Processor, RecordingPipeline]:
    rec = RecordingPipeline()
    proc = Processor(
        q.get,
        OneSpectrumPerEvent(),
        rec,
        Counters(),
        AnalysisConfig(),
        batching=policy,  # type: ignore[arg-type]
    )
    return proc, rec


def test_a_lone_spectrum_is_never_held_back() -> None:
    """With no recent traffic the turn takes what is queued and never waits for more."""
    q = FakeQueue([("event", {"i": i}) for i in range(3)])
    proc, _ = _processor(q, None)
    assert len(proc._take(10)) == 3
    assert q.timeouts == [0.05, 0, 0, 0]  # never waits for more once one is in hand


def test_under_load_a_turn_waits_up_to_the_budget_for_more() -> None:
    """At a recent rate that brings ``min_expected`` more within the budget, the turn waits
    (each wait within the budget) until it holds ``target_docs``; below that rate it does not."""
    policy = BatchPolicy(max_batch_delay_ms=5.0, min_expected=2.0, target_docs=4)
    events = [("event", {"i": i}) for i in range(6)]
    q = ArrivingQueue(events[:1], events[1:])
    proc, _ = _processor(q, policy)
    proc.rate.add(1000, time.monotonic())  # ~4,000 documents/s just now
    assert len(proc._take(10)) == 4
    assert q.timeouts[:2] == [0.05, 0]  # the one queued, then nothing more queued
    assert len(q.timeouts) == 2 + 3 and all(0 < t <= 0.005 for t in q.timeouts[2:])
    assert q.arriving == events[4:]  # three waits, and it stopped once it held target_docs

    slow = ArrivingQueue(events[:2], events[2:])
    proc, _ = _processor(slow, policy)
    proc.rate.add(1, time.monotonic())  # 4 documents/s: fewer than 2 due within 5 ms
    assert len(proc._take(10)) == 2
    assert slow.timeouts == [0.05, 0, 0]


def test_wait_rule_and_rate_meter() -> None:
    policy = BatchPolicy(max_batch_delay_ms=10.0, min_expected=2.0)
    assert policy.wait_s(100.0) == 0.0  # a 100 Hz quick-XAS scan: 1 due in 10 ms
    assert policy.wait_s(200.0) == pytest.approx(0.010)
    assert BatchPolicy(max_batch_delay_ms=0.0).wait_s(1e6) == 0.0
    meter = RateMeter(tau_s=0.25)
    t0 = time.monotonic()
    for k in range(200):  # 1,000 documents/s for 2 s (8 time constants): the rate converges
        meter.add(10, t0 + k / 100.0)
    assert meter.add(0, t0 + 2.0) == pytest.approx(1000.0, rel=0.05)
    assert meter.add(0, t0 + 4.0) < 1000.0 * math.exp(-7)  # 2 s idle: gone


def test_batching_is_configurable() -> None:
    cfg = load_config(None, {"XASFLOW__ANALYSIS__BATCHING__MAX_BATCH_DELAY_MS": "0"})
    assert cfg.analysis.batching.max_batch_delay_ms == 0.0
    assert load_config(None, {}).analysis.batching == BatchPolicy()


def test_spectra_go_to_the_pipeline_in_chunks_of_max_spectra() -> None:
    q = FakeQueue([])
    proc, rec = _processor(q, BatchPolicy(max_spectra=4))
    proc._turn([("event", {"i": i}) for i in range(10)], check=False)
    assert [len(b) for b in rec.batches] == [4, 4, 2]
    rec.batches.clear()
    proc._turn([("event_page", {"n": 10})], check=False)  # one page of 10 fly spectra
    assert [len(b) for b in rec.batches] == [4, 4, 2]


def test_policy_rejects_negative_or_huge_delays() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_delay_ms=-1)
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_delay_ms=1000)


class InFlightPipeline(RecordingPipeline):
    """As with a preparation process: a batch is not ready until the processor ends it."""

    worker = object()

    def begin(self, outputs: list[Any]) -> SimpleNamespace:
        super().begin(outputs)
        return SimpleNamespace(items=outputs, ready=lambda worker: False)

    def end(self, batch: SimpleNamespace, *, advise: bool = True) -> list[Any]:
        return [("event", {"i": [o.spectrum.index for o in batch.items]})]


def test_with_a_batch_in_flight_results_leave_in_order_and_none_before_a_commit() -> None:
    """One batch stays in flight while the next is assembled; documents still leave in the
    order taken, and ``on_processed`` (Kafka's commit rule) never runs with one in flight."""
    pipeline = InFlightPipeline()
    proc = Processor(
        FakeQueue([]).get,
        OneSpectrumPerEvent(),
        pipeline,
        Counters(),
        AnalysisConfig(),  # type: ignore[arg-type]
    )
    emitted: list[list[int]] = []
    proc.outlet.sinks.append(lambda name, doc: emitted.append(doc["i"]))
    proc._turn([("event", {"i": 0}), ("event", {"i": 1})], check=False)
    assert emitted == [] and len(proc.outlet.pending) == 1  # in flight
    proc._turn([("event", {"i": 2})], check=False)
    assert emitted == [[0, 1]]  # the one before ended when the next began
    in_flight_at_commit: list[int] = []
    proc.on_processed = lambda: in_flight_at_commit.append(len(proc.outlet.pending))
    proc._turn([("event", {"i": 3})], check=False)
    proc._after_turn()
    assert emitted == [[0, 1], [2], [3]] and in_flight_at_commit == [0]


def test_serve_sets_the_configured_gil_switch_interval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """``xasflow serve`` hands the GIL over within ``analysis.switch_interval_ms`` (1 ms by
    default, not Python's 5 ms); the setting is bounded."""
    import sys

    from xasflow.daemon import commands
    from xasflow.daemon.config import ConfigError
    from xasflow.daemon.service import Daemon

    set_to: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", set_to.append)
    monkeypatch.setattr(Daemon, "__init__", lambda self, config: None)
    monkeypatch.setattr(Daemon, "serve_forever", lambda self: None)
    config = tmp_path / "x.yaml"
    config.write_text("analysis:\n  switch_interval_ms: 0.5\n")
    args = SimpleNamespace(config=str(config), check=False, log_level="warning")
    assert commands.cmd_serve(args) == 0  # type: ignore[arg-type]
    config.write_text("{}\n")
    assert commands.cmd_serve(args) == 0  # type: ignore[arg-type]
    assert set_to == [0.0005, 0.001]
    for bad in ("0", "1000"):
        with pytest.raises(ConfigError):
            load_config(None, {"XASFLOW__ANALYSIS__SWITCH_INTERVAL_MS": bad})
