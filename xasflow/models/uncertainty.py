"""Run-time uncertainty: temperature scaling, conformal sets and intervals (numpy only)."""

from __future__ import annotations

import numpy as np


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(log p / T)`` of (n, K) probabilities."""
    logits = np.log(np.clip(probs, 1e-12, None)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def conformal_sets(probs: np.ndarray, qhat: float, method: str) -> np.ndarray:
    """(n, K) mask of the conformal prediction set; never empty (the top class is always in).

    ``lac``: classes with ``1 - p <= qhat``. ``aps``: classes in decreasing probability until
    their cumulative probability reaches ``qhat`` (the class that crosses it included).
    """
    if method == "lac":
        mask = (1.0 - probs) <= qhat
    elif method == "aps":
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p
        keep_sorted = before < qhat
        mask = np.zeros_like(keep_sorted)
        np.put_along_axis(mask, order, keep_sorted, axis=1)
    else:
        raise ValueError(f"unknown conformal set method {method!r}")
    mask[np.arange(len(probs)), np.argmax(probs, axis=1)] = True
    return mask


def conformal_interval(
    values: np.ndarray, qhat: float, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of ``values +- qhat`` (absolute) or ``values +- qhat * scale`` (scaled)."""
    half = qhat if scale is None else qhat * np.maximum(scale, 1e-9)
    return values - half, values + half
