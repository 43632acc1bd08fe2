"""Fit the uncertainty of trained models on the validation split (the calibration rows).

- Classifiers: one temperature on the log-probabilities (Guo et al. 2017), then a split-conformal
  threshold on the calibrated probabilities for prediction sets of coverage ``1 - alpha``
  (LAC: Sadinle et al. 2019; APS: Romano et al. 2020).
- Regressors: a split-conformal threshold on absolute residuals, optionally divided by a
  per-prediction spread (normalised conformal, Papadopoulos et al. 2011).

The runtime side is :mod:`xasflow.models.uncertainty`; every number fitted here goes into the
bundle manifest through the ``spec()`` dictionaries. Calibration rows must come from models that
did not see them: the validation split of a model fitted on train only, or out-of-fold
predictions from :func:`cross_fit` when the served model is refitted on train+val.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.model_selection import GroupKFold

from xasflow.models import uncertainty as U

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)
#: LAC, not APS: on the Cu test split (ExtraTrees, 90 %) LAC covered 0.880 (cn) and 0.910
#: (valence) with 1.29 and 1.34 labels per set; deterministic APS over-covered (0.971, 0.942)
#: with sets twice as large (2.72, 1.78). See bench/ood.py.
DEFAULT_SET_METHOD = "lac"


def label_indices(y: Sequence[Any] | np.ndarray, classes: Sequence[Any]) -> np.ndarray:
    """Column index of each label in ``classes``; a label the model never saw is an error."""
    lookup = {c: i for i, c in enumerate(classes)}
    missing = sorted({str(v) for v in y if v not in lookup})
    if missing:
        raise ValueError(f"labels {missing} are not among the model's classes {list(classes)}")
    return np.array([lookup[v] for v in y], dtype=np.int64)


def align_columns(probs: np.ndarray, have: Sequence[Any], want: Sequence[Any]) -> np.ndarray:
    """Probability columns of classes ``have`` re-ordered to ``want`` (absent classes get 0)."""
    p = np.asarray(probs, dtype=np.float64)
    out = np.zeros((len(p), len(want)))
    index = {c: i for i, c in enumerate(want)}
    for j, c in enumerate(have):
        if c not in index:
            raise ValueError(f"class {c!r} is not among {list(want)}")
        out[:, index[c]] = p[:, j]
    return out


def cross_fit(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    groups: np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold predictions for every row: ``fit_predict(train_rows, held_rows)`` per fold.

    Folds never split a group (material), so every prediction comes from a model that saw
    nothing of its material: calibration rows for all of train+val instead of validation
    alone, from models close to the one finally refitted on all of it.
    """
    groups = np.asarray(groups)
    rows = np.arange(len(groups))
    folds = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    out: np.ndarray | None = None
    for train_rows, held_rows in folds.split(rows, groups=groups):
        pred = np.asarray(fit_predict(train_rows, held_rows))
        if out is None:
            out = np.zeros((len(rows), *pred.shape[1:]), dtype=np.float64)
        out[held_rows] = pred
    assert out is not None
    return out


def _check(probs: np.ndarray, y_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_idx)
    if p.ndim != 2 or y.shape != (len(p),):
        raise ValueError(f"need probs (n, K) and labels (n,), got {p.shape} and {y.shape}")
    if len(p) == 0:
        raise ValueError("no calibration rows")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError("label index out of range of the probability columns")
    return p, y.astype(np.int64)


def nll(probs: np.ndarray, y_idx: np.ndarray, eps: float = U.PROB_EPS) -> float:
    """Mean negative log-likelihood of the true classes."""
    p, y = _check(probs, y_idx)
    return float(-np.mean(np.log(p[np.arange(len(p)), y] + eps)))


def ece(probs: np.ndarray, y_idx: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of the top probability of
    (bin fraction) * |accuracy - mean confidence| (Naeini et al. 2015, Guo et al. 2017)."""
    p, y = _check(probs, y_idx)
    conf = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    # bins (lo, hi]; confidence 0 (impossible for a distribution) joins the first bin
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    acc = np.bincount(b, weights=correct, minlength=n_bins)
    cs = np.bincount(b, weights=conf, minlength=n_bins)
    return float(np.sum(np.abs(acc - cs)) / len(p))


def fit_temperature(
    probs: np.ndarray, y_idx: np.ndarray, eps: float = U.PROB_EPS, objective: str = "nll"
) -> float:
    """The temperature of ``softmax(log(p + eps) / T)`` that best calibrates the given rows.

    ``nll`` (default, Guo et al. 2017) minimises the negative log-likelihood; ``ece`` searches
    a log-spaced grid for the lowest expected calibration error, which targets the acceptance
    metric directly but needs thousands of rows (e.g. from :func:`cross_fit`) not to overfit.
    """
    p, y = _check(probs, y_idx)
    rows = np.arange(len(p))
    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    if objective == "ece":
        grid = np.exp(np.linspace(lo, hi, 400))
        errors = [ece(U.apply_temperature(p, t, eps), y) for t in grid]
        return float(grid[int(np.argmin(errors))])
    if objective != "nll":
        raise ValueError(f"unknown objective {objective!r}; use 'nll' or 'ece'")

    def loss(log_t: float) -> float:
        q = U.apply_temperature(p, math.exp(log_t), eps)
        return float(-np.mean(np.log(q[rows, y] + 1e-300)))

    return float(math.exp(minimize_scalar(loss, bounds=(lo, hi), method="bounded").x))


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """Split-conformal threshold: the ceil((n+1)(1-alpha))-th smallest calibration score.

    Infinite when there are too few rows for the requested coverage (every label then qualifies).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("conformal scores must be finite and non-empty")
    rank = math.ceil((s.size + 1) * (1 - alpha))
    if rank > s.size:
        return math.inf
    return float(np.sort(s)[rank - 1])


def set_coverage(mask: np.ndarray, y_idx: np.ndarray) -> float:
    """Fraction of rows whose set holds the true class."""
    return float(np.mean(mask[np.arange(len(mask)), np.asarray(y_idx)]))


def mean_set_size(mask: np.ndarray) -> float:
    """Mean number of labels per set."""
    return float(mask.sum(axis=1).mean())


def interval_coverage(lo: np.ndarray, hi: np.ndarray, y: np.ndarray) -> float:
    """Fraction of targets inside their interval."""
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean((y >= lo) & (y <= hi)))


@dataclass(frozen=True)
class ClassifierCalibration:
    """A classifier's fitted temperature and conformal set threshold."""

    temperature: float
    method: str
    alpha: float
    qhat: float
    eps: float = U.PROB_EPS

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw model probabilities."""
        return U.apply_temperature(probs, self.temperature, self.eps)

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """Boolean (n, K) conformal sets from *raw* model probabilities."""
        return U.prediction_sets(self.probabilities(probs), self.qhat, self.method)

    def spec(self) -> dict[str, Any]:
        """JSON-able entry for the bundle manifest."""
        return {
            "temperature": self.temperature,
            "eps": self.eps,
            "set_method": self.method,
            "alpha": self.alpha,
            "coverage": 1 - self.alpha,
            "qhat": self.qhat if math.isfinite(self.qhat) else None,
        }


def calibrate_classifier(
    probs: np.ndarray,
    y_idx: np.ndarray,
    alpha: float = 0.1,
    method: str = DEFAULT_SET_METHOD,
    objective: str = "nll",
) -> ClassifierCalibration:
    """Temperature, then the conformal threshold on the calibrated probabilities (same rows)."""
    p, y = _check(probs, y_idx)
    if method not in U.SET_METHODS:
        raise ValueError(f"unknown set method {method!r}; use one of {U.SET_METHODS}")
    t = fit_temperature(p, y, objective=objective)
    cal = U.apply_temperature(p, t)
    scores = U.class_scores(cal, method)[np.arange(len(cal)), y]
    return ClassifierCalibration(t, method, alpha, conformal_quantile(scores, alpha))


@dataclass(frozen=True)
class RegressorCalibration:
    """A regressor's conformal interval: absolute (``normalised`` False) or spread-normalised."""

    alpha: float
    qhat: float
    normalised: bool
    offset: float = 0.0

    def interval(
        self, pred: np.ndarray, scale: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per prediction; ``scale`` is required when the calibration is normalised."""
        if self.normalised and scale is None:
            raise ValueError("this interval is normalised by a spread; pass scale")
        return U.intervals(pred, self.qhat, scale if self.normalised else None, self.offset)

    def spec(self) -> dict[str, Any]:
        """JSON-able entry for the bundle manifest."""
        return {
            "alpha": self.alpha,
            "coverage": 1 - self.alpha,
            "qhat": self.qhat if math.isfinite(self.qhat) else None,
            "normalised": self.normalised,
            "offset": self.offset,
        }


def calibrate_regressor(
    pred: np.ndarray,
    y: np.ndarray,
    alpha: float = 0.1,
    scale: np.ndarray | None = None,
    offset: float | None = None,
) -> RegressorCalibration:
    """Conformal threshold of ``|y - pred| / (scale + offset)`` (or of ``|y - pred|``).

    ``offset`` defaults to a tenth of the median spread, so rows where the members agree
    exactly still get an interval.
    """
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(y, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and y {t.shape} differ")
    resid = np.abs(t - p)
    if scale is None:
        return RegressorCalibration(alpha, conformal_quantile(resid, alpha), False)
    s = np.asarray(scale, dtype=np.float64).ravel()
    if s.shape != p.shape or np.any(s < 0):
        raise ValueError("scale must be non-negative with one value per prediction")
    off = 0.1 * float(np.median(s)) if offset is None else float(offset)
    if off <= 0 and np.any(s == 0):
        off = 1e-12
    return RegressorCalibration(alpha, conformal_quantile(resid / (s + off), alpha), True, off)
