"""What the window-glitch repair (:mod:`xasflow.spectra.glitches`) leaves alone and how far it
goes: a sharp white line sampled coarsely is no glitch, the first point past each window end
is judged, many glitches are repaired or refused by count, a declared HERFD spectrum is
repaired before its broadening; single and batch paths alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xasflow import paths
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra import Prepared, PrepParams, Spectrum, SpectrumError, prepare
from xasflow.spectra.batch import BATCH_MIN_ROWS, prepare_batch

MANIFEST = paths.REPO_ROOT / "models" / "cu-k" / "manifest.json"
SHIPPED = PrepParams.model_validate(json.loads(MANIFEST.read_text())["prep"])
P0 = PrepParams()


def _both(spectrum: Spectrum, params: PrepParams) -> list[Prepared | SpectrumError]:
    """``prepare`` of ``spectrum`` and row 0 of ``prepare_batch`` of it with 7 copies of it
    (the matrix path)."""
    try:
        single: Prepared | SpectrumError = prepare(spectrum, params)
    except SpectrumError as exc:
        single = exc
    mus = np.tile(spectrum.mu, (BATCH_MIN_ROWS, 1))
    metas = [dict(spectrum.meta)] * BATCH_MIN_ROWS
    rows = prepare_batch(spectrum.energy, mus, params, spectrum.element, spectrum.edge, metas=metas)
    return [single, rows[0]]


@pytest.mark.parametrize(
    ("name", "every"), [("S/pentlandite_rt_01.xdi", 4), ("S/jarosite_rt_01.xdi", 4)]
)
def test_a_sharp_white_line_sampled_coarsely_is_no_glitch(
    xdi_library: Path, name: str, every: int
) -> None:
    """S K white lines at 0.6 eV (pentlandite) and 0.8 eV (jarosite) steps: before,
    pentlandite's two white-line points were "interpolated" (mu 0.53 -> 0.23, E0 0.45 eV
    low) and jarosite was refused ``edge_step`` as a glitch at 2481.2 eV (E0+0.5)."""
    full = xdi_to_spectrum(read_xdi(xdi_library / name))
    spectrum = full.with_(energy=full.energy[::every], mu=full.mu[::every])
    for got in _both(spectrum, P0):
        assert isinstance(got, Prepared), got
        assert "glitches_interpolated" not in got.spectrum.meta
        assert np.array_equal(got.spectrum.mu, spectrum.mu)  # its white line as measured
        assert got.e0 == pytest.approx(prepare(full, P0).e0, abs=0.1)
