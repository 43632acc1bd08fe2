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


def _cuo(xdi_library: Path) -> tuple[Spectrum, Prepared]:
    spectrum = xdi_to_spectrum(read_xdi(xdi_library / "Cu" / "CuO_tenorite_13K_01.xdi"))
    return spectrum, prepare(spectrum, SHIPPED)


def _raised(spectrum: Spectrum, at: list[int], size: float, step: float) -> Spectrum:
    mu = spectrum.mu.copy()
    mu[at] += size * step
    return spectrum.with_(mu=mu)


def _repaired(got: Prepared | SpectrumError, clean: Prepared, energies: list[float]) -> None:
    assert isinstance(got, Prepared), got
    assert got.spectrum.meta["glitches_interpolated"] == pytest.approx(energies, abs=1e-6)
    assert got.e0 == pytest.approx(clean.e0, abs=0.05)
    assert float(np.abs(got.y - clean.y).max()) < 0.05


@pytest.mark.parametrize("end", ["stop", "start"])
def test_a_glitch_one_point_past_the_window_is_the_one_repaired(
    xdi_library: Path, end: str
) -> None:
    """CuO, the Cu bundle's window E0-3.5..E0+116.5: +5 steps on the first point past its
    end (9101.16 eV, which feeds the grid's last point) or +3 on the last point below its
    start (8979.68 eV). Before, the good neighbour inside was interpolated and reported
    (9099.75) with the grid's end at 4.3 (clean 0.99), and below the start the spectrum was
    refused ``edge_step``."""
    spectrum, clean = _cuo(xdi_library)
    if end == "stop":
        j = int(spectrum.energy.searchsorted(clean.e0 + SHIPPED.window_stop, side="right"))
        size = 5.0
    else:
        j = int(spectrum.energy.searchsorted(clean.e0 + SHIPPED.window_start)) - 1
        size = 3.0
    glitched = _raised(spectrum, [j], size, clean.edge_step)
    for got in _both(glitched, SHIPPED):
        _repaired(got, clean, [float(spectrum.energy[j])])


def test_two_adjacent_glitches_are_recorded_once_each(xdi_library: Path) -> None:
    """CuO with two adjacent points +5 steps at E0+60: both interpolated, each energy
    recorded once (before: [9043.778, 9043.778, 9044.76], which the daemon counted as 3)."""
    spectrum, clean = _cuo(xdi_library)
    j = int(np.argmin(np.abs(spectrum.energy - (clean.e0 + 60.0))))
    glitched = _raised(spectrum, [j, j + 1], 5.0, clean.edge_step)
    for got in _both(glitched, SHIPPED):
        _repaired(got, clean, [float(spectrum.energy[j]), float(spectrum.energy[j + 1])])


def test_many_glitches_are_all_repaired_up_to_the_cap_then_refused_by_count(
    xdi_library: Path,
) -> None:
    """CuO with +3-step glitches every 25 eV from E0+20 (4 of them) or every 11 eV (9):
    before, 4 were refused ``edge_step`` with "1 point(s) ... a glitch: 9004.0 eV ...;
    prepare interpolates across them". Now 4 are interpolated and recorded; 9, over
    :data:`~xasflow.spectra.glitches.MAX_GLITCHES`, are refused ``glitches`` with every one
    counted and no promise of a repair."""
    spectrum, clean = _cuo(xdi_library)
    e = spectrum.energy

    def at(offsets: list[float]) -> list[int]:
        return [int(np.argmin(np.abs(e - (clean.e0 + o)))) for o in offsets]

    four = at([20.0, 45.0, 70.0, 95.0])
    for got in _both(_raised(spectrum, four, 3.0, clean.edge_step), SHIPPED):
        _repaired(got, clean, [float(e[j]) for j in four])
    nine = at([20.0 + 11.0 * i for i in range(9)])
    assert len(set(nine)) == 9
    for got in _both(_raised(spectrum, nine, 3.0, clean.edge_step), SHIPPED):
        assert isinstance(got, SpectrumError), got
        assert got.reason == "glitches"
        assert got.message.startswith("9 points")
        assert all(f"{e[j]:.1f} eV" in got.message for j in nine)
        assert "interpolates" not in got.message


def test_a_declared_herfd_spectrum_is_repaired_before_its_broadening(xdi_library: Path) -> None:
    """CuO declared HERFD with one point +5 steps at E0+60: before, the broadening smeared it
    over several points, no glitch was found, |y - clean| reached 1.94 (CN 4 -> 6, ood 1 ->
    338). Now it is interpolated on the spectrum as measured, then broadened."""
    spectrum, _ = _cuo(xdi_library)
    herfd = spectrum.with_(meta={**spectrum.meta, "herfd": True})
    clean = prepare(herfd, SHIPPED)
    assert "glitches_interpolated" not in clean.spectrum.meta
    j = int(np.argmin(np.abs(spectrum.energy - (clean.e0 + 60.0))))
    glitched = _raised(herfd, [j], 5.0, clean.edge_step)
    for got in _both(glitched, SHIPPED):
        _repaired(got, clean, [float(spectrum.energy[j])])
        assert got.unbroadened is not None and clean.unbroadened is not None
        assert got.unbroadened.mu[j] == pytest.approx(clean.unbroadened.mu[j], abs=0.05)


def test_a_glitch_on_the_last_point_just_past_the_window_is_the_one_repaired(
    xdi_library: Path,
) -> None:
    """CuO cut to end on the first point past the window (9101.16 eV, E0+117.3), that point
    +5 steps: it has no right neighbour, and its good neighbour inside (9099.75) was
    interpolated and reported while it fed the grid's end (ood 324)."""
    full, clean_full = _cuo(xdi_library)
    j = int(full.energy.searchsorted(clean_full.e0 + SHIPPED.window_stop, side="right"))
    spectrum = full.with_(energy=full.energy[: j + 1], mu=full.mu[: j + 1])
    clean = prepare(spectrum, SHIPPED)
    for got in _both(_raised(spectrum, [j], 5.0, clean.edge_step), SHIPPED):
        _repaired(got, clean, [float(spectrum.energy[j])])
