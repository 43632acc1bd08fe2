"""Metrics as the papers define them, each with the baseline it must beat.

Zheng et al. 2020: strict top-1 accuracy of the combined CN-motif label and the Jaccard index
between predicted and true ranked label sets. Torrisi et al. 2020 (TRIXS): per-class F1 for
coordination, MAE and R^2 for distances and charges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np

#: Label or value arrays: callers pass lists as well as numpy arrays (``len`` must work).
Values: TypeAlias = Sequence[Any] | np.ndarray


def accuracy(y_true: Values, y_pred: Values) -> float:
    """Fraction of exact matches."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def f1_per_class(y_true: Values, y_pred: Values) -> dict[str, float]:
    """F1 of every class present in truth or prediction."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    out: dict[str, float] = {}
    for c in sorted(set(t.tolist()) | set(p.tolist())):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        out[str(c)] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0
    return out


def f1_macro(y_true: Values, y_pred: Values) -> float:
    """scikit-learn's macro F1: the unweighted mean over every class in the truth or the
    predictions (a class only ever predicted counts, with F1 0)."""
    per = f1_per_class(y_true, y_pred)  # every class of either (labels may hold None, which
    return float(np.mean(list(per.values()))) if per else float("nan")  # sklearn refuses)


def confusion(y_true: Values, y_pred: Values) -> tuple[list[str], np.ndarray]:
    """Class names and the confusion matrix (rows truth, columns prediction)."""
    t, p = np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()
    classes = sorted(set(t) | set(p), key=lambda c: (str(type(c)), c))
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for a, b in zip(t, p, strict=True):
        m[index[a], index[b]] += 1
    return [str(c) for c in classes], m


def jaccard(true_sets: Sequence[Sequence], pred_sets: Sequence[Sequence]) -> float:
    """Mean Jaccard index |T ∩ P| / |T ∪ P| over samples (two empty sets count as 1)."""
    scores = []
    for t, p in zip(true_sets, pred_sets, strict=True):
        a, b = set(t), set(p)
        union = a | b
        scores.append(len(a & b) / len(union) if union else 1.0)
    return float(np.mean(scores)) if scores else float("nan")


def mae(y_true: Values, y_pred: Values) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))))


def r2(y_true: Values, y_pred: Values) -> float:
    """Coefficient of determination."""
    t, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    ss_res = np.sum((t - p) ** 2)
    ss_tot = np.sum((t - t.mean()) ** 2)
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def ranking_from_scores(
    scores: np.ndarray, names: Sequence[str], threshold: float
) -> list[tuple[str, ...]]:
    """Per row, the names whose score reaches ``threshold``, highest first (the top one always)."""
    out = []
    for row in np.atleast_2d(scores):
        order = np.argsort(-row, kind="stable")
        ranked = [names[k] for k in order if row[k] >= threshold]
        out.append(tuple(ranked) if ranked else (names[int(order[0])],))
    return out
