"""A spectrum's result never waits for the advice that follows it.

The processing loop hands a batch's results to its sinks, then computes the advice
(:mod:`xasflow.daemon.advice`); a run's advice still comes before its stop.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import fly_scan, transmission, unpaged

from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.processor import Processor
from xasflow.daemon.recommend import RecommendationTracker, RecommenderConfig
from xasflow.daemon.registry import ModelRegistry


def _pipeline(bundle_dir: Path, tmp_path: Path) -> Pipeline:
    shutil.copytree(bundle_dir, tmp_path / "models" / "cu-k")
    return Pipeline(
        ModelRegistry(tmp_path / "models", Counters()),
        align=False,
        recommend=RecommenderConfig(),
        recommend_interval_s=0.0,  # advice after every analysed spectrum
    )


class Named:
    """Documents as (stream name or document name, index): events by their stream."""

    def __init__(self) -> None:
        self.streams: dict[str, str] = {}
        self.seen: list[tuple[str, Any]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        for kind, one in unpaged([(name, doc)]):
            if kind == "descriptor":
                self.streams[one["uid"]] = one["name"]
            elif kind == "event":
                self.seen.append((self.streams[one["descriptor"]], one["data"]["index"]))
            else:
                self.seen.append((kind, one.get("raw_uid")))


def test_the_loop_publishes_results_before_it_computes_their_advice(
    tiny_cu_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    energy = np.arange(8800.0, 9300.0, 0.5)
    spectra = [transmission(energy, seed=i) for i in range(3)]
    _, raw = fly_scan(energy, spectra)
    pipeline = _pipeline(tiny_cu_bundle, tmp_path)
    named = Named()  # what the sink got, and when advice was computed
    computing = RecommendationTracker.recommend_observed

    def spy(self: RecommendationTracker, *args: Any, **kwargs: Any) -> Any:
        named.seen.append(("computing advice", None))
        return computing(self, *args, **kwargs)

    monkeypatch.setattr(RecommendationTracker, "recommend_observed", spy)
    queue = list(raw[:-1])  # the stop comes in a turn of its own
    proc = Processor(
        lambda timeout: queue.pop(0) if queue else None,
        RunAssembler(),
        pipeline,
        Counters(),
        AnalysisConfig(batching={"max_batch_delay_ms": 0}),
    )
    proc.outlet.sinks.append(named)
    proc._turn(proc._take(100), check=False)  # start, descriptor and the 3 events: one batch
    queue.append(raw[-1])
    proc._turn(proc._take(100), check=False)
    assert named.seen[1:] == [  # after the analysis start
        ("primary", 0),
        ("primary", 1),
        ("primary", 2),
        ("computing advice", None),
        ("computing advice", None),
        ("computing advice", None),
        ("recommendations", 0),
        ("recommendations", 1),
        ("recommendations", 2),
        ("stop", None),
    ], named.seen


def test_a_runs_advice_due_comes_before_its_stop_in_the_same_batch(
    tiny_cu_bundle: Path,
    tmp_path: Path,
) -> None:
    """``end(advise=False)`` leaves the advice of open runs due, but a run that closes in the
    batch gets its advice first: no advice after a stop."""
    from xasflow.daemon.assembly import RunClosed, RunOpened, ScanSpectrum, SpectrumReady

    energy = np.arange(8800.0, 9300.0, 0.5)
    pipeline = _pipeline(tiny_cu_bundle, tmp_path)

    def spectrum(raw_uid: str, i: int) -> SpectrumReady:
        chans = {k.lower(): v for k, v in transmission(energy, seed=i).items()}
        return SpectrumReady(
            ScanSpectrum(raw_uid, i, energy, chans, "Cu", "K", "transmission", (i + 1,), 1.0, 0.0)
        )

    batch = pipeline.begin(
        [
            RunOpened("a", {"uid": "a", "time": 1.0}, "fly"),
            RunOpened("b", {"uid": "b", "time": 1.0}, "fly"),
            spectrum("a", 0),
            spectrum("b", 0),
            RunClosed("a", "success", "", 1, 0, 0),
        ]
    )
    named = Named()
    for name, doc in pipeline.end(batch, advise=False):
        named(name, doc)
    assert named.seen == [
        ("start", "a"),
        ("primary", 0),
        ("start", "b"),
        ("primary", 0),
        ("recommendations", 0),  # a's, before its stop
        ("stop", None),
    ]
    for name, doc in pipeline.advise():
        named(name, doc)
    assert named.seen[-1] == ("recommendations", 0)  # b's, when asked
    assert pipeline.advise() == []  # taken once
