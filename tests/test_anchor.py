"""The model grid's origin (PrepParams.align): E0, or the centroid of the edge's rise."""

from __future__ import annotations

import numpy as np
import pytest
from scan_helpers import two_rises

from xasflow.spectra import PrepParams, Spectrum, find_e0, prepare
from xasflow.spectra.anchor import centroid
from xasflow.spectra.batch import BATCH_MIN_ROWS, prepare_batch

ENERGY = np.arange(8800.0, 9200.0, 0.5)
#: two rises of equal slope 6 eV apart (scan_helpers.two_rises)
MU = two_rises(ENERGY)
CENTROID = PrepParams(align="centroid")


def noisy(k: int, sigma: float = 0.01) -> np.ndarray:
    """Row k of a fixed-seed stack: MU plus point noise of ``sigma`` of the step (1.0)."""
    return MU + np.random.default_rng(k).normal(0.0, sigma, ENERGY.size)


def test_the_centroid_stays_put_where_e0_jumps_between_two_rises() -> None:
    e0s, anchors = [], []
    for k in range(30):
        s = Spectrum(ENERGY, noisy(k), "Cu", "K")
        e0 = find_e0(s)
        e0s.append(e0)
        anchors.append(centroid(ENERGY, s.mu, e0, 15.0, 2.0))
    e0s_a, anchors_a = np.array(e0s), np.array(anchors)
    # E0 lands on either rise: both are picked, 6 eV apart
    assert (e0s_a < 8984.0).any() and (e0s_a > 8984.0).any()
    assert np.ptp(e0s_a) > 5.0
    # the centroid lies between them and moves by a fraction of an eV
    assert anchors_a.min() > 8981.0 and anchors_a.max() < 8987.0
    assert np.ptp(anchors_a) < 0.5


def test_no_rise_leaves_the_origin_on_e0() -> None:
    flat = np.full(ENERGY.size, 0.3)
    assert centroid(ENERGY, flat, 8990.0, 15.0, 2.0) == 8990.0
    falling = 1.0 - 1e-3 * (ENERGY - 8800.0)
    assert centroid(ENERGY, falling, 8990.0, 15.0, 2.0) == 8990.0


def test_e0_alignment_is_the_default_and_unchanged() -> None:
    assert PrepParams().align == "e0"
    assert PrepParams().origin(ENERGY, MU, 8983.25) == 8983.25
    # a stored manifest's prep without the field loads as E0-aligned
    assert PrepParams.model_validate({"method": "larch"}).align == "e0"
    assert PrepParams.model_validate(CENTROID.model_dump()).align == "centroid"


def test_the_centroid_grid_is_the_e0_grid_moved_to_the_centroid() -> None:
    s = Spectrum(ENERGY, noisy(3), "Cu", "K")
    on_e0 = prepare(s, PrepParams())
    on_centroid = prepare(s, CENTROID)
    assert on_centroid.e0 == on_e0.e0  # E0, as reported, and the step do not move
    assert on_centroid.edge_step == on_e0.edge_step
    origin = centroid(ENERGY, s.mu, on_e0.e0, 15.0, 2.0)
    assert abs(origin - on_e0.e0) > 1.0
    # the same normalised spectrum, read on the grid counted from the centroid
    grid = CENTROID.grid
    from xasflow.spectra.normalization import normalize

    y, _ = normalize(s, on_e0.e0, CENTROID)
    np.testing.assert_allclose(on_centroid.y, np.interp(grid + origin, ENERGY, y), atol=1e-12)


@pytest.mark.parametrize("params", [PrepParams(), CENTROID])
def test_a_stack_gets_the_grid_one_spectrum_gets(params: PrepParams) -> None:
    n = BATCH_MIN_ROWS + 2  # the matrix path, not the row-by-row one
    mu = np.vstack([noisy(k) for k in range(n)])
    stacked = prepare_batch(ENERGY, mu, params, "Cu", "K")
    for k, got in enumerate(stacked):
        one = prepare(Spectrum(ENERGY, mu[k], "Cu", "K"), params)
        assert not isinstance(got, Exception), got
        assert got.e0 == one.e0
        np.testing.assert_allclose(got.y, one.y, rtol=0, atol=1e-9)
