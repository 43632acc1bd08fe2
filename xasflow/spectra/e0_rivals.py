"""Rival edge positions: rises of mu near E0 nearly as steep as the steepest one.

E0 is the steepest point of the edge (as Larch and Athena define it). Cu(II) K edges often
rise twice a few eV apart (the 1s->4p shoulder and the main edge) with nearly equal slopes,
so point noise decides which rise "is" E0: on measured CuO with noise of 1 % of the edge
step, E0 jumped ~7 eV in a fifth of the draws, and the whole model input with it. The rivals
found here let a bundle answer from every such rise (``PrepParams.e0_rivals``: the model
grid placed on each, the graphs' outputs averaged; :mod:`xasflow.models.views`), so the
answer no longer depends on which rise the noise picked.
"""

from __future__ import annotations

import numpy as np

from xasflow.spectra.e0 import E0_STEP, TIE, smoothed_derivative

__all__ = ["edge_peaks", "rival_origins", "rival_origins_rows"]

#: Rivals closer than this to E0 or to a higher rival are the same rise (eV).
APART = 1.0

_max = np.maximum.reduce


def edge_peaks(
    energy: np.ndarray, mu: np.ndarray, e0: float, window: float
) -> tuple[np.ndarray, np.ndarray]:
    """The local maxima of mu's smoothed derivative within ``window`` eV of ``e0``:
    positions (eV) and heights.

    The derivative of mu on a 0.1 eV grid, smoothed with a 0.5 eV Gaussian (the one
    :func:`~xasflow.spectra.find_e0` looks at); a flat top counts once, at its centre.
    """
    grid = _search_grid(energy, e0, window)
    if grid is None:
        return np.zeros(0), np.zeros(0)
    deriv = smoothed_derivative(np.interp(grid, energy, mu)[None, :])[0]  # on_grid of one row
    return _inner(*_peaks(grid, deriv), e0, window)


def _search_grid(energy: np.ndarray, e0: float, window: float) -> np.ndarray | None:
    """The 0.1 eV grid :func:`edge_peaks` reads the derivative on (None: too short)."""
    lo, hi = max(energy[0], e0 - window - 2.0), min(energy[-1], e0 + window + 2.0)
    if window <= 0 or hi - lo < 4.0:
        return None
    return np.arange(lo, hi, E0_STEP)


def _inner(
    at: np.ndarray, height: np.ndarray, e0: float, window: float
) -> tuple[np.ndarray, np.ndarray]:
    inner = (at >= e0 - window) & (at <= e0 + window)
    return at[inner], height[inner]


def rival_origins(
    energy: np.ndarray, mu: np.ndarray, e0: float, ratio: float, window: float
) -> tuple[float, ...]:
    """Rises within ``window`` eV of ``e0`` whose slope is at least ``ratio`` times the
    steepest there, highest first; each more than :data:`APART` eV from E0 and from every
    higher one. Empty for a clear edge.

    The set does not depend on which rise E0 landed on (both see the same window's steepest
    rise), so two noisy copies of a two-rise edge get the same grids whichever rise won.
    """
    return _chosen(*edge_peaks(energy, mu, e0, window), e0, ratio)


def rival_origins_rows(
    axes: list[np.ndarray],
    mus: list[np.ndarray],
    e0s: list[float],
    ratio: float,
    window: float,
) -> list[tuple[float, ...]]:
    """:func:`rival_origins` of several spectra (each its energy axis, mu and E0), bit for
    bit: the derivative and the peak search of the spectra whose search grids have the same
    length run once for all of them (most of a spectrum's search is numpy's per-call cost)."""
    out: list[tuple[float, ...]] = [()] * len(e0s)
    groups: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for i, (energy, mu, e0) in enumerate(zip(axes, mus, e0s, strict=True)):
        grid = _search_grid(energy, e0, window)
        if grid is not None:
            groups.setdefault(grid.size, []).append((i, grid, np.interp(grid, energy, mu)))
    for members in groups.values():
        grids = np.vstack([g for _, g, _ in members])
        derivs = smoothed_derivative(np.vstack([v for _, _, v in members]))
        rows = [i for i, _, _ in members]
        chosen = _chosen_rows(*_peaks_rows(grids, derivs), [e0s[i] for i in rows], ratio, window)
        for i, origins in zip(rows, chosen, strict=True):
            out[i] = origins
    return out


def _chosen_rows(
    r: np.ndarray, at: np.ndarray, height: np.ndarray, e0s: list[float], ratio: float, window: float
) -> list[tuple[float, ...]]:
    """:func:`_chosen` of each row's peaks near its E0 (the peaks of all rows: row ``r``,
    ``at``, ``height``): the window, the steepest and the kept peaks as masks over all rows,
    sorted once; only the apart test walks the kept peaks, as plain floats."""
    e0 = np.asarray(e0s, dtype=np.float64)
    inner = (at >= e0[r] - window) & (at <= e0[r] + window)
    r, at, height = r[inner], at[inner], height[inner]
    top = np.full(e0.size, -np.inf)
    np.maximum.at(top, r, height)
    keep = (height >= ratio * top[r]) & (top > 0)[r]
    # _chosen's order, every row at once: by row, then steepest first (both sorts stable)
    order = np.lexsort((-height[keep], r[keep]))
    rows, ats = r[keep][order].tolist(), at[keep][order].tolist()
    out: list[tuple[float, ...]] = [()] * e0.size
    chosen: list[float] = []
    for i, (k, a) in enumerate(zip(rows, ats, strict=True)):
        if i == 0 or k != rows[i - 1]:  # a new row: its E0 is the first taken
            chosen = [float(e0s[k])]
        if all(abs(a - c) > APART for c in chosen):
            chosen.append(a)
            out[k] = tuple(chosen[1:])
    return out


def _chosen(at: np.ndarray, height: np.ndarray, e0: float, ratio: float) -> tuple[float, ...]:
    """The rival origins among the peaks (``at``, ``height``) near ``e0``."""
    if height.size == 0:
        return ()
    top = float(_max(height))
    if not top > 0:
        return ()
    keep = np.flatnonzero(height >= ratio * top)
    chosen = [float(e0)]
    for k in keep[np.argsort(-height[keep], kind="stable")].tolist():
        a = float(at[k])
        if all(abs(a - c) > APART for c in chosen):
            chosen.append(a)
    return tuple(chosen[1:])


def _peaks(grid: np.ndarray, deriv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``deriv`` on ``grid``: positions (eV) and heights.

    Steps within :data:`~xasflow.spectra.e0.TIE` of the largest value count as level, so a
    flat top (mu a straight line between data points eV apart) is one maximum at its centre,
    not a row of rounding ripples, as :func:`~xasflow.spectra.find_e0` reads it.
    """
    step = deriv[1:] - deriv[:-1]  # np.diff
    finite = np.abs(deriv[np.isfinite(deriv)])
    tol = TIE * float(_max(finite)) if finite.size else 0.0
    sign = np.where(np.abs(step) <= tol, 0, np.sign(step))
    turns = sign.nonzero()[0]  # the steps that rise or fall, in order
    up = turns[:-1][(sign[turns[:-1]] > 0) & (sign[turns[1:]] < 0)]
    down = turns[1:][(sign[turns[:-1]] > 0) & (sign[turns[1:]] < 0)]
    # a rise at step a, level steps, a fall at step b: the top is points a + 1 .. b
    return 0.5 * (grid[up + 1] + grid[down]), deriv[up + 1]


def _peaks_rows(grids: np.ndarray, derivs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_peaks` of each row of ``derivs`` on its row of ``grids``, in one pass: the
    same steps, tolerance and level runs, element by element (so the same numbers); the
    maxima of all rows in row order: row, position, height."""
    step = derivs[:, 1:] - derivs[:, :-1]
    finite = np.where(np.isfinite(derivs), np.abs(derivs), -np.inf)
    top = _max(finite, axis=1)
    tol = np.where(np.isfinite(top), TIE * top, 0.0)
    level = np.abs(step) <= tol[:, None]
    sign = np.sign(step, out=step)
    sign[level] = 0.0
    turn = np.flatnonzero(sign)  # row by row, each row's turns in order (as nonzero())
    rows = np.repeat(np.arange(sign.shape[0]), np.count_nonzero(sign, axis=1))
    turns = turn - rows * sign.shape[1]
    same = rows[:-1] == rows[1:]
    value = sign.ravel()[turn]
    top_at = same & (value[:-1] > 0) & (value[1:] < 0)
    r, up, down = rows[:-1][top_at], turns[:-1][top_at], turns[1:][top_at]
    at = 0.5 * (grids[r, up + 1] + grids[r, down])
    return r, at, derivs[r, up + 1]
