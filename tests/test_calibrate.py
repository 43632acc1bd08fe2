"""Calibration and conformal prediction: synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xasflow.models import uncertainty as U
from xasflow.training import calibrate as C


def _calibrated(n: int, k: int, rng: np.random.Generator, sharpness: float = 2.0):
    """Probabilities drawn at random and labels drawn from them: calibrated by construction."""
    logits = sharpness * rng.normal(size=(n, k))
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return p, y


def test_apply_temperature_is_softmax_of_log_probabilities() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    assert np.allclose(U.apply_temperature(p, 1.0), (p + U.PROB_EPS) / (1 + 3 * U.PROB_EPS))
    hot = U.apply_temperature(p, 2.0)
    expected = np.sqrt(p[0] + U.PROB_EPS) / np.sqrt(p[0] + U.PROB_EPS).sum()
    assert np.allclose(hot[0], expected)
    assert np.allclose(hot.sum(axis=1), 1.0)
    assert hot[0, 0] < p[0, 0]  # T > 1 softens
    assert U.apply_temperature(p, 0.5)[0, 0] > p[0, 0]  # T < 1 sharpens
    with pytest.raises(ValueError, match="temperature"):
        U.apply_temperature(p, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        U.apply_temperature(np.array([[np.nan, 1.0]]), 1.0)


def test_ece_zero_for_perfect_and_known_for_overconfident() -> None:
    y = np.array([0, 1, 0, 1])
    perfect = np.eye(2)[y]
    assert C.ece(perfect, y) == pytest.approx(0.0, abs=1e-12)
    # always 0.9 sure, right half the time: ECE = |0.5 - 0.9| = 0.4
    p = np.tile([0.9, 0.1], (4, 1))
    assert C.ece(p, y) == pytest.approx(0.4)


def test_calibrated_probabilities_keep_temperature_near_one() -> None:
    rng = np.random.default_rng(0)
    p, y = _calibrated(4000, 4, rng)
    t = C.fit_temperature(p, y)
    assert 0.9 < t < 1.1
    assert C.ece(p, y) < 0.03


def test_overconfident_probabilities_get_temperature_above_one_and_lower_ece() -> None:
    rng = np.random.default_rng(1)
    p, y = _calibrated(4000, 4, rng)
    over = U.apply_temperature(p, 1 / 3)  # three times too sharp
    t = C.fit_temperature(over, y)
    assert 2.5 < t < 3.6
    fixed = U.apply_temperature(over, t)
    assert C.ece(over, y) > 0.1
    assert C.ece(fixed, y) < 0.03
    assert C.nll(fixed, y) < C.nll(over, y)


def test_conformal_quantile_is_the_finite_sample_rank() -> None:
    scores = np.arange(1, 20, dtype=float)  # n = 19: rank ceil(20 * 0.9) = 18
    assert C.conformal_quantile(scores, 0.1) == 18.0
    assert C.conformal_quantile(np.array([1.0, 2.0]), 0.1) == math.inf
    with pytest.raises(ValueError, match="alpha"):
        C.conformal_quantile(scores, 1.5)


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_prediction_sets_cover_exchangeable_data(method: str) -> None:
    rng = np.random.default_rng(2)
    p, y = _calibrated(4000, 5, rng, sharpness=1.0)
    cal = C.calibrate_classifier(p[:2000], y[:2000], alpha=0.1, method=method)
    mask = cal.sets(p[2000:])
    cov = C.set_coverage(mask, y[2000:])
    assert 0.85 <= cov <= 0.95
    assert mask.sum(axis=1).min() >= 1
    assert 1.0 < C.mean_set_size(mask) < 5.0
    spec = cal.spec()
    assert spec["set_method"] == method and spec["alpha"] == 0.1 and spec["qhat"] == cal.qhat


def test_sets_never_empty_and_hold_the_argmax() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    for method in U.SET_METHODS:
        mask = U.prediction_sets(p, -1.0, method)  # a threshold nothing passes
        assert mask.tolist() == [[True, False, False], [False, False, True]]
    lac = U.prediction_sets(p, 0.75, "lac")  # 1 - p <= 0.75  <=>  p >= 0.25
    assert lac.tolist() == [[True, True, False], [False, False, True]]
    aps = U.prediction_sets(p, 0.85, "aps")  # cumulative mass 0.5, 0.8 | 0.6, 0.8 (stable), 1.0
    assert aps.tolist() == [[True, True, False], [True, False, True]]
    assert U.set_labels(aps, ["a", "b", "c"], p) == [["a", "b"], ["c", "a"]]
    with pytest.raises(ValueError, match="unknown set method"):
        U.prediction_sets(p, 0.5, "raps")


def test_label_indices_reject_unknown_labels() -> None:
    assert C.label_indices([4, 2, 4], [2, 4, 6]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="not among"):
        C.label_indices([3], [2, 4])


def test_absolute_and_normalised_intervals_cover() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    sigma = rng.uniform(0.1, 2.0, n)  # heteroscedastic noise, known to the "ensemble"
    pred = rng.normal(size=n)
    y = pred + sigma * rng.normal(size=n)
    cal_rows, test = slice(0, 2000), slice(2000, None)
    absolute = C.calibrate_regressor(pred[cal_rows], y[cal_rows], 0.1)
    normed = C.calibrate_regressor(pred[cal_rows], y[cal_rows], 0.1, scale=sigma[cal_rows])
    lo_a, hi_a = absolute.interval(pred[test])
    lo_n, hi_n = normed.interval(pred[test], sigma[test])
    assert 0.85 <= C.interval_coverage(lo_a, hi_a, y[test]) <= 0.95
    assert 0.85 <= C.interval_coverage(lo_n, hi_n, y[test]) <= 0.95
    # knowing the spread gives narrower intervals on average at the same coverage
    assert np.mean(hi_n - lo_n) < np.mean(hi_a - lo_a)
    assert normed.spec()["normalised"] and normed.offset == pytest.approx(
        0.1 * np.median(sigma[:2000])
    )
    with pytest.raises(ValueError, match="pass scale"):
        normed.interval(pred[test])


def test_intervals_formula() -> None:
    lo, hi = U.intervals(np.array([1.0, 2.0]), 0.5)
    assert lo.tolist() == [0.5, 1.5] and hi.tolist() == [1.5, 2.5]
    lo, hi = U.intervals(np.array([1.0, 2.0]), 2.0, np.array([0.0, 1.0]), offset=0.25)
    assert lo.tolist() == [0.5, -0.5] and hi.tolist() == [1.5, 4.5]
    with pytest.raises(ValueError, match="shape"):
        U.intervals(np.array([1.0, 2.0]), 1.0, np.array([1.0]))


def test_cross_fit_predicts_every_row_from_models_blind_to_its_group() -> None:
    groups = np.repeat(np.arange(40), 3)  # 40 materials, 3 sites each
    seen_calls: list[int] = []

    def fit_predict(train_rows: np.ndarray, held_rows: np.ndarray) -> np.ndarray:
        seen_calls.append(len(held_rows))
        leaked = np.isin(groups[held_rows], groups[train_rows])
        return np.column_stack([held_rows, leaked])

    out = C.cross_fit(fit_predict, groups, n_splits=5)
    assert len(seen_calls) == 5 and sum(seen_calls) == len(groups)
    assert out[:, 0].tolist() == list(range(len(groups)))  # each row predicted exactly once
    assert not out[:, 1].any()


def test_align_columns_reorders_and_fills_absent_classes() -> None:
    p = np.array([[0.25, 0.75]])
    assert C.align_columns(p, [6, 4], [2, 4, 6]).tolist() == [[0.0, 0.75, 0.25]]
    with pytest.raises(ValueError, match="not among"):
        C.align_columns(p, [6, 5], [2, 4, 6])


def test_runtime_reads_the_manifest_specs() -> None:
    rng = np.random.default_rng(6)
    p, y = _calibrated(600, 3, rng)
    cal = C.calibrate_classifier(p[:300], y[:300], 0.1, "lac")
    probs, mask = U.classifier_from_spec(p[300:], cal.spec())
    assert np.allclose(probs, cal.probabilities(p[300:]))
    assert (mask == cal.sets(p[300:])).all()
    pred = rng.normal(size=300)
    reg = C.calibrate_regressor(pred, pred + rng.normal(size=300), 0.1, scale=np.ones(300))
    lo, hi = U.interval_from_spec(pred, reg.spec(), np.ones(300))
    assert np.allclose(hi - lo, 2 * reg.qhat * (1 + reg.offset))
    with pytest.raises(ValueError, match="pass scale"):
        U.interval_from_spec(pred, reg.spec())


def test_ece_objective_also_recovers_the_temperature() -> None:
    rng = np.random.default_rng(7)
    p, y = _calibrated(4000, 4, rng)
    over = U.apply_temperature(p, 0.5)
    t = C.fit_temperature(over, y, objective="ece")
    assert 1.6 < t < 2.5
    assert C.ece(U.apply_temperature(over, t), y) < 0.03
    with pytest.raises(ValueError, match="objective"):
        C.fit_temperature(over, y, objective="brier")
