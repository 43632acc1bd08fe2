"""A one-point glitch near the edge (a fraction of the edge step, too small for a lone spike)
must not become E0 or the foil's alignment: its flank, one data interval, was the steepest
rise, and E0 (the sample's, the foil's and so the shift) moved 15-30 eV with no flag. The
single spectrum, the stack (``find_e0_batch`` / ``prepare_batch``) and the foil's shift
(``alignment_shift`` / ``alignment_shift_batch``) alike.

The synthetic tests need no shared data; the measured ones are the review's cases
(s38/r2 finding 1), each of which failed before the rise test (:func:`rises_at`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xasflow.adapters.columns import read_spectrum_file
from xasflow.spectra import PrepParams, Spectrum, SpectrumError, alignment_shift, prepare
from xasflow.spectra.batch import alignment_shift_batch, find_e0_batch, prepare_batch
from xasflow.spectra.e0 import (
    E0_STEP,
    ONE_POINT,
    find_e0,
    on_grid,
    rises_at,
    smoothed_derivative,
)
from xasflow.spectra.e0_batch import held_rows
from xasflow.spectra.edges import edge_energy

CU_K = edge_energy("Cu")


def _arctan_edge(energy: np.ndarray, edge: float = CU_K, width: float = 1.5) -> np.ndarray:
    """An edge of step 1 at ``edge``: an arctangent on a gently rising background."""
    return 0.2 + 1e-4 * (energy - edge) + np.arctan((energy - edge) / width) / np.pi + 0.5


def _glitched(energy: np.ndarray, mu: np.ndarray, at: float, height: float) -> np.ndarray:
    """``mu`` with the point nearest ``at`` eV moved by ``height`` (edge steps)."""
    out = mu.copy()
    out[int(np.argmin(np.abs(energy - at)))] += height
    return out


@pytest.mark.parametrize(("spacing", "height"), [(0.3, 1.0), (0.5, 0.6), (1.0, -0.6)])
@pytest.mark.parametrize("offset", [-15.0, -8.0, 20.0, 35.0])
def test_a_glitch_near_a_synthetic_edge_leaves_e0_alone_singly_and_in_a_stack(
    spacing: float, offset: float, height: float
) -> None:
    """Points every ``spacing`` eV, one of them ``height`` steps off at E0 + ``offset``: the
    E0 of the clean edge, alone and as row 0 of a stack of 8 (the other rows clean)."""
    energy = np.arange(8800.0, 9400.0, spacing)
    mu = _arctan_edge(energy)
    clean = find_e0(Spectrum(energy, mu, "Cu"))
    assert clean == pytest.approx(CU_K, abs=0.2)
    bad = _glitched(energy, mu, clean + offset, height)
    assert find_e0(Spectrum(energy, bad, "Cu")) == pytest.approx(clean, abs=0.05)
    e0, errors = find_e0_batch(energy, np.vstack([bad] + [mu] * 7), "Cu", "K", 40.0)
    assert errors == [None] * 8
    assert e0.tolist() == [find_e0(Spectrum(energy, bad, "Cu"))] + [clean] * 7


@pytest.mark.parametrize("offset", [-12.0, 15.0, 30.0])
def test_a_glitch_in_a_synthetic_foil_does_not_shift_the_alignment(offset: float) -> None:
    """A foil read 3 eV low with one point +0.6 step at E0 + ``offset``: the shift stays
    +3 eV, alone and in a page (it was ``-offset`` and more, applied with no flag)."""
    energy = np.arange(8800.0, 9400.0, 0.5)
    foil = _arctan_edge(energy, CU_K - 3.0)
    clean = alignment_shift(Spectrum(energy, foil), "Cu", "K")
    assert clean == pytest.approx(3.0, abs=0.2)
    bad = _glitched(energy, foil, CU_K - 3.0 + offset, 0.6)
    assert alignment_shift(Spectrum(energy, bad), "Cu", "K") == pytest.approx(clean, abs=0.05)
    shifts, errors = alignment_shift_batch(energy, np.vstack([bad, foil, foil]), "Cu", "K")
    assert errors == [None] * 3
    assert shifts == pytest.approx([clean] * 3, abs=0.05)


def test_a_foil_whose_only_rise_is_a_glitch_fails_to_align() -> None:
    """No edge in the foil channel (a falling background), one point 0.6 above it: no shift
    (``no_edge``, the daemon's ``align_failed``), singly and in a page; it was the glitch's
    flank, 12 eV off. A sample's E0 search, as before, still answers with the steepest rise
    it has (the preparation's later checks judge it)."""
    energy = np.arange(8900.0, 9100.0, 0.5)
    bad = _glitched(energy, 2.0 - 5e-3 * (energy - 8900.0), CU_K + 12.0, 0.6)
    with pytest.raises(SpectrumError) as info:
        alignment_shift(Spectrum(energy, bad), "Cu", "K")
    assert (info.value.reason, info.value.message) == ("no_edge", ONE_POINT)
    shifts, errors = alignment_shift_batch(energy, np.vstack([bad, bad]), "Cu", "K")
    assert np.isnan(shifts).all()
    assert [(e.reason, e.message) if e else None for e in errors] == [("no_edge", ONE_POINT)] * 2
    assert find_e0(Spectrum(energy, bad, "Cu")) == pytest.approx(CU_K + 11.7, abs=0.5)


def test_an_edge_sampled_by_one_point_keeps_its_e0() -> None:
    """Points 10 eV apart across the edge and a one-point white line (the library's SrCO3
    scans): the jump is the rise, not a glitch; E0 stays the middle of the jump."""
    coarse = np.array([8930.0, 8940.0, 8950.0, 8960.0, 8970.0, 8980.0, 8990.0])
    values = np.array([-0.20, -0.198, -0.196, -0.186, -0.054, 0.450, 0.208])
    fine = np.arange(8991.2, 9300.0, 1.2)
    energy = np.concatenate([coarse, fine])
    mu = np.concatenate([values, 0.2 + 0.1 * np.sin((fine - 8990.0) / 15.0) ** 2])
    assert rises_at(energy, mu, 8975.0)
    assert find_e0(Spectrum(energy, mu, "Cu")) == pytest.approx(8975.0, abs=0.05)


def test_rises_at_tells_an_edge_from_a_glitchs_flank() -> None:
    """The test itself: on the edge, yes; on either flank of a raised or lowered point, no."""
    energy = np.arange(8800.0, 9400.0, 0.3)
    mu = _glitched(energy, _arctan_edge(energy), CU_K + 20.0, 0.6)
    j = int(np.argmin(np.abs(energy - (CU_K + 20.0))))
    assert rises_at(energy, mu, CU_K)
    assert not rises_at(energy, mu, float(energy[j]) - 0.4)  # the raised point's rising flank
    dip = _glitched(energy, _arctan_edge(energy), CU_K + 20.0, -0.6)
    assert not rises_at(energy, dip, float(energy[j]) + 0.4)  # the dip's rising flank


def _pre_edge_peak(energy: np.ndarray) -> np.ndarray:
    """A Cr(VI)-like mu: a sharp pre-edge peak (Gaussian, sigma 0.6 eV, 0.8 of the step) 4 eV
    above the tabulated Cr K edge, the main edge (step 1) 16 eV above that."""
    tab = edge_energy("Cr")
    peak = 0.8 * np.exp(-0.5 * ((energy - tab - 4.0) / 0.6) ** 2)
    return 0.1 + np.arctan((energy - tab - 20.0) / 1.5) / np.pi + 0.5 + peak


@pytest.mark.parametrize("spacing", [1.5, 2.0])
def test_a_coarse_scan_keeps_its_one_point_pre_edge_peak(spacing: float) -> None:
    """Sampled every ``spacing`` eV, the pre-edge peak is one point high, as a glitch would be,
    and no test tells them apart: a scan that coarse keeps the steepest rise (COARSE), E0 on
    the peak's rise as at 0.25 eV, singly and in a stack (it moved 13-15 eV to the main edge).
    """
    fine = np.arange(5900.0, 6200.0, 0.25)
    e0_fine = find_e0(Spectrum(fine, _pre_edge_peak(fine), "Cr"))
    assert e0_fine == pytest.approx(edge_energy("Cr") + 3.4, abs=0.2)
    energy = edge_energy("Cr") + 4.0 + spacing * np.arange(-60.0, 130.0)  # a point on the peak
    mu = _pre_edge_peak(energy)
    assert find_e0(Spectrum(energy, mu, "Cr")) == pytest.approx(e0_fine, abs=1.0)
    e0, errors = find_e0_batch(energy, np.vstack([mu, mu]), "Cr", "K", 40.0)
    assert errors == [None, None] and e0.tolist() == [find_e0(Spectrum(energy, mu, "Cr"))] * 2


# --- the review's measured cases -----------------------------------------------------------


def test_held_rows_mark_only_maxima_the_rise_test_passes() -> None:
    """A page of edges (noise 0-3 % of the step, mu offsets 0 and 1e4 steps, own shifts),
    half with a one-point glitch whose flank is the steepest rise: every row the page-wide
    bound marks passes :func:`rises_at` at its maximum; it marks every clean row and no
    glitch's flank, and the page's E0s are each spectrum's own, bit for bit."""
    energy = np.arange(CU_K - 100.0, CU_K + 200.0, 0.5)
    rng = np.random.default_rng(4)
    n = 24
    shifts = rng.uniform(-3.0, 3.0, n)
    rows = []
    for r in range(n):
        mu = _arctan_edge(energy + shifts[r]) + (1e4 if r % 3 == 0 else 0.0)
        mu = mu + rng.uniform(0.0, 0.03) * rng.normal(size=energy.size)
        rows.append(_glitched(energy, mu, CU_K - 15.0, 1.0) if r % 2 else mu)
    mu = np.array(rows)
    grid = np.arange(CU_K - 40.0, CU_K + 40.0, E0_STEP)
    d = smoothed_derivative(on_grid(grid, energy, mu, shifts))
    peak = d.argmax(axis=1)
    marked = held_rows(grid, energy, shifts, mu, np.ones(n, dtype=bool))(d, peak)
    rises = [rises_at(energy + shifts[r], mu[r], float(grid[peak[r]])) for r in range(n)]
    assert all(rises[r] for r in np.flatnonzero(marked))
    assert marked[::2].all() and not any(rises[1::2]) and not marked[1::2].any()
    found, errors = find_e0_batch(energy, mu, "Cu", shifts=shifts)
    alone = [find_e0(Spectrum(energy + shifts[r], mu[r], "Cu")) for r in range(n)]
    assert errors == [None] * n and found.tolist() == alone


def _step(s: Spectrum, e0: float) -> float:
    """The foil's edge step, robustly: median mu 20-60 eV above E0 minus 20-60 eV below."""
    e, mu = s.energy, s.mu
    above = (e > e0 + 20.0) & (e < e0 + 60.0)
    below = (e > e0 - 60.0) & (e < e0 - 20.0)
    return float(np.median(mu[above]) - np.median(mu[below]))


@pytest.mark.shared_data
def test_cuo_with_a_half_step_glitch_at_e0_plus_20_keeps_its_e0(xdi_library: Path) -> None:
    """CuO tenorite, one point +0.5 step nearest E0+20 eV: E0 stays 8983.8 (it was 9003.35,
    and the shipped bundle then answered CN 6 in domain for a CN 5 out-of-domain spectrum);
    a page of 8 copies, row 0 glitched, gives every row that E0."""
    s = read_spectrum_file(xdi_library / "Cu" / "CuO_tenorite_13K_01.xdi")
    params = PrepParams()
    clean = prepare(s, params)
    mu = _glitched(s.energy, s.mu, clean.e0 + 20.0, 0.5 * clean.edge_step)
    got = prepare(s.with_(mu=mu), params)
    assert got.e0 == pytest.approx(clean.e0, abs=1.0)
    page = prepare_batch(
        s.energy, np.vstack([mu] + [s.mu] * 7), params, "Cu", "K", metas=[dict(s.meta)] * 8
    )
    e0s = [p.e0 for p in page if not isinstance(p, SpectrumError)]
    assert len(e0s) == 8 and max(e0s) - min(e0s) < 1e-9
    assert e0s[0] == pytest.approx(got.e0, abs=1e-9)


@pytest.mark.shared_data
def test_cu2s_reference_with_a_glitch_at_e0_plus_15_aligns_as_clean(xdi_library: Path) -> None:
    """Cu2S's reference channel (a Cu foil), one point +0.6 step at E0+15 eV: the shift
    stays -0.27 eV (it was -14.57, applied with has_edge True), alone and in a page."""
    s = read_spectrum_file(xdi_library / "Cu" / "Cu2S_13K_01.xdi")
    ref = Spectrum(s.energy, s.meta["reference_mu"])
    clean = alignment_shift(ref, "Cu", "K")
    e0 = CU_K - clean
    mu = _glitched(ref.energy, ref.mu, e0 + 15.0, 0.6 * _step(ref, e0))
    assert alignment_shift(ref.with_(mu=mu), "Cu", "K") == pytest.approx(clean, abs=1.0)
    shifts, errors = alignment_shift_batch(ref.energy, np.vstack([mu, ref.mu]), "Cu", "K")
    assert errors == [None, None]
    assert shifts == pytest.approx([clean, clean], abs=1.0)


@pytest.mark.shared_data
def test_a_decimated_cr_vi_scan_keeps_its_e0_on_the_pre_edge_peak(xdi_library: Path) -> None:
    """K2Cr2O7 (library, 0.5 eV steps) and every 3rd or 4th point of it (1.5, 2 eV): E0 on
    the pre-edge peak, within 0.5 eV of the full scan's 5994.4 (it was 6009.8 and 6008.6:
    the peak, one point on such steps, taken for a glitch; review s39 finding 10)."""
    s = read_spectrum_file(xdi_library / "Cr" / "k2cr2o7_rt_001.xdi")
    full = find_e0(s)
    assert full == pytest.approx(5994.4, abs=0.2)
    for k in (3, 4):
        assert find_e0(s.with_(energy=s.energy[::k], mu=s.mu[::k])) == pytest.approx(full, abs=0.5)
