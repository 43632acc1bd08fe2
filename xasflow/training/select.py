"""Choose the served estimator per task on the validation split, then calibrate its doubt.

Candidates are the forest, each deep ensemble of networks, the average of the networks and
the average of all of them. Among those whose validation score is within a small tolerance of
the best, the cheapest to run is served (see ``COST``), the better-scoring one on a tie; its
classifier probabilities get a
temperature (fitted on validation), and its validation residuals give split-conformal
prediction sets (classifiers) or intervals (regressors) at the configured coverage. No
estimator is fitted on the validation rows (the networks only stop early on them), so the
calibration is measured on data the models did not learn from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xasflow.models.bundle import ConformalSpec
from xasflow.models.uncertainty import UNBOUNDED_QHAT
from xasflow.training import calibrate as C

#: The estimators a task may average; "ensemble" is the average of every available one.
FOREST = "extra_trees"
#: The average of the network ensembles alone (no tree graph); served as estimator "ensemble".
NETWORKS = "networks"
#: Relative cost of each base's graph, for the latency-aware choice. Measured on the Cu bundle
#: of stop 8 (onnxruntime, one thread, shared 2-core machine), per call of 1 / 64 spectra: one
#: task's 100-tree graph 0.03 / 1.2-1.9 ms, the 5-MLP graph (every task) 0.19 / 2.4 ms, the
#: 5-CNN graph 0.19 / 8.7 ms. The MLP graph also serves the regressors, so it counts least.
#: Measured again on the int8 graphs of the formula-split bundle (scratch gcost.py): MLP
#: 0.24 / 1.6 ms, CNN 0.57 / 16.6 ms, valence's forest 0.04 / 0.54 ms; the CNN, served for
#: one task, made the bundle's 64-spectrum call 6x slower (3.7 -> 22.8 ms), hence its weight.
COST = {FOREST: 1.5, "random_forest": 1.5, "mlp": 1.0, "cnn": 10.0}
#: Bootstrap draws for the standard error of the best validation score (the one-SE rule).
SE_DRAWS = 200


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
    candidate: str = ""  # key in ``selection`` (e.g. "networks", served as "ensemble")
    selection: dict[str, float] = field(default_factory=dict)
    margin: float = 0.0  # how far below the best score a served candidate may be
    temperature: float | None = None
    conformal: ConformalSpec | None = None


def average(outputs: list[BaseOutputs]) -> BaseOutputs:
    """The members' mean; the spread of those that have one."""
    stds = [o.std for o in outputs if o.std is not None]
    return BaseOutputs(
        np.mean([o.mean for o in outputs], axis=0), np.mean(stds, axis=0) if stds else None
    )


def candidates(bases: dict[str, BaseOutputs]) -> dict[str, tuple[tuple[str, ...], BaseOutputs]]:
    """Every base alone, the average of the networks (when there are several besides a forest)
    and the average of all of them when there are several."""
    out: dict[str, tuple[tuple[str, ...], BaseOutputs]] = {
        name: ((name,), b) for name, b in bases.items()
    }
    nets = {n: b for n, b in bases.items() if n != FOREST}
    if len(nets) > 1 and len(nets) < len(bases):
        out[NETWORKS] = (tuple(nets), average(list(nets.values())))
    if len(bases) > 1:
        out["ensemble"] = (tuple(bases), average(list(bases.values())))
    return out


def _finite(q: float) -> float:
    """A conformal quantile for the manifest (JSON has no infinity: ``UNBOUNDED_QHAT``)."""
    return float(min(q, UNBOUNDED_QHAT))


def calibrate_classifier(
    probs: np.ndarray, y_index: np.ndarray, alpha: float, method: str
) -> tuple[float, ConformalSpec]:
    """Temperature (NLL on the calibration rows), then the conformal set threshold on the
    calibrated probabilities; rows whose class the model never saw are left out."""
    known = y_index >= 0
    cal = C.calibrate_classifier(probs[known], y_index[known], alpha, method)
    spec = ConformalSpec(
        alpha=alpha, method=method, qhat=_finite(cal.qhat), n_calibration=int(known.sum())
    )
    return cal.temperature, spec


def calibrate_regressor(
    pred: np.ndarray, truth: np.ndarray, alpha: float, std: np.ndarray | None
) -> ConformalSpec:
    """Absolute residuals, or residuals over the ensemble spread when the model has one."""
    cal = C.calibrate_regressor(pred, np.asarray(truth, float), alpha, std)
    return ConformalSpec(
        alpha=alpha,
        method="scaled" if cal.normalised else "absolute",
        qhat=_finite(cal.qhat),
        offset=cal.offset,
        n_calibration=len(pred),
    )


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


def network_outputs(members: np.ndarray, kind: str) -> BaseOutputs:
    """A deep ensemble's member mean and spread from its per-member outputs (members, n, ...)."""
    arr = np.asarray(members, dtype=np.float64)
    if kind == "regressor":
        arr = arr.reshape(arr.shape[0], arr.shape[1])
    return BaseOutputs(arr.mean(axis=0), arr.std(axis=0) if kind == "regressor" else None)


def cost(members: tuple[str, ...], costs: Mapping[str, float] | None = None) -> float:
    """Relative cost per spectrum of serving an average of ``members`` (``costs`` overrides
    entries of ``COST``)."""
    table = {**COST, **(costs or {})}
    return sum(table.get(m, table[FOREST]) for m in members)


def estimator_name(members: tuple[str, ...]) -> str:
    """The manifest's ``estimator`` for an average of ``members``."""
    return members[0] if len(members) == 1 else "ensemble"


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
    tolerance: float = 0.0,
    costs: Mapping[str, float] | None = None,
    n_se: float = 0.0,
) -> Choice:
    """The cheapest candidate whose validation ``score(point_predictions, rows)`` (higher is
    better; ``rows`` a resample of the validation rows, None for all) is within the margin of
    the best: ``tolerance`` x |best| or ``n_se`` bootstrap standard errors of the best's score,
    whichever is wider (the one-standard-error rule of model selection); among equally cheap
    ones the better. Its doubt is then calibrated on the same validation rows."""
    cands = candidates(val)
    points = {name: point_of(kind, out, classes) for name, (_, out) in cands.items()}
    scores = {name: float(score(p, None)) for name, p in points.items()}
    leader = max(scores, key=lambda n: scores[n])
    top = scores[leader]
    se = bootstrap_se(score, points[leader], len(y_val)) if n_se > 0 else 0.0
    margin = max(tolerance * abs(top), n_se * se)
    near = [n for n in cands if scores[n] >= top - margin]
    best = min(near, key=lambda n: (cost(cands[n][0], costs), -scores[n]))
    members, out = cands[best]
    choice = Choice(task, kind, estimator_name(members), members, best, scores, margin)
    choice.temperature, choice.conformal = calibrate_outputs(
        kind, classes, out, y_val, alpha, set_method
    )
    return choice


def bootstrap_se(score: Any, points: np.ndarray, n: int, draws: int = SE_DRAWS) -> float:
    """Standard error of ``score(points[rows], rows)`` over bootstrap resamples of n rows
    (fixed seed: a bundle's choice does not change from run to run); 0 for under two rows."""
    if n < 2:
        return 0.0
    rng = np.random.default_rng(0)
    values = []
    for _ in range(draws):
        rows = rng.integers(0, n, n)
        values.append(float(score(points[rows], rows)))
    return float(np.std(values, ddof=1))


def calibrate_outputs(
    kind: str,
    classes: list[Any] | None,
    out: BaseOutputs,
    y_val: np.ndarray,
    alpha: float,
    set_method: str,
) -> tuple[float | None, ConformalSpec | None]:
    """A served estimator's temperature and conformal spec from its validation outputs
    (classifiers: both; regressors: the interval; rankings: neither)."""
    if kind == "classifier":
        return calibrate_classifier(out.mean, class_index(y_val, classes or []), alpha, set_method)
    if kind == "regressor":
        return None, calibrate_regressor(out.mean, y_val, alpha, out.std)
    return None, None
