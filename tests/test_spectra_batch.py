"""Batched preparation (``xasflow.spectra.batch``) against the per-spectrum path, row by row."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic_feff import model_mu
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra import (
    PrepParams,
    Spectrum,
    SpectrumError,
    align,
    alignment_shift,
    find_e0,
    mu_from_channels,
    prepare,
)
from xasflow.spectra.batch import (
    alignment_shift_batch,
    find_e0_batch,
    has_edge_batch,
    prepare_batch,
)
from xasflow.spectra.e0_batch import _pre_edge_noise
from xasflow.spectra.e0_window import scan_points
from xasflow.spectra.quality import has_edge

pytestmark = pytest.mark.usefixtures("matrix_rows")  # the matrix path, small pages too

CU_K = 8979.0
LEGACY = PrepParams(method="legacy", window_stop=116.5, n_points=240)
LARCH = PrepParams()
MAX = PrepParams(method="legacy", normalization="max")


def fly_page(n: int = 12, points: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A measured-like page: one energy axis, rows with their own edge shift, noise, background."""
    rng = np.random.default_rng(seed)
    energy = np.linspace(8800.0, 9400.0, points)
    rows = []
    for i in range(n):
        height, width, nn = [(1.6, 6.0, 2.1), (0.6, 3.0, 1.85), (1.0, 4.0, 2.3)][i % 3]
        mu = model_mu(energy, CU_K + rng.uniform(-3, 3), height, width, nn)
        mu = 0.4 + 2e-4 * (energy - 8800) + 0.8 * mu + 0.003 * rng.standard_normal(points)
        rows.append(mu)
    return energy, np.array(rows)


def feff_page(n: int = 8, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """FEFF-like rows: no background, a k-spaced irregular grid starting just below E0."""
    rng = np.random.default_rng(seed)
    k = np.linspace(0.0, 9.0, 180)
    energy = CU_K - 15.0 + np.concatenate((np.linspace(0, 14.5, 30), 15.0 + k**2 / 0.2625))
    rows = [model_mu(energy, CU_K + rng.uniform(-2, 2), 1.0 + 0.1 * i, 4.0, 2.0) for i in range(n)]
    return energy, np.array(rows)


def _compare(energy: np.ndarray, mu: np.ndarray, params: PrepParams, shifts=None) -> int:
    shifts = np.zeros(len(mu)) if shifts is None else shifts
    metas = [{"energy_shift": float(s)} for s in shifts]
    got = prepare_batch(energy, mu, params, "Cu", "K", shifts=shifts, metas=metas)
    assert len(got) == len(mu)
    n_ok = 0
    for row, s, res in zip(mu, shifts, got, strict=True):
        spectrum = Spectrum(energy + s, row, "Cu", "K", meta={"energy_shift": float(s)})
        try:
            want = prepare(spectrum, params)
        except SpectrumError as exc:
            assert isinstance(res, SpectrumError), res
            assert res.reason == exc.reason
            continue
        assert not isinstance(res, SpectrumError), res
        assert abs(res.e0 - want.e0) < 0.01
        assert res.edge_step == pytest.approx(want.edge_step, rel=1e-6)
        np.testing.assert_allclose(res.y, want.y, rtol=1e-6, atol=1e-9)
        assert res.extrapolated == pytest.approx(want.extrapolated, abs=1e-9)
        np.testing.assert_allclose(res.spectrum.energy, want.spectrum.energy)
        assert res.spectrum.meta == want.spectrum.meta
        n_ok += 1
    return n_ok


@pytest.mark.parametrize("params", [LEGACY, LARCH, MAX], ids=["legacy", "larch", "max"])
def test_prepare_batch_matches_prepare_row_by_row(params: PrepParams) -> None:
    energy, mu = fly_page()
    assert _compare(energy, mu, params) == len(mu)
    shifts = np.linspace(-4.0, 5.0, len(mu))  # aligned rows: each on its own shifted axis
    assert _compare(energy, mu, params, shifts) == len(mu)


@pytest.mark.parametrize("params", [LEGACY, LARCH], ids=["legacy", "larch"])
def test_prepare_batch_matches_on_feff_like_spectra(params: PrepParams) -> None:
    energy, mu = feff_page()
    params = params.model_copy(update={"window_stop": 56.5, "n_points": 200})
    assert _compare(energy, mu, params) > 0


def test_a_bad_row_fails_alone_with_its_reason() -> None:
    energy, mu = fly_page(n=5)
    mu[1, 10] = np.nan  # not finite
    mu[2] = np.linspace(2.0, 1.0, energy.size)  # falls throughout: no edge
    got = prepare_batch(energy, mu, LEGACY, "Cu", "K")
    assert isinstance(got[1], SpectrumError) and got[1].reason == "not_finite"
    assert got[1].message == f"1 point is NaN or infinite, at {energy[10]:.7g} eV"
    assert isinstance(got[2], SpectrumError) and got[2].reason == "no_edge"
    for i in (0, 3, 4):
        assert not isinstance(got[i], SpectrumError)
    # data ending at 9015 eV: too short for the post-edge fit in every row, as prepare says
    short = prepare_batch(energy[:360], mu[[0, 3, 4], :360], LEGACY, "Cu", "K")
    assert [r.reason for r in short if isinstance(r, SpectrumError)] == ["no_post_edge"] * 3
    assert _compare(energy[:360], mu[[0, 3, 4], :360], LEGACY) == 0  # same errors as prepare
    # ending at 9040 eV: normalised, but the model window needs data to E0+116.5 eV
    window = PrepParams(method="legacy", window_stop=116.5, n_points=240, post_edge=(30.0, 50.0))
    short = prepare_batch(energy[:400], mu[[0, 3, 4], :400], window, "Cu", "K")
    assert [r.reason for r in short if isinstance(r, SpectrumError)] == ["window"] * 3
    assert _compare(energy[:400], mu[[0, 3, 4], :400], window) == 0


def test_rows_without_a_clear_edge_are_refused_as_prepare_refuses_them() -> None:
    """The edge-against-noise check decides each row of a page as prepare decides it alone."""
    energy, mu = fly_page(n=6)
    rng = np.random.default_rng(5)
    mu[1] = 1.0 + 1e-3 * rng.standard_normal(energy.size)  # noise on a flat background
    mu[4] = (energy / 8800.0) ** -3 + 1e-3 * rng.standard_normal(energy.size)
    got = prepare_batch(energy, mu, LARCH, "Cu", "K")
    assert [i for i, r in enumerate(got) if isinstance(r, SpectrumError)] == [1, 4]
    assert _compare(energy, mu, LARCH) == 4


def test_herfd_rows_fall_back_to_prepare() -> None:
    energy, mu = fly_page(n=3)
    metas = [{}, {"herfd": 1.5}, {}]
    got = prepare_batch(energy, mu, LEGACY, "Cu", "K", metas=metas)
    want = prepare(Spectrum(energy, mu[1], "Cu", "K", meta={"herfd": 1.5}), LEGACY)
    assert not isinstance(got[1], SpectrumError)
    np.testing.assert_allclose(got[1].y, want.y, rtol=1e-9)
    assert got[1].spectrum.meta.get("broadened_fwhm") == want.spectrum.meta.get("broadened_fwhm")


def test_find_e0_batch_matches_find_e0_and_names_failures() -> None:
    energy, mu = fly_page(n=6)
    shifts = np.array([0.0, 1.0, -2.5, 3.3, 0.0, 80.0])  # the last leaves the search window
    e0, errors = find_e0_batch(energy, mu, "Cu", "K", 40.0, shifts)
    for i in range(6):
        spectrum = Spectrum(energy + shifts[i], mu[i], "Cu", "K")
        assert errors[i] is None
        assert e0[i] == find_e0(spectrum, 40.0)  # the same search per row: bit for bit
    tiny = np.linspace(8000.0, 8001.5, 20)  # far below the Cu edge
    e0, errors = find_e0_batch(tiny, np.ones((2, 20)), "Cu", "K")
    assert np.isnan(e0).all() and all(e.reason == "no_edge" for e in errors)


def test_alignment_batch_matches_alignment_shift_and_has_edge() -> None:
    from tests.helpers import transmission

    energy = np.linspace(8800.0, 9400.0, 1000)
    refs, want_shift, want_edge = [], [], []
    for i, shift in enumerate((-3.0, 0.0, 2.2, 4.9)):
        ch = transmission(energy, shift=shift, seed=i)
        ref = Spectrum(energy, mu_from_channels("reference", ch["It"], ch["Ir"]))
        refs.append(ref.mu)
        want_shift.append(alignment_shift(ref, "Cu", "K"))
        want_edge.append(has_edge(ref, CU_K - want_shift[-1]))
    refs.append(np.full(energy.size, 0.3) + 1e-3 * np.random.default_rng(0).standard_normal(1000))
    shifts, errors = alignment_shift_batch(energy, np.array(refs), "Cu", "K")
    assert errors[:4] == [None] * 4
    np.testing.assert_allclose(shifts[:4], want_shift, atol=0.01)
    np.testing.assert_allclose(shifts[:4], (-3.0, 0.0, 2.2, 4.9), atol=0.2)  # the mono's error
    edges = has_edge_batch(energy, np.array(refs), CU_K - np.nan_to_num(shifts))
    assert edges[:4].tolist() == want_edge == [True] * 4
    flat = Spectrum(energy, refs[4])
    assert bool(edges[4]) == has_edge(flat, CU_K - np.nan_to_num(shifts[4])) is False
    aligned = align(Spectrum(energy, refs[0], "Cu", "K"), float(shifts[0]))
    assert aligned.meta["energy_shift"] == pytest.approx(want_shift[0], abs=0.01)


def test_legacy_batch_falls_back_to_lower_degrees_like_prepare() -> None:
    """Rows whose post-edge quadratic dives below zero at E0 get the lower degree, per row."""
    e0 = 8980.0
    energy = np.arange(e0 - 160, e0 + 130, 0.5)
    rel = energy - e0
    dive = np.where(rel < 0, 0.0, 1.2 - 0.0004 * (rel - 80.0) ** 2)
    plain = 0.5 + np.arctan(rel / 1.5) / np.pi
    mu = np.array([dive, plain, dive + 0.1, -plain])  # the last never rises: no_edge
    params = PrepParams(method="legacy", window_start=-3.5, window_stop=100.0)
    got = prepare_batch(energy, mu, params, "Cu", "K")
    assert [type(r).__name__ for r in got] == ["Prepared"] * 3 + ["SpectrumError"]
    assert _compare(energy, mu, params) == 3


def test_find_e0_batch_equals_find_e0_on_coarse_noisy_scans() -> None:
    """Coarse scans (15-20 eV steps) have near-ties in the derivative maximum; a matrix
    version of the search broke them differently from the single one by up to 8 eV."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        m = int(rng.integers(40, 80))
        energy = np.cumsum(np.r_[8900.0, rng.uniform(1.0, 20.0, m - 1)])
        edge = 8979.0 + rng.normal(0, 3)
        mu = 1.0 / (1.0 + np.exp(-(energy[None, :] - edge) / 2.0)) + rng.normal(0, 0.02, (6, m))
        shifts = rng.normal(0, 2, 6)
        e0, errors = find_e0_batch(energy, mu, "Cu", "K", 40.0, shifts)
        for i in range(6):
            try:
                want = find_e0(Spectrum(energy + shifts[i], mu[i], "Cu", "K"), 40.0)
            except SpectrumError as exc:
                assert errors[i] is not None and errors[i].reason == exc.reason
                continue
            assert errors[i] is None and e0[i] == want


def test_e0_rows_of_a_row_do_not_depend_on_its_neighbours() -> None:
    """A stack's rows each get the E0 they get alone, in any order; the one-pass kernel is
    the Gaussian smooth followed by central differences."""
    from xasflow.spectra.e0 import _KERNEL, E0_STEP, e0_rows, on_grid, smoothed_derivative

    energy, mu = fly_page(n=8)
    grid = np.arange(8950.0, 9010.0, E0_STEP)
    m = on_grid(grid, energy, mu)
    together = e0_rows(grid, m)
    alone = np.array([e0_rows(grid, m[i : i + 1])[0] for i in range(8)])
    order = np.random.default_rng(3).permutation(8)
    assert together.tolist() == alone.tolist()
    assert e0_rows(grid, m[order]).tolist() == together[order].tolist()
    smooth = np.convolve(np.pad(m[0], 15, mode="edge"), _KERNEL, "valid")
    central = (smooth[2:] - smooth[:-2]) / (2 * E0_STEP)
    np.testing.assert_allclose(smoothed_derivative(m[0])[0, 1:-1], central, rtol=1e-9, atol=1e-12)
    flat = e0_rows(grid, np.ones((1, grid.size)))  # mu never rises: NaN, not a grid point
    assert np.isnan(flat).all()


def test_e0_of_an_edge_between_two_distant_points_is_the_centre_of_the_jump() -> None:
    """No point between 8975 and 8985 eV: mu is a straight line there and its smoothed
    derivative flat to rounding; E0 is the middle of that stretch, in a stack as alone (the
    first of the tied maxima moved by eV with the summation order)."""
    energy = np.r_[np.arange(8900.0, 8976.0, 5.0), np.arange(8985.0, 9100.0, 5.0)]
    rng = np.random.default_rng(4)
    mu = np.where(energy < 8980.0, 0.1, 1.1) + 1e-3 * rng.standard_normal((5, energy.size))
    e0, errors = find_e0_batch(energy, mu, "Cu", "K", 40.0)
    assert errors == [None] * 5
    np.testing.assert_allclose(e0, 8980.0, atol=0.06)
    for i in range(5):
        assert e0[i] == find_e0(Spectrum(energy, mu[i], "Cu", "K"), 40.0)


def test_a_lone_spike_is_not_the_edge() -> None:
    """A glitch of 1e6, a jump to 5 or a dropout to -5 at one point within the E0 search
    window (two in a row, the dropout beside a 1e6 one point on) is no edge: each row gets
    its clean E0 (the spike's flank was E0, 20-35 eV off), in a batch as alone, bit for bit."""
    energy, clean = fly_page(n=7)
    shifts = np.array([0.0, 1.0, -2.5, 3.3, 0.0, -1.2, 0.7])
    pairs = zip(shifts, clean, strict=True)
    want = [find_e0(Spectrum(energy + s, row, "Cu", "K")) for s, row in pairs]
    mu = clean.copy()
    at = {e: int(np.searchsorted(energy, CU_K + e)) for e in (-30, 20, 25, 35)}
    mu[0, at[-30]] = 1e6
    mu[1, at[20]] = 1e6
    mu[2, at[-30]] = -5.0
    mu[3, at[25]] = 5.0
    mu[4, [at[-30], at[35]]] = -5.0, 1e6  # two, far apart
    mu[5, [at[20], at[20] + 2]] = 1e6, -5.0  # the dropout is no spike until the 1e6 goes
    mu[6, [at[-30], at[20]]] = 1e6, 1e6  # two alike: neither widens the span for the other
    e0, errors = find_e0_batch(energy, mu, "Cu", "K", 40.0, shifts)
    assert errors == [None] * 7
    for i in range(7):
        alone = find_e0(Spectrum(energy + shifts[i], mu[i], "Cu", "K"))
        assert alone == pytest.approx(want[i], abs=1e-9), i
        assert e0[i] == alone
    # without an element the whole scan is searched: a spike anywhere is none, and a
    # "0 0" row before the scan (a stray) no part of it
    e0, errors = find_e0_batch(energy, mu[:5], None)
    bare = find_e0(Spectrum(energy, clean[0], None))
    assert e0.tolist() == [find_e0(Spectrum(energy, row, None)) for row in mu[:5]]
    np.testing.assert_allclose(e0, [find_e0(Spectrum(energy, row, None)) for row in clean[:5]])
    padded = Spectrum(np.r_[0.0, energy], np.r_[0.0, clean[0]], None)
    assert find_e0(padded) == bare


def test_a_lone_spike_in_a_library_scan_is_not_the_edge(xdi_library: Path) -> None:
    """Cu foil (10 eV steps below the edge) with a 1e6 or a -5 at E0-30 eV, a 1e6 at E0+20
    eV or a 5 at E0+25 eV keeps its E0 8980.54 eV (was 8954.0, 8959.3, 9000.5, 9005.3); no
    scan of the library has a lone spike or a stray point for the search to leave out."""
    spectrum = xdi_to_spectrum(read_xdi(xdi_library / "Cu/cu_metal_rt.xdi"))
    want = find_e0(spectrum)
    assert want == pytest.approx(8980.54, abs=0.01)
    for at, value in ((-30.0, 1e6), (-30.0, -5.0), (20.0, 1e6), (25.0, 5.0)):
        mu = spectrum.mu.copy()
        mu[int(np.searchsorted(spectrum.energy, want + at))] = value
        assert find_e0(spectrum.with_(mu=mu)) == want, (at, value)
        assert find_e0_batch(spectrum.energy, mu[None, :], "Cu")[0][0] == want
    for path in sorted(xdi_library.glob("*/*.xdi")):
        try:
            scan = xdi_to_spectrum(read_xdi(path))
        except (SpectrumError, ValueError):
            continue
        bulk, keep = scan_points(scan.energy, scan.mu[None, :])
        assert bulk == slice(0, scan.energy.size) and keep is None, path


def test_one_glitch_in_a_foils_pre_edge_does_not_hide_its_edge() -> None:
    """A clear foil edge with one pre-edge reading off by 0.6 of the step (E0 - 25 eV) still
    has its edge, in the one-spectrum and the batch check alike: with a plain standard
    deviation of the pre-edge differences that one point made the noise large enough to
    refuse it (align_failed, the spectrum analysed unaligned). A flat foil still has none."""
    from tests.helpers import transmission

    energy = np.arange(8800.0, 9400.0, 2.0)  # a step scan's 2 eV: 16 pre-edge points
    rng = np.random.default_rng(5)
    rows = []
    for seed in range(3):
        ch = transmission(energy, seed=seed)
        mu = mu_from_channels("reference", ch["It"], ch["Ir"])
        rows.append(mu + 2e-3 * rng.standard_normal(energy.size))
    clean = Spectrum(energy, rows[0])
    step = float(
        np.median(clean.mu[(energy > CU_K + 10) & (energy < CU_K + 40)])
        - np.median(clean.mu[(energy > CU_K - 40) & (energy < CU_K - 10)])
    )
    glitched = []
    for mu in rows:
        g = mu.copy()
        g[int(np.argmin(np.abs(energy - (CU_K - 25.0))))] += 0.6 * step
        glitched.append(g)
    flat = np.full(energy.size, 0.3) + 1e-3 * rng.standard_normal(energy.size)
    stack = np.array([*glitched, flat])
    single = [has_edge(Spectrum(energy, mu), CU_K) for mu in stack]
    assert single == [True, True, True, False]
    assert has_edge_batch(energy, stack, np.full(4, CU_K)).tolist() == single


def test_the_foil_check_of_a_page_is_each_foils_own_at_any_edge_position() -> None:
    """``has_edge_batch`` takes each row's pre-edge noise from the run of columns its window
    covers (one sort for the page, not numpy's row-by-row ``nanmedian``): rows whose windows
    start, end and count differently (E0 near the scan's start: 0-2 pre-edge points; edges
    of every size against the noise; rounded readings, so the medians meet ties) decide as
    ``has_edge`` on each alone. A row with a NaN decides False and leaves the others alone."""
    rng = np.random.default_rng(11)
    energy = np.unique(np.sort(8930.0 + rng.uniform(0.0, 160.0, 400)))
    e0 = CU_K + rng.uniform(-50.0, 30.0, 40)
    e0[:3] = energy[0] + np.array([9.0, 36.0, 39.5])  # windows cut by the scan's start
    step = rng.choice([0.0, 0.002, 0.02, 1.0], e0.size)
    noise = rng.uniform(1e-4, 0.01, e0.size)
    stack = (energy[None, :] > e0[:, None]) * step[:, None] + noise[:, None] * rng.normal(
        size=(e0.size, energy.size)
    )
    stack[::4] = np.round(stack[::4], 3)
    single = [has_edge(Spectrum(energy, mu), e) for mu, e in zip(stack, e0, strict=True)]
    assert 5 < sum(single) < e0.size - 5  # both answers are tested
    assert has_edge_batch(energy, stack, e0).tolist() == single
    # the noise itself, bit for bit, as has_edge computes it (the decision alone is coarse)
    pre = (energy >= e0[:, None] - 40.0) & (energy <= e0[:, None] - 8.0)
    judged = pre.sum(axis=1) >= 3
    want = []
    for mu, p in zip(stack[judged], pre[judged], strict=True):
        d = np.diff(mu[p])
        want.append(1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0))
    got_noise = _pre_edge_noise(energy, stack, pre, pre.sum(axis=1), judged)
    assert got_noise[judged].tolist() == want and np.isnan(got_noise[~judged]).all()
    holed = stack.copy()
    holed[5, np.searchsorted(energy, e0[5] - 20.0)] = np.nan
    got = has_edge_batch(energy, holed, e0).tolist()
    assert got[5] is False and got[:5] + got[6:] == single[:5] + single[6:]
