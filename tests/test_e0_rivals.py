"""Rival rises of an edge (PrepParams.e0_rivals): found whichever rise E0 lands on, gridded
in both preparation paths, and their graph outputs joined into one answer per spectrum."""

from __future__ import annotations

import numpy as np
import pytest
from scan_helpers import two_rises

from xasflow.spectra import PrepParams, Spectrum, find_e0, prepare
from xasflow.spectra.batch import BATCH_MIN_ROWS, prepare_batch
from xasflow.spectra.e0_rivals import rival_origins
from xasflow.spectra.process import normalize

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


def test_rivals_need_the_grid_on_e0() -> None:
    with pytest.raises(ValueError, match="needs align 'e0'"):
        PrepParams(e0_rivals=0.8, align="centroid")
    assert PrepParams().e0_rivals is None  # off unless a bundle says so
    assert PrepParams.model_validate(RIVALS.model_dump()).e0_rivals == 0.8
