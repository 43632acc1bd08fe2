"""The single-spectrum shortcuts of ``prepare`` give the general (row-wise) code's numbers
to the last bit: each shortcut against the code it stands in for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.synthetic_feff import model_mu
from xasflow.spectra.e0 import E0_STEP, e0_in_window, e0_rows_why, on_grid
from xasflow.spectra.outliers import MAX_SPIKES, _spikes_1d, lone_spikes
from xasflow.spectra.process import points_within
from xasflow.spectra.quality import edge_snr, edge_snr_rows

CU_K = 8979.0


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _scans() -> list[tuple[np.ndarray, np.ndarray]]:
    """Measured-like and FEFF-like scans, noisy and noise-free, long and short."""
    rng = np.random.default_rng(7)
    out = []
    for points, lo, hi, noise in (
        (1000, -180, 600, 3e-3),
        (120, -40, 160, 1e-2),
        (400, -5, 300, 0.0),
    ):
        rel = np.sort(rng.uniform(lo, hi, points))
        mu = model_mu(rel + CU_K, CU_K, 1.3, 4.0, 2.0) + noise * rng.standard_normal(points)
        out.append((rel, mu))
    out.append((np.linspace(-100.0, 300.0, 400), np.linspace(0.0, 1.0, 400)))  # no noise at all
    out.append((np.linspace(-100.0, 300.0, 400), np.zeros(400)))
    out.append((np.linspace(-10.0, 10.0, 40), np.ones(40)))  # no noise window holds 7 points
    out.append((np.linspace(-100.0, 300.0, 6), np.ones(6)))  # too short
    return out


@pytest.mark.parametrize("step", [1.0, 0.37, -0.5, 0.0, math.nan])
def test_edge_snr_of_one_spectrum_is_its_row_of_edge_snr_rows(step: float) -> None:
    for rel, mu in _scans():
        for shift in (0.0, 25.0, -12.3):
            want = float(edge_snr_rows(rel - shift, mu, np.array([step]))[0])
            assert _same(edge_snr(rel - shift, mu, step), want), (rel.size, shift, step)


def test_e0_in_window_is_e0_rows_why_of_the_row_on_grid() -> None:
    """The one spectrum's E0 interpolates its row directly, as :func:`on_grid` does."""
    for rel, mu in _scans()[:3]:
        energy = rel + CU_K
        for lo, hi in ((energy[0], energy[-1]), (CU_K - 40.0, CU_K + 40.0)):
            lo, hi = max(lo, energy[0]), min(hi, energy[-1])
            grid = np.arange(lo, hi, E0_STEP)
            found, _ = e0_rows_why(grid, on_grid(grid, energy, mu), low_border=lo > energy[0])
            assert e0_in_window(energy, mu, lo, hi, "Cu", "K", CU_K) == found[0]


def test_lone_spikes_of_one_row_decide_as_the_rows_of_a_page() -> None:
    """The one-row test of :func:`lone_spikes` (a spike or none) is the page's, row by row."""
    rng = np.random.default_rng(3)
    for _, mu in _scans()[:3]:
        spiked = mu.copy()
        spiked[rng.integers(2, mu.size - 2)] = 1e6
        for row in (mu, spiked, mu[::-1]):
            page = lone_spikes(np.vstack([row, mu]))
            one = lone_spikes(row[None, :])
            assert (one is None) == (page is None or page[0].all())
            if one is not None:
                assert page is not None and np.array_equal(one[0], page[0])


def _spikes_every_round(v: np.ndarray) -> np.ndarray | None:
    """``outliers._spikes_1d`` without its early stop: each round measures the rest's span."""
    keep = np.ones(v.size, dtype=bool)
    for _ in range(MAX_SPIKES):
        at = np.flatnonzero(keep)
        w = v[at]
        d = w[1:] - w[:-1]
        away = np.maximum(np.minimum(d[:-1], -d[1:]), np.minimum(-d[:-1], d[1:]))
        top = away.max()
        if not top > 0:
            break
        out = away >= 0.5 * top
        rest = np.ones(w.size, dtype=bool)
        rest[1:-1] = ~out
        spike = out & (away > w[rest].max() - w[rest].min())
        if not spike.any():
            break
        keep[at[1:-1][spike]] = False
    return None if keep.all() else keep


def test_spikes_stop_early_where_the_ends_span_every_point() -> None:
    """The early stop (no point further out than the ends span) finds the spikes each full
    round finds: edges, noise, one to four spikes and dropouts, NaN."""
    rng = np.random.default_rng(11)
    rows = [mu for _, mu in _scans()]
    for _ in range(300):
        mu = rows[int(rng.integers(3))].copy()
        for _ in range(int(rng.integers(0, 5))):
            j = int(rng.integers(0, mu.size))
            mu[j] = rng.choice([1e6, -1e3, mu[j] + rng.uniform(-3, 3), np.nan])
        rows.append(mu)
        rows.append(rng.standard_normal(int(rng.integers(12, 30))))
    for v in rows:
        want, got = _spikes_every_round(v), _spikes_1d(v)
        assert (got is None) == (want is None)
        if got is not None:
            assert np.array_equal(got, want)
    # a short row may lose so many points that a round has none to measure: both raise
    with pytest.raises(ValueError):
        _spikes_every_round(np.array([0.0, 9.0, 0.0, 9.0, 0.0]))
    with pytest.raises(ValueError):
        _spikes_1d(np.array([0.0, 9.0, 0.0, 9.0, 0.0]))


def test_points_within_counts_as_the_mask_does() -> None:
    """The window's point count by binary search is the count of the two comparisons,
    bounds on data points, between them, outside the data and crossed included."""
    rng = np.random.default_rng(5)
    for rel, _ in _scans():
        bounds = [rel[0], rel[-1], rel[len(rel) // 2], rel[0] - 1.0, rel[-1] + 1.0]
        bounds += rng.uniform(rel[0] - 20.0, rel[-1] + 20.0, 20).tolist()
        for lo in bounds:
            for hi in bounds:
                want = int(np.count_nonzero((rel >= lo) & (rel <= hi)))
                assert points_within(rel, float(lo), float(hi)) == want


def test_a_stack_of_few_rows_is_prepared_by_prepare_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below ``BATCH_MIN_ROWS`` checked rows, ``prepare_batch`` hands each row to ``prepare``
    (faster there): its results are ``prepare``'s to the last bit, refusals included; from
    ``BATCH_MIN_ROWS`` rows on the matrix path runs, agreeing to rounding."""
    from xasflow.spectra import Prepared, PrepParams, Spectrum, SpectrumError, batch, prepare

    rng = np.random.default_rng(3)
    energy = np.linspace(8800.0, 9400.0, 1000)
    rows = [
        0.4 + 2e-4 * (energy - 8800) + model_mu(energy, CU_K + rng.uniform(-3, 3), 1.3, 4.0, 2.0)
        for _ in range(batch.BATCH_MIN_ROWS)
    ]
    rows[1] = np.linspace(2.0, 1.0, energy.size)  # falls throughout: refused
    mu = np.array(rows) + 3e-3 * rng.standard_normal((len(rows), energy.size))
    shifts = rng.uniform(-3.0, 3.0, len(rows))
    params = PrepParams()

    def alone(i: int) -> Prepared | SpectrumError:
        try:
            return prepare(Spectrum(energy + shifts[i], mu[i], "Cu", "K"), params)
        except SpectrumError as exc:
            return exc

    matrix_calls: list[int] = []
    real = batch._prepare_fast

    def counting(*args: object, **kwargs: object) -> object:
        matrix_calls.append(len(args[1]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(batch, "_prepare_fast", counting)
    few = batch.BATCH_MIN_ROWS - 1
    got = batch.prepare_batch(energy, mu[:few], params, "Cu", "K", shifts=shifts[:few])
    assert matrix_calls == []
    for i, res in enumerate(got):
        want = alone(i)
        if isinstance(want, SpectrumError):
            assert isinstance(res, SpectrumError) and (res.reason, res.message) == (
                want.reason,
                want.message,
            )
            continue
        assert isinstance(res, Prepared)
        assert res.y.tobytes() == want.y.tobytes()
        assert (res.e0, res.edge_step, res.extrapolated) == (
            want.e0,
            want.edge_step,
            want.extrapolated,
        )
    assert (
        isinstance(got[1], SpectrumError) and sum(isinstance(r, Prepared) for r in got) == few - 1
    )
    full = batch.prepare_batch(energy, mu, params, "Cu", "K", shifts=shifts)
    assert matrix_calls == [batch.BATCH_MIN_ROWS]
    for i, res in enumerate(full):
        want = alone(i)
        if isinstance(want, SpectrumError):
            assert isinstance(res, SpectrumError) and res.reason == want.reason
        else:
            assert isinstance(res, Prepared)
            np.testing.assert_allclose(res.y, want.y, rtol=0, atol=1e-12)
