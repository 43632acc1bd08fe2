"""Held-out scoring of one task as the papers define it, and drop-region importance.

Shared by training (choosing, reporting), evaluation and the served-model selection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from xasflow.training import labels as L
from xasflow.training import metrics as M

MOTIF_NAMES = [L.environment_label(i) for i in range(len(L.MOTIFS))]


def trivial_answers(name: str, kind: str, y_train: np.ndarray) -> dict[str, Any]:
    """What a model that never looks at the spectrum answers, from the training targets: the
    most common class (``answer``), the mean (``mean``), or for the motif ranking the most
    common top motif and label set (``top``, ``set``). Plain JSON values: a manifest records
    them (``training.baselines``) so that data scored without the training rows (measured
    references) are measured against the same trivial model."""
    if name == "motifs":
        tops = [MOTIF_NAMES[i] for i in np.argmax(y_train, axis=1)]
        sets = M.ranking_from_scores(y_train, MOTIF_NAMES, L.MOTIF_THRESHOLD)
        modal = Counter(sets).most_common(1)[0][0]  # ties: the first seen, whatever the hash
        return {"top": Counter(tops).most_common(1)[0][0], "set": list(modal)}
    if kind == "classifier":
        mode = Counter(np.asarray(y_train).tolist()).most_common(1)[0][0]
        return {"answer": mode.item() if isinstance(mode, np.generic) else mode}
    return {"mean": float(np.mean(np.asarray(y_train, float)))}


def evaluate_task(
    name: str,
    kind: str,
    pred: np.ndarray,
    y_test: np.ndarray,
    y_train: np.ndarray | None,
    set_threshold: float | None = None,
    trivial: dict[str, Any] | None = None,
    no_top: np.ndarray | None = None,
) -> dict[str, Any]:
    """Held-out metrics of one task, with the baseline each must beat.

    The baselines score :func:`trivial_answers` of ``y_train``, or ``trivial`` when given
    (then ``y_train`` may be None). ``set_threshold``: where the predicted motif scores are cut
    into a ranking (a bundle's ``tasks.motifs.threshold``, what the daemon serves; None, which
    the daemon serves uncut, is cut at the label threshold here, and every exported bundle sets
    it); the labels' own sets are always cut at ``labels.MOTIF_THRESHOLD``, their definition.
    A predicted ranking keeps its top motif even below the cut (the daemon's too, when it has a
    CN-led head). ``no_top``: motif rows the bundle serves no top motif for (no motif of the
    CN answered), misses for top-1 whatever the scores.
    """
    if trivial is None:
        if y_train is None:
            raise ValueError("give the training targets or their trivial answers")
        trivial = trivial_answers(name, kind, y_train)
    n = len(y_test)
    if name == "motifs":
        true_top = [MOTIF_NAMES[i] for i in np.argmax(y_test, axis=1)]
        pred_top: list[str | None] = [MOTIF_NAMES[i] for i in np.argmax(pred, axis=1)]
        if no_top is not None:
            pred_top = [None if blank else top for top, blank in zip(pred_top, no_top, strict=True)]
        true_sets = M.ranking_from_scores(y_test, MOTIF_NAMES, L.MOTIF_THRESHOLD)
        cut = L.MOTIF_THRESHOLD if set_threshold is None else set_threshold
        pred_sets = M.ranking_from_scores(pred, MOTIF_NAMES, cut)
        return {
            "top1_accuracy": M.accuracy(true_top, pred_top),
            "baseline_top1_accuracy": M.accuracy(true_top, [trivial["top"]] * n),
            "jaccard": M.jaccard(true_sets, pred_sets),
            "baseline_jaccard": M.jaccard(true_sets, [tuple(trivial["set"])] * n),
            "n_test": n,
        }
    if kind == "classifier":
        out: dict[str, Any] = {
            "accuracy": M.accuracy(y_test, pred),
            "baseline_accuracy": M.accuracy(y_test, [trivial["answer"]] * n),
            "f1_macro": M.f1_macro(y_test, pred),
            "f1_per_class": M.f1_per_class(y_test, pred),
            "n_test": n,
        }
        names, cm = M.confusion(y_test, pred)
        out["confusion"] = {"classes": names, "matrix": cm.tolist()}
        return out
    return {
        "mae": M.mae(y_test, pred),
        "r2": M.r2(y_test, pred),
        "baseline_mae": M.mae(y_test, np.full(n, float(trivial["mean"]))),
        "n_test": n,
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
    base = primary_score(
        name, kind, evaluate_task(name, kind, predict_grid(y_grid), target, y_train_target)
    )
    out: dict[str, float] = {}
    for key, occluded in occlusions(y_grid, mean_curve, cfg.prep.grid, cfg.regions):
        pred = predict_grid(occluded)
        score = primary_score(name, kind, evaluate_task(name, kind, pred, target, y_train_target))
        out[key] = float(base - score)
    return out


def occlusions(
    y_grid: np.ndarray,
    mean_curve: np.ndarray,
    grid: np.ndarray,
    regions: Mapping[str, tuple[float, float]],
) -> Iterator[tuple[str, np.ndarray]]:
    """Each region, then each pair of regions, as its key (``"a + b"``) and ``y_grid`` with
    those grid points replaced by ``mean_curve``'s (regions covering no grid point skipped)."""
    names = list(regions)
    combos = [(n,) for n in names] + [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    for combo in combos:
        mask = np.zeros(grid.size, bool)
        for n in combo:
            lo, hi = regions[n]
            mask |= (grid >= lo) & (grid < hi)
        if not mask.any():
            continue
        occluded = y_grid.copy()
        occluded[:, mask] = mean_curve[mask]
        yield " + ".join(combo), occluded
