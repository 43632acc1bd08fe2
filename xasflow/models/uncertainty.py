"""Runtime uncertainty: calibrated probabilities, conformal sets and intervals, the OOD score.

What the daemon runs per batch of spectra, numpy only and vectorised over rows. The numbers
these functions take (temperature, conformal thresholds, OOD projection) are fitted offline by
``xasflow.training.calibrate`` and ``xasflow.training.ood`` and stored in the bundle manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Floor added to probabilities before the logarithm (forests give exact zeros).
PROB_EPS = 1e-6
#: Conformal score functions for classifiers.
SET_METHODS = ("lac", "aps")


def _probs2d(probs: np.ndarray) -> np.ndarray:
    """Validated (n, K) float array of probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probabilities must be (n, K), got shape {np.shape(probs)}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinity")
    return p


def apply_temperature(probs: np.ndarray, temperature: float, eps: float = PROB_EPS) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log(p + eps) / T)`` row by row.

    Working on log-probabilities lets one temperature calibrate forests, networks and their
    averages alike; T > 1 softens overconfident answers, T < 1 sharpens timid ones.
    """
    return tempered(np.clip(_probs2d(probs), 0.0, None), temperature, eps)


def tempered(p: np.ndarray, temperature: float, eps: float = PROB_EPS) -> np.ndarray:
    """:func:`apply_temperature` of probabilities already checked: ``p`` finite, (n, K) float,
    non-negative (the decoder checks each batch once, not once per step)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    logits = np.log(p + eps)
    logits /= temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits, out=logits)
    e /= e.sum(axis=1, keepdims=True)
    return e


def _aps_cumulative(p: np.ndarray) -> np.ndarray:
    """Per class, the summed probability of every class ranked at or above it (ties stable)."""
    order = np.argsort(-p, axis=1, kind="stable")
    cum_sorted = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, cum_sorted, axis=1)
    return out


def class_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """Nonconformity of every (row, class) pair: LAC ``1 - p``, APS the cumulative mass to it."""
    return _scores(_probs2d(probs), method)


def _scores(p: np.ndarray, method: str) -> np.ndarray:
    if method == "lac":
        return 1.0 - p
    if method == "aps":
        return _aps_cumulative(p)
    raise ValueError(f"unknown set method {method!r}; use one of {SET_METHODS}")


def prediction_sets(probs: np.ndarray, qhat: float, method: str = "lac") -> np.ndarray:
    """Boolean mask (n, K): the conformal set of each row, never empty (the argmax is always in).

    A class is in the set when its nonconformity score is at most ``qhat``, the threshold
    fitted on calibration rows for the bundle's coverage.
    """
    p = _probs2d(probs)
    return set_mask(p, qhat, method, np.argmax(p, axis=1))


def set_mask(p: np.ndarray, qhat: float, method: str, top: np.ndarray) -> np.ndarray:
    """:func:`prediction_sets` of checked probabilities ``p`` whose argmax per row is ``top``."""
    if math.isnan(qhat):
        raise ValueError("qhat is NaN")
    mask = _scores(p, method) <= qhat
    mask[np.arange(len(p)), top] = True
    return mask


def set_labels(
    mask: np.ndarray, classes: Sequence[object], probs: np.ndarray | None = None
) -> list[list[object]]:
    """The class labels of each row's set: most probable first given ``probs``, else class order."""
    if mask.shape[1] != len(classes):
        raise ValueError(f"mask has {mask.shape[1]} classes, labels {len(classes)}")
    if probs is None:
        return [[classes[int(k)] for k in np.flatnonzero(row)] for row in mask]
    order = np.argsort(-_probs2d(probs), axis=1, kind="stable")
    return [[classes[int(k)] for k in o if row[k]] for row, o in zip(mask, order, strict=True)]


#: A conformal quantile this large stands for infinity (JSON has none): too few calibration
#: rows for the coverage asked, or (scaled intervals) spreads too small to scale, so the set
#: holds every class and the interval is unbounded.
UNBOUNDED_QHAT = 1e6


def is_unbounded(qhat: float) -> bool:
    """Whether a fitted conformal quantile covers everything (:data:`UNBOUNDED_QHAT`)."""
    return not qhat < UNBOUNDED_QHAT


def intervals(
    pred: np.ndarray, qhat: float, scale: np.ndarray | None = None, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Conformal interval ``pred -+ qhat * s``: s is 1 (absolute residuals) or ``scale + offset``.

    ``scale`` is a per-prediction spread (ensemble or tree standard deviation); ``offset`` keeps
    the width positive where the spread vanishes.
    """
    y = np.asarray(pred, dtype=np.float64).ravel()
    if scale is None:
        width = np.full_like(y, float(qhat))
    else:
        s = np.asarray(scale, dtype=np.float64).ravel()
        if s.shape != y.shape:
            raise ValueError(f"scale has shape {s.shape}, predictions {y.shape}")
        if np.any(s < 0) or not np.all(np.isfinite(s)):
            raise ValueError("scale must be finite and non-negative")
        width = float(qhat) * (s + offset)
    return y - width, y + width


def classifier_from_spec(
    probs: np.ndarray, spec: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and conformal set mask of raw probabilities, from the manifest
    entry written by ``ClassifierCalibration.spec()`` (temperature, eps, set_method, qhat)."""
    p = apply_temperature(probs, float(spec["temperature"]), float(spec.get("eps", PROB_EPS)))
    qhat = spec.get("qhat")
    return p, prediction_sets(p, np.inf if qhat is None else float(qhat), spec["set_method"])


def interval_from_spec(
    pred: np.ndarray, spec: Mapping[str, Any], scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Conformal interval from the manifest entry written by ``RegressorCalibration.spec()``."""
    qhat = spec.get("qhat")
    q = np.inf if qhat is None else float(qhat)
    if spec.get("normalised"):
        if scale is None:
            raise ValueError("this interval is normalised by a spread; pass scale")
        return intervals(pred, q, scale, float(spec.get("offset", 0.0)))
    return intervals(pred, q)


def spread_score(stds: list[np.ndarray]) -> np.ndarray:
    """Ensemble disagreement per row: each (n, k) or (n,) spread summed over its columns, then
    averaged over the arrays (one per network graph)."""
    if not stds:
        raise ValueError("no spread outputs given")
    rows = [np.asarray(s, dtype=np.float64).reshape(len(s), -1).sum(axis=1) for s in stds]
    return np.mean(rows, axis=0)


def combined_ood(
    recon: np.ndarray, recon_scale: float, spread: np.ndarray, spread_scale: float
) -> np.ndarray:
    """One out-of-domain score from two signals, each in units of its own validation quantile:
    the larger of the two, so either one alone can flag; non-finite rows score infinity."""
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.maximum(np.asarray(recon) / recon_scale, np.asarray(spread) / spread_scale)
    return np.where(np.isfinite(score), score, np.inf)


def smoothing_matrix(width: int, sigma: float) -> np.ndarray:
    """(width, width) Gaussian smoother of standard deviation ``sigma`` columns, each row's
    weights (cut at 4 sigma, at the ends too) summing to 1; ``w @ K.T`` smooths rows of ``w``.

    Point noise spreads over every direction of a spectrum; the shapes a PCA score models
    vary over many columns, so a light smoothing removes most of the noise and little else."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    idx = np.arange(width, dtype=np.float64)
    dist = (idx[:, None] - idx[None, :]) / sigma
    k = np.where(np.abs(dist) <= 4.0, np.exp(-0.5 * dist * dist), 0.0)
    return k / k.sum(axis=1, keepdims=True)


def ood_score(
    x: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    inv_scale: np.ndarray,
    residual_weight: float,
    window: tuple[int, int] | None = None,
    norm_window: tuple[int, int] | None = None,
    smoother: np.ndarray | None = None,
) -> np.ndarray:
    """Distance of each model input (rows of ``x``) from the training data, one per row.

    ``w`` is ``x[:, window]`` (default: the first ``mean.size`` columns), divided by each row's
    mean over ``x[:, norm_window]`` when one is given (so an edge-step error alone does not
    move it); ``z = (w - mean) @ components.T`` (k principal axes); the score is
    ``sum((z * inv_scale)**2) + residual_weight * |w - mean - z @ components|**2``. With
    ``inv_scale`` 1/sqrt(variance) and ``residual_weight`` 0 it is the Mahalanobis distance in
    PCA space; with ``inv_scale`` 0 the PCA reconstruction error. A ``smoother``
    (:func:`smoothing_matrix`) replaces ``w`` with ``w @ smoother.T`` first. Rows that cannot
    be scored (NaN, zero mean) score infinity.
    """
    d = mean.size
    start, stop = window if window is not None else (0, d)
    if stop - start != d:
        raise ValueError(f"window {window} has {stop - start} columns, the model {d}")
    xs = np.asarray(x, dtype=np.float64)
    if xs.ndim == 1:
        xs = xs[None, :]
    need = max(stop, norm_window[1] if norm_window is not None else 0)
    if xs.ndim != 2 or xs.shape[1] < need:
        raise ValueError(f"x must be (n, >= {need}), got shape {np.shape(x)}")
    w = xs[:, start:stop]
    with np.errstate(divide="ignore", invalid="ignore"):
        if norm_window is not None:
            w = w / xs[:, norm_window[0] : norm_window[1]].mean(axis=1, keepdims=True)
        if smoother is not None:
            w = w @ smoother.T
        c = w - mean
        z = c @ components.T
        score = np.sum((z * inv_scale) ** 2, axis=1)
        if residual_weight:
            r = c - z @ components
            score = score + residual_weight * np.sum(r * r, axis=1)
    return np.where(np.isfinite(score), score, np.inf)


def whiteline_deficit(
    x: np.ndarray, peak: tuple[int, int], level: tuple[int, int], center: float
) -> np.ndarray:
    """How much weaker each row's main peak is than the training spectra's typical one.

    ``center - max(x[:, peak]) / mean(x[:, level])``: the highest value near the edge over the
    post-edge level (so an edge-step error does not move it), below the training median
    ``center``. Oxides have strong white lines; sulfides, chlorides and metals weak ones.
    Rows that cannot be scored (NaN, zero level) score infinity.
    """
    xs = np.atleast_2d(np.asarray(x, dtype=np.float64))
    need = max(peak[1], level[1])
    if xs.ndim != 2 or xs.shape[1] < need:
        raise ValueError(f"x must be (n, >= {need}), got shape {np.shape(x)}")
    if not (0 <= peak[0] < peak[1] and 0 <= level[0] < level[1]):
        raise ValueError(f"empty column range: peak {peak}, level {level}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = xs[:, peak[0] : peak[1]].max(axis=1) / xs[:, level[0] : level[1]].mean(axis=1)
        score = center - ratio
    return np.where(np.isfinite(score), score, np.inf)


def max_scaled(scores: list[np.ndarray], scales: list[float]) -> np.ndarray:
    """The largest of several scores, each divided by its own scale (so any one alone can
    flag); a row with any non-finite score scores infinity."""
    if not scores or len(scores) != len(scales):
        raise ValueError("give one scale per score, and at least one score")
    with np.errstate(divide="ignore", invalid="ignore"):
        stacked = np.stack(
            [np.asarray(s, dtype=np.float64) / c for s, c in zip(scores, scales, strict=True)]
        )
    bad = ~np.isfinite(stacked).all(axis=0)
    return np.where(bad, np.inf, stacked.max(axis=0))
