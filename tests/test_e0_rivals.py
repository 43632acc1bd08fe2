"""Rival rises of an edge (PrepParams.e0_rivals): found whichever rise E0 lands on, gridded
in both preparation paths, and their graph outputs joined into one answer per spectrum."""

from __future__ import annotations

import numpy as np
import pytest
from scan_helpers import two_rises

from xasflow.spectra import PrepParams, Spectrum, find_e0, prepare
from xasflow.spectra.batch import BATCH_MIN_ROWS, prepare_batch
from xasflow.spectra.e0_rivals import (
    _chosen,
    _chosen_rows,
    _peaks,
    _peaks_rows,
    rival_origins,
    rival_origins_rows,
)
from xasflow.spectra.normalization import normalize

ENERGY = np.arange(8800.0, 9200.0, 0.5)
#: two rises of equal slope 6 eV apart (scan_helpers.two_rises)
MU = two_rises(ENERGY)
#: one rise only
CLEAR = 0.2 + np.arctan((ENERGY - 8984.0) / 1.5) / np.pi + 0.5
RIVALS = PrepParams(e0_rivals=0.8)


def noisy(k: int, sigma: float = 0.01) -> np.ndarray:
    """Row k of a fixed-seed stack: MU plus point noise of ``sigma`` of the step (1.0)."""
    return MU + np.random.default_rng(k).normal(0.0, sigma, ENERGY.size)


def test_the_other_rise_is_found_whichever_rise_e0_lands_on() -> None:
    origins = []
    for k in range(30):
        mu = noisy(k)
        e0 = find_e0(Spectrum(ENERGY, mu, "Cu", "K"))
        rivals = rival_origins(ENERGY, mu, e0, 0.8, 10.0)
        assert len(rivals) == 1, (k, e0, rivals)
        origins.append(sorted([e0, rivals[0]]))
    grids = np.array(origins)
    # noise picks either rise as E0 ...
    e0s = [find_e0(Spectrum(ENERGY, noisy(k), "Cu", "K")) for k in range(30)]
    assert min(e0s) < 8984.0 < max(e0s)
    # ... and the pair of grids is the same: one near each rise
    assert np.all(np.abs(grids[:, 0] - 8981.0) < 1.0)
    assert np.all(np.abs(grids[:, 1] - 8987.0) < 1.0)


def test_a_clear_edge_and_a_weak_shoulder_have_no_rival() -> None:
    assert rival_origins(ENERGY, CLEAR, 8984.0, 0.8, 10.0) == ()
    weak = (
        0.2
        + 0.15 * (np.arctan((ENERGY - 8979.0) / 1.0) / np.pi + 0.5)
        + 0.85 * (np.arctan((ENERGY - 8987.0) / 1.0) / np.pi + 0.5)
    )
    assert rival_origins(ENERGY, weak, 8987.0, 0.8, 10.0) == ()
    assert len(rival_origins(ENERGY, weak, 8987.0, 0.1, 10.0)) == 1  # the ratio decides
    assert rival_origins(ENERGY, MU, 8987.0, 0.8, 3.0) == ()  # and the window


def test_prepare_adds_the_grid_on_the_rival_normalised_at_e0() -> None:
    s = Spectrum(ENERGY, noisy(3), "Cu", "K")
    plain, both = prepare(s, PrepParams()), prepare(s, RIVALS)
    assert plain.alternates == ()
    np.testing.assert_array_equal(both.y, plain.y)  # E0's grid, E0 and the step unchanged
    assert (both.e0, both.edge_step) == (plain.e0, plain.edge_step)
    (alt,) = both.alternates
    (at,) = rival_origins(ENERGY, s.mu, both.e0, 0.8, 10.0)
    y, _ = normalize(s, both.e0, RIVALS)
    np.testing.assert_allclose(alt, np.interp(RIVALS.grid + at, ENERGY, y), atol=1e-12)
    assert prepare(Spectrum(ENERGY, CLEAR, "Cu", "K"), RIVALS).alternates == ()


def test_a_rival_grid_past_the_data_is_left_out() -> None:
    # the lower rise a little steeper, so E0 is on it and the rival 6 eV above
    mu = MU + 0.05 * (np.arctan((ENERGY - 8981.0) / 0.5) / np.pi + 0.5)
    short = ENERGY < 8981.0 + 56.5 + 2.0  # ends where E0's grid (-3.5 .. +56.5 eV) still fits
    s = Spectrum(ENERGY[short], mu[short], "Cu", "K")
    e0 = find_e0(s)
    assert abs(e0 - 8981.0) < 1.0
    assert rival_origins(s.energy, s.mu, e0, 0.8, 10.0)  # the upper rise is there ...
    assert prepare(s, RIVALS).alternates == ()  # ... but its grid runs 4 eV past the data
    whole = prepare(Spectrum(ENERGY, mu, "Cu", "K"), RIVALS)
    assert len(whole.alternates) == 1  # with the data, it is kept


def test_a_stack_gets_the_rival_grids_one_spectrum_gets() -> None:
    n = BATCH_MIN_ROWS + 2  # the matrix path, not the row-by-row one
    mu = np.vstack([noisy(k) for k in range(n)])
    stacked = prepare_batch(ENERGY, mu, RIVALS, "Cu", "K")
    for k, got in enumerate(stacked):
        one = prepare(Spectrum(ENERGY, mu[k], "Cu", "K"), RIVALS)
        assert not isinstance(got, Exception), got
        assert len(got.alternates) == len(one.alternates) == 1
        np.testing.assert_allclose(got.alternates[0], one.alternates[0], atol=1e-12)


def test_the_search_for_many_spectra_finds_each_ones_rivals_bit_for_bit() -> None:
    """rival_origins_rows (the stack path's search) gives each spectrum exactly the rivals
    rival_origins gives it alone: two rises and one, noisy and clean, a flat top (a coarse
    linear stretch), windows cut by the data's ends, E0s that give search grids of several
    lengths, each row on its own shifted axis, and a window too short to search."""
    rng = np.random.default_rng(7)
    axes, mus, e0s = [], [], []
    for k in range(120):
        shift = rng.uniform(-3.0, 3.0)
        axis = ENERGY + shift
        base = (MU if k % 3 else CLEAR) + rng.normal(0.0, (0.0, 0.005, 0.02)[k % 3], ENERGY.size)
        if k % 10 == 4:  # clean, straight over the second rise: the derivative's flat top
            axis = np.concatenate((ENERGY[:370], ENERGY[379:])) + shift
            base = np.concatenate((MU[:370], MU[379:]))
        e0 = find_e0(Spectrum(axis, base, "Cu", "K")) + rng.uniform(-0.05, 0.05)
        if k % 17 == 5:  # E0 near the scan's start or end: the window is cut short
            e0 = float(axis[0] + rng.uniform(1.0, 9.0) if k % 2 else axis[-1] - 3.0)
        axes.append(axis)
        mus.append(base)
        e0s.append(float(e0))
    for ratio, window in ((0.8, 10.0), (0.5, 10.0), (0.8, 3.0), (0.8, 1.0)):
        alone = [
            rival_origins(a, m, e, ratio, window) for a, m, e in zip(axes, mus, e0s, strict=True)
        ]
        together = rival_origins_rows(axes, mus, e0s, ratio, window)
        assert together == alone  # floats compared exactly
        if window >= 5:  # the two rises are 6 eV apart: most rows see both
            assert sum(bool(r) for r in alone) > 30
    assert rival_origins_rows([], [], [], 0.8, 10.0) == []


def test_a_ratio_above_one_keeps_no_rival_for_many_spectra_as_for_one() -> None:
    """No peak is steeper than the steepest: rival_origins finds none, and the rows' search
    too, instead of reading the first of no kept peaks (IndexError before)."""
    axes, mus = [ENERGY, ENERGY], [MU, CLEAR]
    e0s = [find_e0(Spectrum(a, m, "Cu", "K")) for a, m in zip(axes, mus, strict=True)]
    alone = [rival_origins(a, m, e, 1.5, 10.0) for a, m, e in zip(axes, mus, e0s, strict=True)]
    assert alone == [(), ()]
    assert rival_origins_rows(axes, mus, e0s, 1.5, 10.0) == alone


def test_the_peaks_of_many_rows_are_each_rows_peaks() -> None:
    """_peaks_rows on a matrix gives each row exactly _peaks's maxima: rows of noise (a turn
    at a row's end must not pair with the next row's first), level tops with rounding
    ripples below TIE (one maximum at the centre), a row with NaNs and one all NaN."""
    rng = np.random.default_rng(3)
    n, m = 40, 90
    derivs = rng.normal(size=(n, m))
    ripple = 1.0 + np.where(np.arange(9) % 2, 1e-13, 0.0)
    for k in range(0, n, 4):  # a level top with sub-TIE ripples somewhere in the row
        at = rng.integers(5, m - 15)
        derivs[k, at : at + 9] = 5.0 * ripple
    derivs[8, m - 5 : m - 3] = np.nan  # beside its level top
    derivs[9] = np.nan
    grids = 8970.0 + 0.1 * np.arange(m) + rng.uniform(-1, 1, (n, 1))
    rows, at_all, height_all = _peaks_rows(grids, derivs)
    assert np.all(np.diff(rows) >= 0)
    for k in range(n):
        at, height = _peaks(grids[k], derivs[k])
        np.testing.assert_array_equal(at_all[rows == k], at)
        np.testing.assert_array_equal(height_all[rows == k], height)


def test_the_rivals_chosen_for_many_rows_are_each_rows_choice() -> None:
    """_chosen_rows (all rows' peaks sorted at once) keeps exactly _chosen's rivals of each
    row: equal heights (first in position order first), a kept peak within APART of a higher
    rival or of E0, three or more kept, peaks outside the window, none kept, no peak at all,
    a NaN height, a row whose steepest is not positive, and ratios 0, 0.8, 1 and 1.5."""
    rng = np.random.default_rng(11)
    rows: list[tuple[np.ndarray, np.ndarray]] = [
        (np.array([8981.0, 8987.0]), np.array([2.0, 2.0])),  # a tie: the first is higher
        (np.array([8980.0, 8984.6, 8988.0, 8988.5]), np.array([1.9, 2.0, 1.95, 1.99])),
        (np.array([8975.0, 8990.0, 8999.0]), np.array([5.0, 1.0, 9.0])),  # the steepest outside
        (np.zeros(0), np.zeros(0)),
        (np.array([8983.0, 8986.0]), np.array([np.nan, 2.0])),
        (np.array([8983.0, 8986.0]), np.array([-1.0, -2.0])),
    ]
    for _ in range(60):  # random peaks, ties likely (heights of one decimal)
        n = int(rng.integers(1, 8))
        rows.append((np.sort(rng.uniform(8972, 8998, n)), rng.integers(1, 20, n) / 10.0))
    e0s = [8984.0 + 0.5 * (k % 3) for k in range(len(rows))]
    r = np.concatenate([np.full(a.size, k) for k, (a, _) in enumerate(rows)])
    at = np.concatenate([a for a, _ in rows])
    height = np.concatenate([h for _, h in rows])
    for ratio in (0.0, 0.8, 1.0, 1.5):
        alone = []
        for (a, h), e0 in zip(rows, e0s, strict=True):
            inner = (a >= e0 - 10.0) & (a <= e0 + 10.0)
            alone.append(_chosen(a[inner], h[inner], e0, ratio))
        with np.errstate(invalid="ignore"):  # the NaN height's maximum
            assert _chosen_rows(r, at, height, e0s, ratio, 10.0) == alone
        if ratio == 0.8:
            assert alone[:3] == [(8981.0, 8987.0), (8988.5, 8980.0), (8975.0,)]
            assert sum(len(c) > 1 for c in alone) > 5


def test_rivals_need_the_grid_on_e0() -> None:
    with pytest.raises(ValueError, match="needs align 'e0'"):
        PrepParams(e0_rivals=0.8, align="centroid")
    assert PrepParams().e0_rivals is None  # off unless a bundle says so
    assert PrepParams.model_validate(RIVALS.model_dump()).e0_rivals == 0.8
