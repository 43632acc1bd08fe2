"""The daemon's HERFD hint on the shipped bundle: an undeclared HERFD run is flagged
``herfd_suspected`` beside ``out_of_domain`` (checked once per run); a declared one is
broadened and in domain; a conventional run and an out-of-domain chloride get no hint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import unpaged
from prometheus_client import CollectorRegistry, generate_latest

from xasflow import paths
from xasflow.daemon.counters import Counters, register_prometheus
from xasflow.daemon.outputs import RunClosed, RunOpened, ScanSpectrum, SpectrumReady
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.predictor import HERFD_SUSPECTED, OUT_OF_DOMAIN, Predictor
from xasflow.sim.feff_demo import DemoSpectrum, load_demo_spectra


@pytest.fixture(scope="module")
def demos() -> dict[tuple[str, str], DemoSpectrum]:
    out = {("conv", d.name): d for d in load_demo_spectra()}
    return out | {("herfd", d.name): d for d in load_demo_spectra(herfd=True)}


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    shutil.copytree(paths.REPO_ROOT / "models" / "cu-k", tmp_path / "models" / "cu-k")
    counters = Counters()
    return Pipeline(ModelRegistry(tmp_path / "models", counters), counters, align=False)


def _ready(raw_uid: str, index: int, demo: DemoSpectrum) -> SpectrumReady:
    """The demo's mu as a transmission scan (I0 flat, It = I0 exp(-mu)), no reference foil."""
    i0 = np.full(demo.energy.size, 1e6)
    chans = {"i0": i0, "it": i0 * np.exp(-demo.mu)}  # mu = ln(I0/It): the FEFF mu itself
    scan = ScanSpectrum(
        raw_uid, index, demo.energy, chans, "Cu", "K", "transmission", (index + 1,), 0.0, 0.0
    )
    return SpectrumReady(scan)


def _rows(pipeline: Pipeline, raw_uid: str, demo: DemoSpectrum, **start: Any) -> list[dict]:
    """The analysed rows of a two-spectrum run of ``demo`` (a FEFF calculation, declared)."""
    docs = pipeline.handle_batch(
        [
            RunOpened(raw_uid, {"uid": raw_uid, "time": 0.0, "calculated": True, **start}, "step"),
            _ready(raw_uid, 0, demo),
            _ready(raw_uid, 1, demo),
            RunClosed(raw_uid, "success", "", 0, 0, 0),
        ]
    )
    return [d["data"] for n, d in unpaged(docs) if n == "event" and "cn" in d["data"]]


def test_an_undeclared_herfd_run_is_hinted_once(
    pipeline: Pipeline, demos: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = []
    real = Predictor.with_herfd_hint

    def counting(self: Predictor, spectrum: Any, prediction: Any) -> Any:
        checks.append(spectrum)
        return real(self, spectrum, prediction)

    monkeypatch.setattr(Predictor, "with_herfd_hint", counting)
    rows = _rows(pipeline, "raw-herfd", demos[("herfd", "Cu2O")])
    assert len(rows) == 2
    for row in rows:
        flags = row["flags"].split(",")
        assert OUT_OF_DOMAIN in flags and HERFD_SUSPECTED in flags
        assert row["out_of_domain"] is True
    assert len(checks) == 1  # the run's first out-of-domain spectrum; the second reuses it
    counters = pipeline.counters
    assert counters.snapshot()["herfd_suspected"] == 2 == counters.out_of_domain
    reg = CollectorRegistry()
    register_prometheus(counters, reg)
    assert "xasflow_spectra_herfd_suspected_total 2.0" in generate_latest(reg).decode()

    declared = _rows(pipeline, "raw-declared", demos[("herfd", "Cu2O")], herfd=True)
    for row in declared:
        assert "herfd_broadened" in row["flags"] and HERFD_SUSPECTED not in row["flags"]
        assert row["out_of_domain"] is False and row["cn"] == 2
    for name in ("Cu2O", "CuCl"):  # in domain; and out of domain for a reason of its own
        for row in _rows(pipeline, f"raw-{name}", demos[("conv", name)]):
            assert HERFD_SUSPECTED not in row["flags"]
            assert row["out_of_domain"] is (name == "CuCl")
    assert pipeline.herfd_hints._runs == {}  # forgotten at each run's close
    assert counters.herfd_suspected == 2  # the declared and the conventional runs added none
