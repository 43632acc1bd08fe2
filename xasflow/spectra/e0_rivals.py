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

__all__ = ["edge_peaks", "rival_origins"]

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
    empty = np.zeros(0)
    lo, hi = max(energy[0], e0 - window - 2.0), min(energy[-1], e0 + window + 2.0)
    if window <= 0 or hi - lo < 4.0:
        return empty, empty
    grid = np.arange(lo, hi, E0_STEP)
    deriv = smoothed_derivative(np.interp(grid, energy, mu)[None, :])[0]  # on_grid of one row
    at, height = _peaks(grid, deriv)
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
    at, height = edge_peaks(energy, mu, e0, window)
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
