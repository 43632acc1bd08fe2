"""One glitch inside the model window (:mod:`xasflow.spectra.glitches`): interpolated across
and recorded, on the single and the batch path alike, not refused as an undetermined edge
step (12 steps) nor given to the model (2 and 5 steps); the daemon flags the spectrum
``glitch_interpolated``, which withholds stop-early."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import unpaged

from xasflow import paths
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.daemon.counters import Counters
from xasflow.daemon.outputs import RunClosed, RunOpened, ScanSpectrum, SpectrumReady
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.recommend_types import STOP_WITHHOLDING_FLAGS
from xasflow.daemon.registry import ModelRegistry
from xasflow.sim.references import synthetic_foil
from xasflow.spectra import Prepared, PrepParams, Spectrum, SpectrumError, normalize, prepare
from xasflow.spectra.batch import BATCH_MIN_ROWS, prepare_batch

MANIFEST = paths.REPO_ROOT / "models" / "cu-k" / "manifest.json"
SHIPPED = PrepParams.model_validate(json.loads(MANIFEST.read_text())["prep"])


def _glitched(spectrum: Spectrum, clean: Prepared, offset: float, size: float) -> Spectrum:
    """``spectrum`` with the point nearest E0 + ``offset`` raised by ``size`` edge steps."""
    j = int(np.argmin(np.abs(spectrum.energy - (clean.e0 + offset))))
    mu = spectrum.mu.copy()
    mu[j] += size * clean.edge_step
    return spectrum.with_(mu=mu)


def _single_and_batch(spectrum: Spectrum, clean: Spectrum) -> list[Prepared | SpectrumError]:
    """``prepare`` of ``spectrum``, and row 0 of ``prepare_batch`` of it over copies of
    ``clean`` (the matrix path)."""
    try:
        single: Prepared | SpectrumError = prepare(spectrum, SHIPPED)
    except SpectrumError as exc:
        single = exc
    mus = np.tile(clean.mu, (BATCH_MIN_ROWS, 1))
    mus[0] = spectrum.mu
    metas = [dict(clean.meta)] * BATCH_MIN_ROWS
    rows = prepare_batch(clean.energy, mus, SHIPPED, clean.element, clean.edge, metas=metas)
    assert all(isinstance(r, Prepared) for r in rows[1:])
    return [single, rows[0]]


def _check_repaired(got: Prepared | SpectrumError, clean: Prepared, energy: float) -> None:
    assert isinstance(got, Prepared), got
    assert got.spectrum.meta["glitches_interpolated"] == [pytest.approx(energy, abs=0.05)]
    assert got.e0 == pytest.approx(clean.e0, abs=1e-6)
    assert float(np.abs(got.y - clean.y).max()) < 0.05


@pytest.mark.parametrize("size", [12.0, 5.0, 2.0])
def test_a_glitch_in_cuos_window_is_interpolated_across(xdi_library: Path, size: float) -> None:
    """CuO_tenorite with one point raised 12, 5 or 2 edge steps at E0+60 eV (9043.8 eV):
    before, 12 was refused ``edge_step`` ("edge step 1.61 ... is not determined", the clean
    step) and 5 and 2 reached the model (|y - clean| 4.0 and 1.6: out of domain, CN 4)."""
    spectrum = xdi_to_spectrum(read_xdi(xdi_library / "Cu" / "CuO_tenorite_13K_01.xdi"))
    clean = prepare(spectrum, SHIPPED)
    assert "glitches_interpolated" not in clean.spectrum.meta
    glitched = _glitched(spectrum, clean, 60.0, size)
    for got in _single_and_batch(glitched, spectrum):
        _check_repaired(got, clean, 9043.8)


def _synthetic() -> Spectrum:
    """A measured Cu K edge with EXAFS-like wiggles on 0.5 eV steps, a little noise."""
    e = np.arange(8830.0, 9400.0, 0.5)
    rel = e - 8979.0
    post = np.where(rel > 0, 0.1 * np.sin(np.sqrt(np.maximum(rel, 0)) * 2.0), 0.0)
    mu = 0.3 - 1e-4 * rel + 0.5 + np.arctan(rel / 1.5) / np.pi + post
    mu += np.random.default_rng(7).normal(0.0, 0.003, e.size)
    return Spectrum(e, mu, "Cu", meta={"calculated": False})


def test_a_synthetic_glitch_is_interpolated_and_named_by_normalize() -> None:
    """The same on a synthetic edge (no shared data): prepared as the clean one, the glitch's
    energy recorded; ``normalize`` alone names the point instead of calling the step
    undetermined."""
    spectrum = _synthetic()
    clean = prepare(spectrum, SHIPPED)
    for offset, size in ((60.0, 12.0), (30.0, 5.0), (90.0, 2.0), (60.0, -3.0)):
        glitched = _glitched(spectrum, clean, offset, size)
        energy = float(glitched.energy[np.argmax(glitched.mu != spectrum.mu)])
        for got in _single_and_batch(glitched, spectrum):
            _check_repaired(got, clean, energy)
    with pytest.raises(SpectrumError) as err:
        normalize(_glitched(spectrum, clean, 60.0, 12.0), clean.e0, SHIPPED)
    assert f"{clean.e0 + 60.0:.0f}" in err.value.message and "glitch" in err.value.message
    assert "not determined" not in err.value.message


def test_a_glitch_flags_the_daemons_row(tmp_path: Path) -> None:
    """Through the daemon (three scans of a run): analysed, flagged
    ``glitch_interpolated``, a flag that withholds stop-early; the clean run is not."""
    shutil.copytree(paths.REPO_ROOT / "models" / "cu-k", tmp_path / "models" / "cu-k")
    pipeline = Pipeline(ModelRegistry(tmp_path / "models", Counters()), align=False)
    foil = synthetic_foil("Cu")
    foil = foil.with_(energy=foil.energy[::5], mu=foil.mu[::5])
    glitched = _glitched(foil, prepare(foil, SHIPPED), 60.0, 12.0)
    assert "glitch_interpolated" in STOP_WITHHOLDING_FLAGS
    for spectrum, flagged in ((glitched, True), (foil, False)):
        uid = f"raw-{flagged}"
        i0 = np.full(spectrum.energy.size, 1e6)
        chans = {"i0": i0, "it": i0 * np.exp(-spectrum.mu)}
        ready = [
            SpectrumReady(
                ScanSpectrum(
                    uid, i, spectrum.energy, chans, "Cu", "K", "transmission", (i + 1,), 0, 0
                )
            )
            for i in range(3)
        ]
        docs = pipeline.handle_batch(
            [
                RunOpened(uid, {"uid": uid, "time": 0.0}, "step"),
                *ready,
                RunClosed(uid, "success", "", 3, 0, 0),
            ]
        )
        rows = [d["data"] for n, d in unpaged(docs) if n == "event"]
        assert [r["status"] for r in rows] == ["ok"] * 3
        assert ["glitch_interpolated" in r["flags"] for r in rows] == [flagged] * 3
