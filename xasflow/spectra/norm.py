"""Pre-edge line and post-edge polynomial with Larch's ``pre_edge`` conventions.

The ranges, degrees and their defaults follow ``larch.xafs.pre_edge`` (xraylarch 2026.3):
pre-edge from the second data point (rounded to 5 eV, or 2 eV for scans with at most 20
points below E0) to half that distance, the points counted from the scan's bulk: leading
points set apart from it (:func:`leading_strays`, a trailing ``0 0`` row of a two-column
file) are not the pre-edge, and a line reaching back to one was tilted by it; post-edge from
``min(25, norm2/15)`` eV (rounded to 5 eV) to the end of the bulk (points set apart after it,
:func:`trailing_strays`, are no post-edge: one 11 keV out set the range and the degree); a
quadratic over 300 eV or more, a line over 30 eV or more, else a constant. A calculation (FEFF) has no pre-edge region and no background: nothing is
subtracted. (Larch's ``iscalc`` subtracts the first value, which on the 4,831 shared Cu FEFF
spectra is 2.5-7.6 % of the step: the Lorentzian tail of the edge itself, which a measured
pre-edge line far below E0 does not remove.) Optionally (``tail_width``) the edge's own
arctan shape is taken out of both fits, and the post-edge fit can weigh energy rather than
points; with neither, the step is Larch's to 0.01 % (median over the shared library).
Absurd values in either range (a glitch of 1e6, a dropout: :mod:`xasflow.spectra.outliers`)
are left out of the fits; Larch fits them, and one sets its step.
Written here rather than imported so the daemon needs no Larch; about 30x faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from xasflow.spectra.outliers import absurd_points

Weighting = Literal["points", "energy"]

#: ``np.add.reduce``: the sums of ``ndarray.sum`` (the same ufunc reduction, the same bits)
#: without its Python wrapper; the fits below take a dozen per spectrum.
_sum = np.add.reduce


@dataclass(frozen=True)
class EdgeFit:
    """What :func:`edge_fit` used and found; ranges are relative to E0 in eV."""

    step: float
    pre1: float
    pre2: float
    norm1: float
    norm2: float
    nnorm: int
    npre: int  # 1 a line, 0 a constant (too few pre-edge points, or a calculation)
    calculated: bool


#: At most this many points at either end may be set apart from a scan (:func:`stray_ends`).
MAX_STRAYS = 3


def stray_ends(rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``rel`` ((n, m) or one (m,) row of ascending energies, eV), how many of its
    first and of its last points (at most :data:`MAX_STRAYS` each, leaving 3) lie apart from
    the scan: further from their neighbour towards the scan than the whole span of the scan.

    Such a point is no part of the scan: an aborted point or a DAQ's padding (``0 0``) read
    as data, 9 keV below a Cu edge, or a point keV past its end. Larch's default pre-edge
    range starts at the second point and, rounded down, reaches back to the first: a line
    through a point that far sets the background alone (CuO's CN 5 -> 6); its post-edge
    range and degree follow the last point. A point less far than the scan's span (a sparse
    post-edge) is data. No scan of the shared XAS Data Library has either (its largest
    first gap is 5 eV before a 23 eV pre-edge; its last gaps are at most 1.06 times the
    ones before). Each end is measured against the scan without the other end's strays
    (one of each is found). Shift-invariant, so the rows of one shifted axis agree.
    """
    if np.ndim(rel) == 1:  # one spectrum: a few Python floats (this runs per spectrum)
        lead1, trail1 = _stray_ends_1d(rel)
        return np.array([lead1], dtype=np.intp), np.array([trail1], dtype=np.intp)
    r = np.atleast_2d(rel)
    lead = np.zeros(r.shape[0], dtype=np.intp)
    trail = np.zeros(r.shape[0], dtype=np.intp)
    for _ in range(2 * MAX_STRAYS + 1):  # counts only grow, as the other end's do: a few passes
        new_lead = np.maximum(lead, _apart(r, trail, from_end=False))
        new_trail = np.maximum(trail, _apart(r, new_lead, from_end=True))
        if (new_lead == lead).all() and (new_trail == trail).all():
            break
        lead, trail = new_lead, new_trail
    return lead, trail


def _stray_ends_1d(rel: np.ndarray) -> tuple[int, int]:
    """:func:`stray_ends` of one row, on its first and last few values as Python floats."""
    m = rel.size
    k = MAX_STRAYS + 1
    head = rel[:k].tolist()
    tail = rel[-k:].tolist()[::-1]  # tail[j] = rel[m - 1 - j]
    lead = trail = 0
    for _ in range(2 * MAX_STRAYS + 1):
        new_lead, new_trail = lead, trail
        for i in range(min(MAX_STRAYS, m - 3)):
            if trail <= m - 4 - i and head[i + 1] - head[i] > tail[trail] - head[i + 1]:
                new_lead = max(new_lead, i + 1)
        for i in range(min(MAX_STRAYS, m - 3)):
            if new_lead <= m - 4 - i and tail[i] - tail[i + 1] > tail[i + 1] - head[new_lead]:
                new_trail = max(new_trail, i + 1)
        if (new_lead, new_trail) == (lead, trail):
            break
        lead, trail = new_lead, new_trail
    return lead, trail


def _apart(r: np.ndarray, other: np.ndarray, from_end: bool) -> np.ndarray:
    """How many first (``from_end``: last) points of each row of ``r`` lie further from their
    neighbour towards the scan than the span from it to the other end, that end's ``other``
    strays left out."""
    m = r.shape[1]
    far = r[np.arange(r.shape[0]), other if from_end else m - 1 - other]
    count = np.zeros(r.shape[0], dtype=np.intp)
    for i in range(min(MAX_STRAYS, m - 3)):
        keep = other <= m - 4 - i  # i + 1 strays here still leave 3 points
        if from_end:
            out, near = r[:, m - 1 - i], r[:, m - 2 - i]
            count[keep & ((out - near) > (near - far))] = i + 1
        else:
            out, near = r[:, i], r[:, i + 1]
            count[keep & ((near - out) > (far - near))] = i + 1
    return count


def bulk_of(energy: np.ndarray) -> slice:
    """The columns of one scan's bulk (ascending ``energy``, (m,)): its points but those
    :func:`stray_ends` sets apart at either end."""
    lead, trail = _stray_ends_1d(energy)
    return slice(lead, energy.size - trail)


def leading_strays(rel: np.ndarray) -> np.ndarray:
    """Per row of ``rel``, how many first points :func:`stray_ends` sets apart (no pre-edge)."""
    return stray_ends(rel)[0]


def trailing_strays(rel: np.ndarray) -> np.ndarray:
    """Per row of ``rel``, how many last points :func:`stray_ends` sets apart (no post-edge)."""
    return stray_ends(rel)[1]


def _index_of(rel: np.ndarray, value: float) -> int:
    """Index of the last point at or below ``value`` (0 when all lie above), as Larch's."""
    return max(int(rel.searchsorted(value, side="right")) - 1, 0)


def _index_nearest(rel: np.ndarray, value: float) -> int:
    """Index of the point nearest ``value`` (the lower one on a tie, as ``argmin``)."""
    i = int(rel.searchsorted(value))
    if i <= 0:
        return 0
    if i >= rel.size:
        return rel.size - 1
    return i if rel[i] - value < value - rel[i - 1] else i - 1


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line through (x, y) as (value at ``centre``, slope, ``centre``).

    Closed form on centred x: the same fit as ``np.polyfit(x, y, 1)`` without its overhead
    (this runs several times per spectrum in the daemon).
    """
    n = x.size
    centre = float(_sum(x)) / n
    mean = float(_sum(y)) / n
    if n < 2:
        return mean, 0.0, centre
    t = x - centre
    tt = float(t @ t)
    return mean, (float(t @ y) / tt if tt > 0 else 0.0), centre


def _energy_weights(x: np.ndarray) -> np.ndarray:
    """Trapezoid weights: a weighted fit then weighs energy, not points (sampling-free)."""
    w = np.empty_like(x)
    w[1:-1] = 0.5 * (x[2:] - x[:-2])
    w[0] = 0.5 * (x.item(1) - x.item(0))
    w[-1] = 0.5 * (x.item(-1) - x.item(-2))
    return w


def default_ranges(
    rel: np.ndarray,
    norm1: float | None = None,
    norm2: float | None = None,
    nnorm: int | None = None,
) -> tuple[float, float, int]:
    """Larch's post-edge range and degree for data at ``rel`` eV from E0 (Nones = its rules)."""
    top = float(rel[-1])
    if norm2 is None:
        norm2 = 5.0 * round(top / 5.0)
    if norm2 < 0:
        norm2 = top - norm2
    norm2 = min(norm2, top)
    if norm1 is None:
        norm1 = min(25.0, 5.0 * round(norm2 / 15.0))
    if norm1 > norm2:
        norm1, norm2 = norm2, norm1
    norm1 = min(norm1, norm2 - 2.0)
    if nnorm is None:
        span = norm2 - norm1
        nnorm = 2 if span >= 300 else 1 if span >= 30 else 0
    return float(norm1), float(norm2), max(min(int(nnorm), 3), 0)


def edge_fit(
    energy: np.ndarray,
    mu: np.ndarray,
    e0: float,
    *,
    pre1: float | None = None,
    pre2: float | None = None,
    norm1: float | None = None,
    norm2: float | None = None,
    nnorm: int | None = None,
    calculated: bool = False,
    weighting: Weighting = "points",
    tail_width: float | None = None,
    bulk: slice | None = None,
) -> tuple[np.ndarray, EdgeFit]:
    """Return (mu minus the pre-edge, the fit); the edge step is the post-edge fit at E0.

    The pre-edge range (``pre1`` given or not) starts no lower than the scan's bulk, and the
    post-edge range ends with it: points :func:`stray_ends` sets apart are left out of the
    fits (and still subtracted from), as are absurd values within the ranges
    (:func:`~xasflow.spectra.outliers.absurd_points`).

    ``weighting="points"`` fits the data points as Larch does; ``"energy"`` weighs each
    post-edge point by the energy it spans, so the step does not depend on the sampling.
    ``tail_width`` (the core hole's Lorentzian FWHM, eV) removes the edge's own 1/E tail
    from the pre-edge data before the line is fitted, with the step of a first pass: a
    calculation keeps that tail (nothing is subtracted from it), and a line through it
    tilts a short scan's post-edge by several % (Larch does not correct it). The step may
    come out zero or negative; the caller decides what to do with that. ``bulk``: the
    scan's bulk (:func:`bulk_of`) when the caller has it, None: found here.
    """
    rel = energy - e0
    n = rel.size
    bulk = bulk_of(rel) if bulk is None else bulk
    s, end = bulk.indices(n)[:2]  # the bulk: strays are no pre- or post-edge
    ie0 = _index_nearest(rel, 0.0) - s
    if pre1 is None:
        pre1 = (5.0 * round(rel[s + 1] / 5.0)) if ie0 > 20 else (2.0 * round(rel[s + 1] / 2.0))
    pre1 = max(pre1, float(rel[s]))
    if pre2 is None:
        pre2 = 0.5 * pre1
    if pre1 > pre2:
        pre1, pre2 = pre2, pre1
    q1 = q2 = npre = 0
    if calculated:
        pre1 = pre2 = float(rel[0])
    else:
        q1, q2 = _index_of(rel, pre1), _index_nearest(rel, pre2)
        npre = 1 if _index_of(rel, pre2) - q1 >= 3 else 0
        q2 = max(q2, q1 + 1) if npre == 0 else max(q2, min(n, q1 + 2))
    norm1, norm2, nnorm = default_ranges(rel[:end], norm1, norm2, nnorm)
    p1, p2 = _index_of(rel, norm1), _index_nearest(rel[:end], norm2)
    p1 = min(p1, end - 3)
    if p2 - p1 < 2:
        p1, nnorm = p1 - 2, 0
    elif p2 - p1 < 5:
        nnorm = min(1, nnorm)
    # absurd values (a glitch of 1e6, a dropout) are left out of both fits
    keep_pre, keep_post = absurd_points(rel, mu, None if calculated else (q1, q2), (p1, p2))
    background: np.ndarray | float = (
        0.0 if calculated else _background(rel, mu, q1, q2, npre, keep_pre)
    )
    # (mu - background)[p1:p2], on those points only
    below = background[p1:p2] if isinstance(background, np.ndarray) else background
    x, y = rel[p1:p2], mu[p1:p2] - below
    if keep_post is not None:
        x, y = x[keep_post], y[keep_post]
    w = _energy_weights(x) if weighting == "energy" and x.size > 1 else None
    if not (tail_width and tail_width > 0):
        step = _at_zero(x, y[:, None], nnorm, w)[0]
        return mu - background, EdgeFit(step, pre1, pre2, norm1, norm2, nnorm, npre, calculated)
    # The edge's own shape is taken out, by linearity of the fits: above E0 the arctan still
    # approaches 1 as 1 - width/(2 pi E), which a short post-edge range extrapolates
    # differently from a long one; below E0 its 1/E tail tilts a short pre-edge line.
    half = 0.5 * tail_width
    approach = np.arctan(x / half) / np.pi - 0.5
    ys = np.empty((x.size, 2))  # np.column_stack((y, approach))
    ys[:, 0], ys[:, 1] = y, approach
    first, shape = _at_zero(x, ys, nnorm, w)
    step = first * (1.0 - shape)
    if not calculated and step > 0:
        xp = rel[q1:q2] if keep_pre is None else rel[q1:q2][keep_pre]
        tail = step * (0.5 + np.arctan(xp / half) / np.pi)
        if npre == 0:
            shift = float(_sum(tail)) / tail.size
            background = background - shift
            step += shift
        else:
            value, slope, centre = _line(xp, tail)
            background = background - (value + slope * (rel - centre))
            # a post-edge polynomial of degree >= 1 reproduces this line; a constant, its mean
            wx = np.ones_like(x) if w is None else w
            at = 0.0 if nnorm >= 1 else float(wx @ x) / float(_sum(wx))
            step += value + slope * (at - centre)
    return mu - background, EdgeFit(step, pre1, pre2, norm1, norm2, nnorm, npre, calculated)


def _at_zero(x: np.ndarray, ys: np.ndarray, degree: int, w: np.ndarray | None = None) -> np.ndarray:
    """(Weighted) least-squares polynomials of ``degree`` through each column of ``ys``, at 0.

    Normal equations from power sums of centred, scaled x (degree <= 3: well conditioned).
    """
    n = x.size
    w = np.ones_like(x) if w is None else w
    wys = w[:, None] * ys
    total = float(_sum(w))
    if degree == 0 or n <= degree:
        return _sum(wys, 0) / total
    centre = float(w @ x) / total
    scale = max(x.item(-1) - centre, centre - x.item(0)) or 1.0
    t = (x - centre) / scale
    powers = [t]
    for _ in range(2 * degree - 1):
        powers.append(powers[-1] * t)
    sums = [total] + [float(w @ p) for p in powers]
    gram = np.array([sums[i : i + degree + 1] for i in range(degree + 1)])
    rhs = np.array([_sum(wys, 0)] + [powers[i] @ wys for i in range(degree)])
    coef = np.linalg.solve(gram, rhs)
    at = -centre / scale
    return np.array([at**i for i in range(degree + 1)]) @ coef


def _background(
    rel: np.ndarray, mu: np.ndarray, q1: int, q2: int, npre: int, keep: np.ndarray | None = None
) -> Any:
    """The pre-edge line through ``mu[q1:q2]`` (its points ``keep``, None: all) evaluated on
    ``rel`` (a constant if npre=0)."""
    x, y = rel[q1:q2], mu[q1:q2]
    if keep is not None:
        x, y = x[keep], y[keep]
    if npre == 0:
        return float(_sum(y)) / y.size
    value, slope, centre = _line(x, y)
    return value + slope * (rel - centre)
