"""The processing loop's micro-batching bounds (``BatchPolicy``)."""

from __future__ import annotations

from typing import Any

import pytest

from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.outputs import ScanSpectrum, SpectrumReady
from xasflow.daemon.processor import BatchPolicy, Processor


class FakeQueue:
    """``get(timeout)`` over a list; records each timeout asked for."""

    def __init__(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        self.items = list(items)
        self.timeouts: list[float] = []

    def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        self.timeouts.append(timeout)
        return self.items.pop(0) if self.items else None


class OneSpectrumPerEvent:
    def feed(self, name: str, doc: dict[str, Any]) -> list[Any]:
        scan = ScanSpectrum("r", doc["i"], None, {}, "Cu", "K", "transmission", (1,), 0.0, 0.0)  # type: ignore[arg-type]
        return [SpectrumReady(scan)] if name == "event" else []

    def check_timeouts(self) -> list[Any]:
        return []


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def handle_batch(self, outputs: list[Any]) -> list[Any]:
        self.sizes.append(len(outputs))
        return []


def _processor(q: FakeQueue, policy: BatchPolicy | None) -> tuple[Processor, Recorder]:
    rec = Recorder()
    proc = Processor(
        q.get,
        OneSpectrumPerEvent(),
        rec,
        Counters(),
        AnalysisConfig(),
        batching=policy,  # type: ignore[arg-type]
    )
    return proc, rec


def test_default_takes_only_what_is_queued() -> None:
    q = FakeQueue([("event", {"i": i}) for i in range(3)])
    proc, _ = _processor(q, None)
    assert len(proc._take(10)) == 3
    assert q.timeouts == [0.05, 0, 0, 0]  # never waits for more once one is in hand


def test_a_delay_budget_waits_at_most_that_long_for_more() -> None:
    q = FakeQueue([("event", {"i": 0})])
    proc, _ = _processor(q, BatchPolicy(max_batch_delay_ms=5.0))
    assert len(proc._take(10)) == 1
    assert q.timeouts[0] == 0.05 and 0 < q.timeouts[1] <= 0.005


def test_spectra_go_to_the_pipeline_in_chunks_of_max_spectra() -> None:
    q = FakeQueue([])
    proc, rec = _processor(q, BatchPolicy(max_spectra=4))
    proc._turn([("event", {"i": i}) for i in range(10)], check=False)
    assert rec.sizes == [4, 4, 2]


def test_policy_rejects_negative_or_huge_delays() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_delay_ms=-1)
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_delay_ms=1000)
