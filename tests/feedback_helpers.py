"""What the feedback tests share: queueserver test doubles (timed ``item_add``, one that holds
a run's), a one-region recommendation and a credential, a pipeline that recommends from the
shipped Cu K bundle, demo spectra as assembled scans, a started advice IOC and a
fixed-answer predictor."""

from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port
from recommend_helpers import SURE, VAL_SURE, demo_channels, manifest, prediction

from xasflow.daemon.recommend import RecommenderConfig
from xasflow.spectra import SpectrumError

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "cu-k"
ZMQ_KEY = "x" * 40
REC = {
    "regions": [
        {"name": "edge", "start": 8978.0, "stop": 8990.0, "step": 0.5, "dwell": 2.0, "reason": ""}
    ],
    "rescan": None,
    "stop_early": False,
    "e0": 8983.5,
    "uncertainty": 0.4,
    "bundle_id": "cu-k-test",
}


class FakeApi:
    def __init__(self, delay: float = 0.0) -> None:
        self.items: list[tuple[float, dict[str, Any]]] = []
        self.delay = delay
        self.closed = False

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        time.sleep(self.delay)
        self.items.append((time.monotonic(), item))
        return {"success": True, "msg": "", "item": dict(item, item_uid=f"u{len(self.items)}")}

    def queue_get(self, **kwargs: Any) -> dict[str, Any]:  # REManagerAPI.queue_get
        return {"success": True, "items": [item for _, item in self.items], "running_item": {}}

    def history_get(self, **kwargs: Any) -> dict[str, Any]:  # REManagerAPI.history_get
        return {"success": True, "items": []}

    def close(self) -> None:
        self.closed = True


class HeldApi(FakeApi):
    """Holds ``held``'s ``item_add`` (``sending`` set) until ``release``, then takes it."""

    def __init__(self, held: str = "raw-1") -> None:
        super().__init__()
        self.held = held
        self.sending = threading.Event()
        self.release = threading.Event()

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if item["kwargs"]["md"]["xasflow"]["raw_uid"] == self.held:
            self.sending.set()
            assert self.release.wait(20.0)
        return super().item_add(item, user, user_group)


def advice_pipeline(tmp_path: Path, interval: float = 0.0, **knobs: Any) -> Any:
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.pipeline import Pipeline
    from xasflow.daemon.registry import ModelRegistry

    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("the shipped Cu K bundle is not here")
    shutil.copytree(BUNDLE, tmp_path / "models" / "cu-k")
    counters = Counters()
    cfg = RecommenderConfig(stop_count=2, stop_probability=0.05, **knobs)
    return Pipeline(
        ModelRegistry(tmp_path / "models", counters),
        counters,
        recommend=cfg,
        recommend_interval_s=interval,
    )


def demo_scan(raw_uid: str, i: int, name: str, seed: int, flat: bool = False) -> Any:
    from xasflow.daemon.assembly import ScanSpectrum, SpectrumReady

    energy, chans = demo_channels(name, seed=seed)
    if flat:  # nothing in the beam: no edge, rejected
        chans = {"i0": chans["i0"], "it": chans["i0"] * math.exp(-0.3)}
    return SpectrumReady(
        ScanSpectrum(raw_uid, i, energy, chans, "Cu", "K", "transmission", (i + 1,), 1.0, 0.0)
    )


def advice_ioc() -> Any:
    from xasflow.adapters.epics_ioc import XasIoc

    return XasIoc("REVFB:", host="127.0.0.1", port=free_port(), beacon_port=free_port()).start()


class FakePredictor:
    """Predicts cn {4} (a single-value 90 % set) for each pass; ``fail`` passes raise."""

    def __init__(self, fail: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.manifest = manifest()
        self.calls = 0
        self.fail = fail

    def predict(self, spectrum: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail:
            raise SpectrumError("no_edge", "no edge in this pass")
        p = prediction(SURE, VAL_SURE)
        cn = dataclasses.replace(p.results["cn"], prediction_set=[4])
        return dataclasses.replace(p, results={**p.results, "cn": cn})
