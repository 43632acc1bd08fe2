"""Choose the served estimator per task on the validation split, then calibrate its doubt.

Candidates are the forest, each deep ensemble of networks and the average of all of them.
The one with the best validation score is served; its classifier probabilities get a
temperature (fitted on validation), and its validation residuals give split-conformal
prediction sets (classifiers) or intervals (regressors) at the configured coverage. The
validation rows are never used to fit the estimators, so the calibration is honest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from xasflow.models.bundle import ConformalSpec
from xasflow.models.uncertainty import apply_temperature, conformal_sets

#: The estimators a task may average; "ensemble" is the average of every available one.
FOREST = "extra_trees"


@dataclass
class BaseOutputs:
    """One base estimator's outputs for some rows: mean (probabilities or values) and spread."""

    mean: np.ndarray
    std: np.ndarray | None = None


@dataclass
class Choice:
    """What is served for one task and how its doubt is calibrated."""

    task: str
    kind: str
    estimator: str  # extra_trees | mlp | cnn | ensemble
    members: tuple[str, ...]
    selection: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None
    conformal: ConformalSpec | None = None


def average(outputs: list[BaseOutputs]) -> BaseOutputs:
    """The members' mean; the spread of those that have one."""
    stds = [o.std for o in outputs if o.std is not None]
    return BaseOutputs(
        np.mean([o.mean for o in outputs], axis=0), np.mean(stds, axis=0) if stds else None
    )


def candidates(bases: dict[str, BaseOutputs]) -> dict[str, tuple[tuple[str, ...], BaseOutputs]]:
    """Every base alone, plus the average of all of them when there are several."""
    out = {name: ((name,), out) for name, out in bases.items()}
    if len(bases) > 1:
        out["ensemble"] = (tuple(bases), average(list(bases.values())))
    return out


def fit_temperature(probs: np.ndarray, y_index: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of ``softmax(log p / T)``."""
    known = y_index >= 0
    p, y = probs[known], y_index[known]
    if len(p) < 10:
        return 1.0

    def nll(log_t: float) -> float:
        cal = apply_temperature(p, math.exp(log_t))
        return float(-np.mean(np.log(np.clip(cal[np.arange(len(y)), y], 1e-12, None))))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the ceil((n+1)(1-alpha))-th smallest score."""
    n = len(scores)
    if n == 0:
        return float("inf")
    level = min(1.0, math.ceil((n + 1) * (1 - alpha)) / n)
    return float(np.quantile(scores, level, method="higher"))


def set_scores(probs: np.ndarray, y_index: np.ndarray, method: str) -> np.ndarray:
    """Non-conformity of the true class: LAC ``1 - p_true``; APS the probability mass at or
    above the true class's. Rows whose class the model never saw score 1 (never covered)."""
    known = y_index >= 0
    safe = np.where(known, y_index, 0)
    p_true = probs[np.arange(len(probs)), safe]
    if method == "lac":
        scores = 1.0 - p_true
    elif method == "aps":
        scores = np.sum(np.where(probs >= p_true[:, None], probs, 0.0), axis=1)
    else:
        raise ValueError(f"unknown conformal set method {method!r}")
    return np.where(known, scores, 1.0)


def calibrate_classifier(
    probs: np.ndarray, y_index: np.ndarray, alpha: float, method: str
) -> tuple[float, ConformalSpec]:
    """Temperature, then the conformal set threshold on the calibrated probabilities."""
    temperature = fit_temperature(probs, y_index)
    cal = apply_temperature(probs, temperature)
    qhat = conformal_quantile(set_scores(cal, y_index, method), alpha)
    spec = ConformalSpec(alpha=alpha, method=method, qhat=qhat, n_calibration=len(y_index))
    # sanity: the fitted sets cover the calibration rows at least at the target level
    sets = conformal_sets(cal, qhat, method)
    known = y_index >= 0
    assert sets[np.flatnonzero(known), y_index[known]].mean() >= (1 - alpha) - 1e-9 or not len(
        y_index
    )
    return temperature, spec


def calibrate_regressor(
    pred: np.ndarray, truth: np.ndarray, alpha: float, std: np.ndarray | None
) -> ConformalSpec:
    """Absolute residuals, or residuals over the ensemble spread when the model has one."""
    resid = np.abs(np.asarray(truth, float) - pred)
    if std is not None:
        qhat = conformal_quantile(resid / np.maximum(std, 1e-9), alpha)
        return ConformalSpec(alpha=alpha, method="scaled", qhat=qhat, n_calibration=len(resid))
    qhat = conformal_quantile(resid, alpha)
    return ConformalSpec(alpha=alpha, method="absolute", qhat=qhat, n_calibration=len(resid))


def class_index(labels: np.ndarray, classes: list[Any]) -> np.ndarray:
    """Index of each label in ``classes`` (-1 for a label the model never saw)."""
    lookup = {str(c): i for i, c in enumerate(classes)}
    return np.array([lookup.get(str(v), -1) for v in labels], dtype=np.int64)


# --- choosing per task -------------------------------------------------------------------


def forest_outputs(fit: Any, X: np.ndarray) -> BaseOutputs:
    """A fitted forest task's probabilities (classifiers) or values on feature rows ``X``."""
    est = fit.estimator
    if fit.kind == "classifier":
        return BaseOutputs(est.predict_proba(X))
    return BaseOutputs(
        np.asarray(est.predict(X), dtype=np.float64).reshape(len(X), -1).squeeze(1)
        if fit.kind == "regressor"
        else np.asarray(est.predict(X)).reshape(len(X), -1)
    )


def network_outputs(members: dict[str, np.ndarray], kind: str) -> BaseOutputs:
    """A deep ensemble's member mean and spread from its per-member outputs (members, n, ...)."""
    arr = np.asarray(members, dtype=np.float64)
    if kind == "regressor":
        arr = arr.reshape(arr.shape[0], arr.shape[1])
    return BaseOutputs(arr.mean(axis=0), arr.std(axis=0) if kind == "regressor" else None)


def point_of(kind: str, out: BaseOutputs, classes: list[Any] | None) -> np.ndarray:
    """Point predictions: the most probable class, or the values."""
    if kind == "classifier":
        return np.asarray(classes, dtype=object)[np.argmax(out.mean, axis=1)]
    return out.mean


def choose_task(
    task: str,
    kind: str,
    classes: list[Any] | None,
    val: dict[str, BaseOutputs],
    y_val: np.ndarray,
    score: Any,
    alpha: float,
    set_method: str,
) -> Choice:
    """The candidate with the best validation ``score(point_predictions)``; ties go to the
    cheaper (fewer members) one. Its doubt is then calibrated on the same validation rows."""
    cands = candidates(val)
    scores = {name: float(score(point_of(kind, out, classes))) for name, (_, out) in cands.items()}
    best = max(cands, key=lambda n: (scores[n], -len(cands[n][0])))
    members, out = cands[best]
    choice = Choice(task, kind, best, members, selection=scores)
    if kind == "classifier":
        y_index = class_index(y_val, classes or [])
        choice.temperature, choice.conformal = calibrate_classifier(
            out.mean, y_index, alpha, set_method
        )
    elif kind == "regressor":
        choice.conformal = calibrate_regressor(out.mean, y_val, alpha, out.std)
    return choice
