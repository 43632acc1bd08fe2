"""The batched Larch-convention normalisation (``xasflow.spectra.norm_batch``) inside
``prepare_batch``, against the per-spectrum ``prepare``, row by row, to 1e-9."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.synthetic_feff import model_mu
from xasflow.spectra import PrepParams, Spectrum, SpectrumError, edge_energy, prepare
from xasflow.spectra import batch as batch_module
from xasflow.spectra.batch import prepare_batch

pytestmark = pytest.mark.usefixtures("matrix_rows")  # the matrix path, small pages too

CU_K = 8979.0
MANIFEST = Path(__file__).resolve().parents[1] / "models" / "cu-k" / "manifest.json"
SHIPPED = PrepParams.model_validate(json.loads(MANIFEST.read_text())["prep"])
DEFAULT = PrepParams(window_stop=116.5, n_points=240)
EXACT = PrepParams(weighting="points", edge_tail=False, window_stop=116.5, n_points=240)
#: every range and the degree set by hand (a cubic)
CUSTOM = DEFAULT.model_copy(
    update={"pre1": -60.0, "pre2": -20.0, "norm1": 30.0, "norm2": 300.0, "nnorm": 3}
)
RULES = [SHIPPED, DEFAULT, EXACT]  # ranges and degree by Larch's rules for the scan
RULE_IDS = ["shipped", "default", "larch-exact"]
PARAMS, IDS = [*RULES, CUSTOM], [*RULE_IDS, "custom"]


@pytest.fixture(autouse=True)
def _no_per_row_normalize(monkeypatch: pytest.MonkeyPatch) -> None:
    """The larch rows must go through the batched code, never the per-row ``normalize``."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("prepare_batch normalised a larch row one by one")

    monkeypatch.setattr(batch_module, "normalize", refuse)
    monkeypatch.setattr(batch_module, "LARCH_MIN_ROWS", 1)  # batched however few the rows


def _compare(
    energy: np.ndarray,
    mu: np.ndarray,
    params: PrepParams,
    shifts: np.ndarray | None = None,
    metas: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Check every row of ``prepare_batch`` against ``prepare``; the outcome of each row
    ("ok" or the error's reason)."""
    n = len(mu)
    shifts = np.zeros(n) if shifts is None else np.asarray(shifts, dtype=float)
    metas = [{} for _ in range(n)] if metas is None else metas
    got = prepare_batch(energy, mu, params, "Cu", "K", shifts=shifts, metas=metas)
    outcomes = []
    for row, s, meta, res in zip(mu, shifts, metas, got, strict=True):
        try:
            want = prepare(Spectrum(energy + s, row, "Cu", "K", meta=dict(meta)), params)
        except SpectrumError as exc:
            assert isinstance(res, SpectrumError), f"batch gave a result, prepare {exc}"
            assert (res.reason, res.message) == (exc.reason, exc.message)
            outcomes.append(exc.reason)
            continue
        assert not isinstance(res, SpectrumError), res
        assert res.e0 == pytest.approx(want.e0, abs=1e-9)
        assert res.edge_step == pytest.approx(want.edge_step, rel=1e-9)
        np.testing.assert_allclose(res.y, want.y, rtol=1e-9, atol=1e-12)
        assert res.extrapolated == pytest.approx(want.extrapolated, abs=1e-9)
        outcomes.append("ok")
    return outcomes


def _edge(energy: np.ndarray, e0: float, seed: int, background: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = model_mu(energy, e0, 1.0 + 0.3 * (seed % 3), 3.0 + seed % 4, 2.0 + 0.1 * (seed % 5))
    if not background:
        return mu
    return 0.4 + 2e-4 * (energy - 8800) + 0.8 * mu + 0.003 * rng.standard_normal(energy.size)


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_measured_rows_with_their_own_e0_and_shift(params: PrepParams) -> None:
    """A 1,000-point fly page: E0s 25 eV apart, every row shifted, and the two ways a step
    is rejected (a post-edge rising so fast that its line is negative at E0; a tiny step
    under a huge peak that normalises beyond ``max_norm``)."""
    energy = np.linspace(8800.0, 9400.0, 1000)
    e0s = [CU_K - 12, CU_K - 3, CU_K, CU_K + 4, CU_K + 13, CU_K + 7, CU_K - 6]
    rows = [_edge(energy, e0, i) for i, e0 in enumerate(e0s)]
    rel = energy - CU_K
    rows.append(0.1 * _edge(energy, CU_K, 9, False) + np.clip(0.01 * (rel - 30), 0, None))
    rows.append(0.05 * _edge(energy, CU_K, 10, False) + 8 * np.exp(-0.5 * ((rel - 8) / 2) ** 2))
    shifts = np.array([0.0, 1.3, -2.2, 3.7, -0.4, 0.9, -3.1, 0.5, -1.0])
    metas: list[dict[str, Any]] = [{} for _ in rows]
    metas[5] = {"calculated": False}
    outcomes = _compare(energy, np.array(rows), params, shifts, metas)
    assert outcomes == ["ok"] * 7 + ["edge_step"] * 2


@pytest.mark.parametrize("params", RULES, ids=RULE_IDS)
def test_short_and_coarse_scans_lower_the_degree(params: PrepParams) -> None:
    """Post-edge spans under 30 eV (degree 0) and 30-300 eV (degree 1) in one batch, and a
    scan too short for the model window; all as the per-row function says."""
    energy = np.linspace(8850.0, 9035.0, 700)
    e0s = [CU_K - 10, CU_K - 4, CU_K + 2, CU_K + 8, CU_K + 14]
    mu = np.array([_edge(energy, e0, i) for i, e0 in enumerate(e0s)])
    short = params.model_copy(update={"min_post_edge": 30.0, "window_stop": 30.0})
    assert _compare(energy, mu, short, np.linspace(-2, 2, 5)) == ["ok"] * 5
    assert _compare(energy, mu, params)[-1] == "no_post_edge"  # ends at E0+42 eV
    assert _compare(energy[:600], mu[:, :600], params) == ["no_post_edge"] * 5  # every row


@pytest.mark.parametrize("params", RULES, ids=RULE_IDS)
def test_sparse_post_edge_falls_back_like_edge_fit(params: PrepParams) -> None:
    """One point from norm1 to norm2 (the range is widened by two points below, a constant
    fitted), four points over 375 eV (a line, not a quadratic), and a pre-edge of three
    points (a constant background); a measured scan starting under 10 eV below E0 has no
    pre-edge to speak of and is refused, by both paths alike."""
    fine = np.arange(8850.0, CU_K + 12.0, 0.5)
    window = params.model_copy(update={"window_stop": 50.0})
    one = np.concatenate((fine, CU_K + np.array([52.0, 53.0])))
    four = np.concatenate((fine, CU_K + np.array([100.0, 200.0, 300.0, 400.0])))
    short_pre = np.concatenate((CU_K + np.array([-14.0, -11.5, -9.0]), np.arange(CU_K - 2, 9100)))
    shifts = np.array([0.0, 0.6, -0.8])
    for energy in (one, four, short_pre):
        mu = np.array([_edge(energy, CU_K + d, i) for i, d in enumerate((-1.5, 0.0, 1.0))])
        assert _compare(energy, mu, window, shifts) == ["ok"] * 3
    late = np.concatenate((CU_K + np.array([-6.0, -4.5, -3.0]), np.arange(CU_K - 2, 9100)))
    mu = np.array([_edge(late, CU_K + d, i) for i, d in enumerate((-1.5, 0.0, 1.0))])
    metas = [{"calculated": False} for _ in range(3)]
    assert _compare(late, mu, window, shifts, metas) == ["no_pre_edge"] * 3


def _same_without_strays(
    energy: np.ndarray,
    mu: np.ndarray,
    padded: np.ndarray,
    pad_mu: np.ndarray,
    params: PrepParams,
    metas: list[dict[str, Any]],
) -> None:
    """The rows with stray points are prepared by both paths, and each as the same row
    without them (step, model input and extrapolation)."""
    assert _compare(padded, pad_mu, params, metas=metas) == ["ok"] * 3
    for row, plain in zip(pad_mu, mu, strict=True):
        got = prepare(Spectrum(padded, row, "Cu"), params)
        want = prepare(Spectrum(energy, plain, "Cu"), params)
        assert got.edge_step == want.edge_step
        np.testing.assert_array_equal(got.y, want.y)
        assert got.extrapolated == want.extrapolated


@pytest.mark.parametrize("params", RULES, ids=RULE_IDS)
def test_stray_leading_points_are_not_the_pre_edge(params: PrepParams) -> None:
    """A "0 0" row (and one at 1 eV) before a scan: no pre-edge, no start of the data. Both
    paths give the rows of the scan without them, measured and undeclared alike; a measured
    scan cut at its edge is still refused ``no_pre_edge`` (the stray is no pre-edge)."""
    energy = np.linspace(8800.0, 9400.0, 1000)
    mu = np.array([_edge(energy, CU_K + d, i) for i, d in enumerate((-2.0, 0.0, 3.0))])
    metas: list[dict[str, Any]] = [{}, {"calculated": False}, {}]
    for strays in ([0.0], [0.0, 1.0]):
        padded = np.concatenate((strays, energy))
        pad_mu = np.hstack([np.zeros((3, len(strays))), mu])
        _same_without_strays(energy, mu, padded, pad_mu, params, metas)
    cut = np.concatenate(([0.0], energy[energy > CU_K - 4]))
    cut_mu = np.hstack([np.zeros((3, 1)), mu[:, energy > CU_K - 4]])
    measured = [{"calculated": False} for _ in range(3)]
    assert _compare(cut, cut_mu, params, metas=measured) == ["no_pre_edge"] * 3


@pytest.mark.parametrize("params", RULES, ids=RULE_IDS)
def test_stray_trailing_points_are_not_the_post_edge(params: PrepParams) -> None:
    """A point 11 keV past a scan ending at E0+150 eV (two, and one with a "0 0" row before
    the scan too): no post-edge, no end of the data. It set the post-edge range (E0+25..+11 keV,
    a quadratic instead of a line: the step moved 0.2-0.8 % here, and doubled on the library's
    CuO cut at E0+60 eV); now both paths give the rows of the scan without it. A scan ending
    at E0+35 eV is still refused ``no_post_edge`` and one ending at E0+110 eV ``window`` (the
    stray covered the model window, interpolated towards); a point within the span is data."""
    energy = np.linspace(8800.0, CU_K + 150.0, 700)
    mu = np.array([_edge(energy, CU_K + d, i) for i, d in enumerate((-2.0, 0.0, 3.0))])
    metas: list[dict[str, Any]] = [{}, {"calculated": False}, {}]
    for lead, trail in (([], [20000.0]), ([], [20000.0, 20001.0]), ([0.0], [20000.0])):
        padded = np.concatenate((lead, energy, trail))
        pad_mu = np.hstack([np.zeros((3, len(lead))), mu, np.zeros((3, len(trail)))])
        _same_without_strays(energy, mu, padded, pad_mu, params, metas)
    short = energy <= CU_K + 35.0
    cut = np.concatenate((energy[short], [20000.0]))
    cut_mu = np.hstack([mu[:, short], np.zeros((3, 1))])
    assert _compare(cut, cut_mu, params, metas=metas) == ["no_post_edge"] * 3
    short = energy <= CU_K + 110.0
    cut = np.concatenate((energy[short], [20000.0]))
    cut_mu = np.hstack([mu[:, short], np.zeros((3, 1))])
    assert _compare(cut, cut_mu, params, metas=metas) == ["window"] * 3
    near = np.concatenate((energy, [2 * energy[-1] - energy[0] - 1.0]))  # within the span
    near_mu = np.hstack([mu[:1], mu[:1, -1:]])[0]
    kept = prepare(Spectrum(near, near_mu, "Cu"), params).edge_step
    assert kept != prepare(Spectrum(energy, mu[0], "Cu"), params).edge_step


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_absurd_values_are_left_out_by_both_paths(params: PrepParams) -> None:
    """Rows with glitches of 1e6 or a dropout to -20 at the ordinary spacing of their
    post-edge range, or with absurd pre-edge points, each row shifted: the batch leaves out
    the points the per-row fit leaves out (it remakes the sums of those rows), and every
    step is the clean row's to 0.1 % (a glitch of 1e6 set the step alone)."""
    energy = np.linspace(8800.0, 9400.0, 1000)
    clean = np.array([_edge(energy, CU_K + d, i) for i, d in enumerate((-2.0, 0.0, 3.0, 1.0))])
    mu = clean.copy()
    at = {e: int(np.searchsorted(energy, CU_K + e)) for e in (-150, -55, 200, 201, 250)}
    mu[0, at[200]] = 1e6
    mu[1, [at[200], at[201]]] = 1e6, -20.0  # two side by side
    mu[1, at[250]] = -20.0
    mu[2, [at[-150], at[-55]]] = -5.0, 1e6  # one in the default and one in the custom range
    mu[3, [at[-150], at[-55], at[250]]] = 1e6, -5.0, 1e6
    shifts = np.array([0.0, 1.3, -2.2, 0.7])
    assert _compare(energy, mu, params, shifts) == ["ok"] * 4
    for row, plain, s in zip(mu, clean, shifts, strict=True):
        got = prepare(Spectrum(energy + s, row, "Cu"), params).edge_step
        want = prepare(Spectrum(energy + s, plain, "Cu"), params).edge_step
        assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_calculated_rows(params: PrepParams) -> None:
    """FEFF-like rows (no background, starting 15 eV below the edge from near zero) are
    calculations unless declared otherwise; the same rows on a background are measured."""
    k = np.linspace(0.0, 9.5, 200)
    energy = CU_K - 15.0 + np.concatenate((np.linspace(0, 14.5, 40), 15.0 + k**2 / 0.2625))
    rng = np.random.default_rng(3)
    e0s = CU_K + rng.uniform(-3, 3, 8)
    mu = np.array([_edge(energy, e0, i, background=False) for i, e0 in enumerate(e0s)])
    mu[6:] += 0.5  # on a background: measured
    metas: list[dict[str, Any]] = [{}, {"calculated": True}, {"calculated": False}] + [{}] * 5
    assert params.calc_floor * mu[0].max() > mu[0, 0] > 0  # what makes it a calculation
    outcomes = _compare(energy, mu, params, np.linspace(-1.0, 1.0, 8), metas)
    assert outcomes == ["ok"] * 8


def test_rows_edge_fit_cannot_slice_go_to_the_per_row_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user-set post-edge range below the data (Python's negative slice in ``edge_fit``)
    is left to ``normalize``, which rejects it with its own message."""
    from xasflow.spectra.normalization import normalize

    calls = []

    def counting(*args: Any) -> Any:
        calls.append(args)
        return normalize(*args)

    monkeypatch.setattr(batch_module, "normalize", counting)
    # one point below the edge, the next at E0+1..3 eV, then nothing until E0+20 eV
    energy = np.concatenate(([CU_K - 3.0, CU_K + 1.0], np.arange(CU_K + 20.0, CU_K + 150.0, 0.5)))
    mu = np.array([_edge(energy, CU_K, i, background=False) for i in range(3)])
    # norm1..norm2 holds the first point alone: edge_fit slices rel[-2:1], nothing
    params = DEFAULT.model_copy(update={"norm1": -400.0, "norm2": 5.0, "window_start": 20.0})
    with np.errstate(all="ignore"):
        assert _compare(energy, mu, params) == ["edge_step"] * 3
    assert len(calls) == 3


def test_fewer_rows_than_the_threshold_keep_the_per_row_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below ``LARCH_MIN_ROWS`` live rows the single-spectrum ``normalize`` is cheaper and
    runs; from it on, the batched code (same results either way)."""
    from xasflow.spectra.normalization import normalize

    calls: list[int] = []

    def counting(*args: Any) -> Any:
        calls.append(1)
        return normalize(*args)

    monkeypatch.setattr(batch_module, "normalize", counting)
    monkeypatch.setattr(batch_module, "LARCH_MIN_ROWS", 3)
    energy = np.linspace(8800.0, 9400.0, 1000)
    mu = np.array([_edge(energy, CU_K + d, i) for i, d in enumerate((-2.0, 0.0, 3.0))])
    assert _compare(energy, mu[:2], DEFAULT) == ["ok"] * 2 and len(calls) == 2
    assert _compare(energy, mu, DEFAULT) == ["ok"] * 3 and len(calls) == 2


def test_shared_cu_feff_spectra_on_one_axis(cu_archive: Path) -> None:
    """Up to forty shared Cu FEFF spectra resampled onto one axis: declared calculations and the
    same spectra left for the rule to recognise, with the shipped bundle's parameters."""
    from xasflow.adapters.feff import read_feff_tree

    sites = list(read_feff_tree(cu_archive, element="Cu", limit=12).sites())[:40]
    assert len(sites) >= 24
    lo = max(float(s.energy[0]) for s in sites)
    hi = min(float(s.energy[-1]) for s in sites)
    energy = np.linspace(lo, hi, 400)
    mu = np.array([np.interp(energy, s.energy, s.mu) for s in sites])
    metas = [s.to_spectrum().meta if i % 2 else {} for i, s in enumerate(sites)]
    shifts = np.linspace(-1.0, 1.0, len(sites))
    for params in (SHIPPED, EXACT):
        outcomes = _compare(energy, mu, params, shifts, metas)
        assert outcomes == ["ok"] * len(sites)


def test_rows_off_the_shared_axis_are_left_to_the_per_row_function() -> None:
    """``normalize_larch_batch`` fits on one shared coordinate: a row whose axis is not a
    shift of the first row's is handed back (``prepare_batch`` never makes one)."""
    from xasflow.spectra.norm_batch import normalize_larch_batch
    from xasflow.spectra.normalization import normalize

    energy = np.linspace(8800.0, 9400.0, 1000)
    axes = np.stack((energy, energy + 2.0, CU_K + 1.001 * (energy - CU_K)))
    mu = np.array([_edge(axes[i], CU_K, i) for i in range(3)])
    e0 = np.full(3, CU_K)
    y, steps, errors, deferred = normalize_larch_batch(
        axes, axes - e0[:, None], mu, e0, DEFAULT, [None] * 3, 1.55, edge_energy("Cu")
    )
    assert deferred.tolist() == [2] and errors == [None] * 3
    for i in (0, 1):
        want_y, want_step = normalize(Spectrum(axes[i], mu[i], "Cu"), CU_K, DEFAULT)
        assert steps[i] == pytest.approx(want_step, rel=1e-9)
        np.testing.assert_allclose(y[i], want_y, rtol=1e-9, atol=1e-12)


def test_random_pages_match_normalize_row_by_row() -> None:
    """Seeded random pages (axes, E0s, shifts, backgrounds, declared calculations) under
    random parameters: every row as ``normalize`` gives it at the same E0, errors included."""
    from xasflow.spectra.norm_batch import normalize_larch_batch
    from xasflow.spectra.normalization import normalize

    rng = np.random.default_rng(20261126)
    outcomes: dict[str, int] = {}
    for _ in range(60):
        start, stop = (
            CU_K + rng.choice([-250.0, -40.0, -12.0]),
            CU_K + rng.choice([50.0, 150.0, 600.0]),
        )
        energy = np.linspace(start, stop, int(rng.choice([80, 400, 1000])))
        n = int(rng.integers(1, 7))
        shifts, e0 = rng.uniform(-4, 4, n), CU_K + rng.uniform(-6, 6, n)
        mu = np.array(
            [
                _edge(energy + s, e, i, rng.random() < 0.7)
                for i, (s, e) in enumerate(zip(shifts, e0, strict=True))
            ]
        )
        update: dict[str, Any] = {
            "weighting": rng.choice(["points", "energy"]),
            "edge_tail": bool(rng.random() < 0.7),
            "min_post_edge": float(rng.choice([20.0, 45.0])),
        }
        if rng.random() < 0.3:
            update.update(
                norm1=float(rng.choice([10.0, 30.0])), norm2=float(rng.choice([60.0, -10.0]))
            )
        if rng.random() < 0.3:
            update.update(nnorm=int(rng.integers(0, 4)))
        if rng.random() < 0.3:
            update.update(pre1=float(rng.choice([-200.0, -10.0])), pre2=-5.0)
        params = DEFAULT.model_copy(update=update)
        declared = [None if rng.random() < 0.7 else bool(rng.random() < 0.5) for _ in range(n)]
        axes = energy[None, :] + shifts[:, None]
        tail = 1.55 if params.edge_tail else None
        y, steps, errors, deferred = normalize_larch_batch(
            axes, axes - e0[:, None], mu, e0, params, declared, tail, edge_energy("Cu")
        )
        for i in sorted(set(range(n)) - set(deferred.tolist())):
            meta = {} if declared[i] is None else {"calculated": declared[i]}
            try:
                want_y, want_step = normalize(
                    Spectrum(axes[i], mu[i], "Cu", meta=meta), e0[i], params
                )
            except SpectrumError as exc:
                got = errors[i]
                assert got is not None and (got.reason, got.message) == (exc.reason, exc.message)
                outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
                continue
            assert errors[i] is None, errors[i]
            assert steps[i] == pytest.approx(want_step, rel=1e-9)
            np.testing.assert_allclose(y[i], want_y, rtol=1e-9, atol=1e-12)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes.get("ok", 0) > 50 and {"edge_step", "no_post_edge"} <= set(outcomes), outcomes


def test_count_le_counts_at_or_below_and_count_lt_strictly_below() -> None:
    """The shifted-rows counts say by name what they count: a value on a point is counted
    by ``count_le`` and not by ``count_lt`` (once ``count_le(..., side="left")``, whose
    name hid that it counts strictly below), on every row of a shifted axis."""
    from xasflow.spectra.shifted_rows import below, count_le, count_lt

    base = np.linspace(8900.0, 9100.0, 201)
    rows = np.stack([base + shift for shift in (0.0, 0.1, -3.3)])
    on, between, first = rows[:, 50], rows[:, 50] + 0.5, rows[:, 0]
    values = np.stack((on, between, below(first), first, rows[:, -1]), axis=1)
    assert count_le(rows, values).tolist() == [[51, 51, 0, 1, 201]] * 3
    assert count_lt(rows, values).tolist() == [[50, 51, 0, 0, 200]] * 3
