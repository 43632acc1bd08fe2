"""Held-out scoring of one task as the papers define it, and drop-region importance.

Shared by training (choosing, reporting), evaluation and the served-model selection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from xasflow.training import labels as L
from xasflow.training import metrics as M

MOTIF_NAMES = [L.environment_label(i) for i in range(len(L.MOTIFS))]


def evaluate_task(
    name: str,
    kind: str,
    pred: np.ndarray,
    y_test: np.ndarray,
    y_train: np.ndarray,
    set_threshold: float | None = None,
) -> dict[str, Any]:
    """Held-out metrics of one task, with the baseline each must beat.

    ``set_threshold``: where the predicted motif scores are cut into a ranking (a bundle's
    ``tasks.motifs.threshold``, what the daemon serves; None, which the daemon serves uncut,
    is cut at the label threshold here, and every exported bundle sets it); the labels' own
    sets are always cut at ``labels.MOTIF_THRESHOLD``, their definition. A predicted ranking
    keeps its top motif even below the cut (the daemon's too, when it has a CN-led head).
    """
    if name == "motifs":
        true_top = [MOTIF_NAMES[i] for i in np.argmax(y_test, axis=1)]
        pred_top = [MOTIF_NAMES[i] for i in np.argmax(pred, axis=1)]
        train_top = [MOTIF_NAMES[i] for i in np.argmax(y_train, axis=1)]
        true_sets = M.ranking_from_scores(y_test, MOTIF_NAMES, L.MOTIF_THRESHOLD)
        cut = L.MOTIF_THRESHOLD if set_threshold is None else set_threshold
        pred_sets = M.ranking_from_scores(pred, MOTIF_NAMES, cut)
        modal_set = max(
            set(M.ranking_from_scores(y_train, MOTIF_NAMES, L.MOTIF_THRESHOLD)),
            key=M.ranking_from_scores(y_train, MOTIF_NAMES, L.MOTIF_THRESHOLD).count,
        )
        return {
            "top1_accuracy": M.accuracy(true_top, pred_top),
            "baseline_top1_accuracy": M.modal_accuracy(train_top, true_top),
            "jaccard": M.jaccard(true_sets, pred_sets),
            "baseline_jaccard": M.jaccard(true_sets, [modal_set] * len(true_sets)),
            "n_test": len(y_test),
        }
    if kind == "classifier":
        out: dict[str, Any] = {
            "accuracy": M.accuracy(y_test, pred),
            "baseline_accuracy": M.modal_accuracy(y_train, y_test),
            "f1_macro": M.f1_macro(y_test, pred),
            "f1_per_class": M.f1_per_class(y_test, pred),
            "n_test": len(y_test),
        }
        names, cm = M.confusion(y_test, pred)
        out["confusion"] = {"classes": names, "matrix": cm.tolist()}
        return out
    return {
        "mae": M.mae(y_test, pred),
        "r2": M.r2(y_test, pred),
        "baseline_mae": M.mean_baseline_mae(y_train, y_test),
        "n_test": len(y_test),
    }


def primary_metric(name: str, kind: str, pred: np.ndarray, truth: np.ndarray) -> float:
    """:func:`primary_score` of :func:`evaluate_task` without its baselines and tables: the
    served choice resamples it 200 times per candidate task."""
    if name == "motifs":
        true_sets = M.ranking_from_scores(truth, MOTIF_NAMES, L.MOTIF_THRESHOLD)
        return M.jaccard(true_sets, M.ranking_from_scores(pred, MOTIF_NAMES, L.MOTIF_THRESHOLD))
    if kind == "regressor":
        return -M.mae(truth, pred)
    return M.accuracy(truth, pred)


def primary_score(name: str, kind: str, metrics: dict[str, Any]) -> float:
    """The one number a region's removal is judged by (higher is better)."""
    if kind == "regressor":
        return -metrics["mae"]
    if name == "motifs":
        return metrics["jaccard"]
    return metrics["accuracy"]


def region_importance(
    name: str,
    kind: str,
    predict_grid: Callable[[np.ndarray], np.ndarray],
    y_grid: np.ndarray,
    target: np.ndarray,
    y_train_target: np.ndarray,
    mean_curve: np.ndarray,
    cfg: Any,
) -> dict[str, float]:
    """Drop-region importance: score lost when a region (or a pair) is replaced by the mean curve.

    ``predict_grid`` maps gridded spectra to point predictions (the served model's). Replacing
    the region with the training-set mean spectrum removes the information it carries without
    retraining (TRIXS retrained per region; occlusion measures the deployed model).
    """
    grid = cfg.prep.grid
    base = primary_score(
        name, kind, evaluate_task(name, kind, predict_grid(y_grid), target, y_train_target)
    )
    names = list(cfg.regions)
    combos = [(n,) for n in names] + [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    out: dict[str, float] = {}
    for combo in combos:
        mask = np.zeros(grid.size, bool)
        for n in combo:
            lo, hi = cfg.regions[n]
            mask |= (grid >= lo) & (grid < hi)
        if not mask.any():
            continue
        occluded = y_grid.copy()
        occluded[:, mask] = mean_curve[mask]
        pred = predict_grid(occluded)
        score = primary_score(name, kind, evaluate_task(name, kind, pred, target, y_train_target))
        out[" + ".join(combo)] = float(base - score)
    return out
