"""The edge energy E0: the steepest rise of the smoothed mu, for one spectrum or a stack.

Each spectrum is put on a uniform 0.1 eV grid (linear interpolation) and differentiated
through a 0.5 eV Gaussian, in one pass: a 33-tap derivative-of-smoothing kernel. E0 is the
derivative's maximum, refined by a parabola through its neighbours (where the data points
lie eV apart across the edge and the derivative has a flat top: its centre). Training's single
spectra and the daemon's fly-scan stacks run the same row-wise code (:func:`e0_rows`): a row's
E0 does not depend on the rows beside it, to the last bit, and a stack costs a few numpy calls
instead of some twenty per spectrum. Points apart from the scan, in energy (strays) or in
mu (a lone spike), are left out first: their flanks are steeper than any edge. A glitch of a
fraction of the edge step is no lone spike, but its flank, one data interval, can still be
the steepest rise: a maximum whose rise stands on one point is passed over for the next
(:func:`rises_at`, as Larch's ``find_e0`` wants the derivative high at three points).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.ndimage import correlate1d, gaussian_filter1d

from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.e0_window import (
    SHORT_OF_EDGE,
    no_edge_detail,
    scan_points,
    search_window,
    window_error,
)

__all__ = [
    "AT_BORDER",
    "COARSE",
    "E0_STEP",
    "FOIL_DIP",
    "FOIL_LOWEST",
    "FOIL_WIDE",
    "FOIL_WIDE_DIP",
    "NEVER_RISES",
    "ONE_POINT",
    "PERSIST",
    "RISE_FRACTION",
    "RISE_REACH",
    "SHORT_OF_EDGE",
    "TIE",
    "e0_in_window",
    "e0_rows",
    "e0_rows_why",
    "find_e0",
    "no_edge_detail",
    "on_grid",
    "rises_at",
    "scan_points",
    "search_window",
    "smoothed_derivative",
    "window_error",
]

E0_STEP = 0.1  # eV, uniform grid used for the derivative
_E0_SIGMA = 0.5  # eV, Gaussian smoothing of mu before differentiating
_KERNEL = np.exp(-0.5 * (np.arange(-15, 16) * E0_STEP / _E0_SIGMA) ** 2)
_KERNEL /= _KERNEL.sum()
#: the central difference of the smoothed curve as one correlation: d[i] = (s[i+1] - s[i-1]) /
#: (2 step) with s = m correlated with the Gaussian (exactly antisymmetric, so scipy takes
#: its antisymmetric path); the data's ends are repeated beyond them (``mode="nearest"``)
_DERIVATIVE = np.zeros(_KERNEL.size + 2)
_DERIVATIVE[2:] += _KERNEL
_DERIVATIVE[:-2] -= _KERNEL
_DERIVATIVE /= 2 * E0_STEP
#: the derivative kernel's taps as eV offsets, and the most it moves per unit of mu moved
#: under it (one point's pull on the derivative, :func:`rises_at`)
_TAPS = (np.arange(_DERIVATIVE.size) - _DERIVATIVE.size // 2) * E0_STEP
_PULL = float(np.abs(_DERIVATIVE).sum())
#: grid points at each end that cannot hold E0: within the kernel's reach of the ends
_MARGIN = round(1.5 / E0_STEP)
#: relative: derivative values this close to the maximum tie with it. Where the data points
#: lie several eV apart across the edge, mu is a straight line between them and the smoothed
#: derivative is flat to rounding over eV: the first maximum would be picked by rounding
#: noise (SrCO3 in the XAS Data Library moved 6.5 eV with the kernel's summation order), so
#: E0 is the centre of the flat top. A smooth peak on the 0.1 eV grid differs from its
#: neighbours by far more (some 1e-4 of its height).
TIE = 1e-9
#: eV: the data intervals that lie this close to a maximum of the smoothed derivative (two
#: kernel widths) are the rise it stands for; the steepest of them is tested (:func:`rises_at`)
RISE_REACH = 2 * _E0_SIGMA
#: an edge's rise does not stand on one point: without either end point of its steepest data
#: interval, the smoothed derivative keeps at least this fraction of its value. Without a
#: one-point glitch, its flank is the background's slope (a few % of the flank's; more on a
#: rising pre-edge or edge foot: at 0.2, 124 of 2043 glitch-captured library E0s stayed
#: captured, at 0.35 47; at 0.5 noise of 0.01 step moved SrCO3's E0).
RISE_FRACTION = 0.35
#: ... or mu across that end point still rises by this fraction of the interval's rise: an
#: edge sampled by one point before a gap of eV keeps its rise (SrCO3's: 0.52), a glitch's
#: neighbours lie level
PERSIST = 0.4
#: eV: a scan whose finest points (5th percentile of its intervals) lie further apart keeps
#: every maximum (as before the test): there a sharp feature is one point high, as a glitch
#: is, and falls without it (Cr(VI)'s pre-edge peak on 1.5-2 eV steps was passed over for the
#: main edge 15 eV up; at 1 eV it held). A scan fine across its edge but coarse in its
#: pre-edge or EXAFS is judged everywhere (the library's glitch cases held as they were).
COARSE = 1.25
#: a metal foil's tabulated edge is its first inflection, and Ni's and Fe's second derivative
#: peak, 8-13 eV above, is 0.84-0.91 of the first: with noise of 1 % of the step it was the
#: highest in 13-28 % of scans. The foil's E0 is the lowest maximum at least this fraction of
#: the highest (Co's, Cu's and V's next maxima are 0.71, 0.53 and 0.49 of theirs, all above)...
FOIL_LOWEST = 0.6
#: ... that is a peak of its own: between it and the highest the derivative falls under this
#: fraction of it (Ni's and Fe's: under 0.5; the ripples of the library's broad, noisy Cd K
#: foils, 3-4 eV apart: 0.88)
FOIL_DIP = 0.65
#: eV: ... and stays one on the derivative smoothed this much more (a Gaussian): the two climb
#: to different maxima there, the lower at least :data:`FOIL_LOWEST` of the higher, the
#: derivative dipping under :data:`FOIL_WIDE_DIP` of it between. Noise ripples on a broad
#: rising flank pass the two tests above (a Pb L3 foil with noise of 2 % of the step: 65 of
#: 100 scans off by over 3 eV; with 1.0 eV here 5, with 1.5 none) and vanish there; Ni's and
#: Fe's first inflection, 8-13 eV below the second, stays
FOIL_WIDE = 1.5
#: the smoothing fills the dip: the clean library Ni references' (0.43-0.53) to 0.61-0.78
FOIL_WIDE_DIP = 0.9

#: where E0 is looked for in the data points: row r's (energies, mu), both increasing in energy
Points = Callable[[int], tuple[np.ndarray, np.ndarray]]


def on_grid(
    grid: np.ndarray,
    energy: np.ndarray,
    mu: np.ndarray,
    shifts: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of ``mu`` (n, m) linearly interpolated onto ``grid`` (``np.interp`` per row).

    Row i lies on ``energy + shifts[i]`` (``energy`` strictly increasing), as the spectrum
    alone would (its axis is that sum), so each row's values do not depend on the others.
    ``keep`` (n, m): the points each row is interpolated through (None: all).
    """
    mu = np.atleast_2d(mu)
    out = np.empty((mu.shape[0], grid.size))
    for i in range(mu.shape[0]):
        axis = energy if shifts is None else energy + shifts[i]
        if keep is None or keep[i].all():
            out[i] = np.interp(grid, axis, mu[i])
        else:
            out[i] = np.interp(grid, axis[keep[i]], mu[i][keep[i]])
    return out


def smoothed_derivative(m: np.ndarray) -> np.ndarray:
    """d mu / dE of rows on the 0.1 eV grid, smoothed by the 0.5 eV Gaussian (per row)."""
    m = m if m.ndim == 2 else np.atleast_2d(m)
    return correlate1d(m, _DERIVATIVE, axis=1, mode="nearest")


def _plateau(row: np.ndarray, i: int, top: float) -> tuple[int, int]:
    """The run of points around ``i`` within :data:`TIE` of the maximum ``top``."""
    floor = top - TIE * top
    a = b = i
    while a > 0 and row[a - 1] >= floor:
        a -= 1
    while b < row.size - 1 and row[b + 1] >= floor:
        b += 1
    return a, b


def _slope_at(energy: np.ndarray, mu: np.ndarray, at: float) -> float:
    """The smoothed derivative at ``at`` eV of the points (``energy``, ``mu``), as
    :func:`smoothed_derivative` takes it on the 0.1 eV grid through ``at``."""
    return float(_DERIVATIVE @ np.interp(at + _TAPS, energy, mu))


def rises_at(energy: np.ndarray, mu: np.ndarray, at: float) -> bool:
    """Whether the data rise at ``at`` eV through more than one point: an edge, not a glitch.

    Each end point of the steepest data interval within :data:`RISE_REACH` of ``at`` must
    hold: without it, the smoothed derivative at ``at`` (:func:`smoothed_derivative`) keeps
    at least :data:`RISE_FRACTION` of its value, or mu across it (from the point before to
    the point after) still rises by :data:`PERSIST` of the interval's rise (points eV apart,
    an edge sampled by one point). A point raised (or a dip lowered) by a fraction of the
    edge step makes the steepest interval of its flank, and without it the data there are the
    background, its neighbours level; an edge spans several points, and noise moves the
    derivative, which averages points over eV, by a fraction of one point's worth. The data's
    first and last points are not judged, nor is any rise of a coarse scan (:data:`COARSE`).
    """
    size = energy.size
    half = (_DERIVATIVE.size // 2) * E0_STEP  # the derivative at ``at`` sees at +- half
    a, b = np.searchsorted(energy, (at - half, at + half)).tolist()
    lo, hi = max(a - 2, 0), min(b + 2, size)
    e, m = energy[lo:hi], mu[lo:hi]  # the points that move it, and one more either side
    base = _slope_at(e, m, at)
    if not base > 0 or e.size < 3:
        return base > 0
    # Without point j mu changes by at most its distance from its neighbours' line (its
    # value against the next point's at the data's ends), the derivative by that times the
    # kernel's absolute sum: when no point can pull the derivative below the fraction, it
    # holds (the test below would pass; the margin covers rounding), without the test.
    left, mid, right = e[:-2], e[1:-1], e[2:]
    line = (m[:-2] * (right - mid) + m[2:] * (mid - left)) / (right - left)
    pull = float(np.abs(m[1:-1] - line).max())
    if lo == 0:
        pull = max(pull, abs(float(m[0] - m[1])))
    if hi == size:
        pull = max(pull, abs(float(m[-1] - m[-2])))
    if _PULL * pull < 0.9 * (1.0 - RISE_FRACTION) * base:
        return True
    slopes = np.diff(m) / np.diff(e)
    near = np.flatnonzero((e[1:] > at - RISE_REACH) & (e[:-1] < at + RISE_REACH))
    if near.size == 0:
        return True
    k = int(near[np.argmax(slopes[near])])  # the steepest interval near ``at``: k, k + 1
    if float(np.percentile(np.diff(energy), 5)) > COARSE:
        return True  # a coarse scan: any rise stands on one point or two
    rise = float(m[k + 1] - m[k])
    for j in (k, k + 1):
        keep = np.arange(e.size) != j
        if _slope_at(e[keep], m[keep], at) >= RISE_FRACTION * base:
            continue
        # points far apart (an edge sampled by one point): the derivative falls without
        # either, but mu across the point still rises by a part of the interval's rise
        if 0 < lo + j < size - 1 and not float(m[j + 1] - m[j - 1]) >= PERSIST * rise:
            return False
    return True


def _maxima(row: np.ndarray) -> list[int]:
    """Indices of ``row``'s positive local maxima (a flat top: its first point), highest first."""
    inner = row[1:-1]
    up = (inner > row[:-2]) & (inner >= row[2:]) & (inner > 0)
    at = np.flatnonzero(up) + 1
    if row.size > 1:  # the ends, when they are the highest point there
        ends = [i for i, j in ((0, 1), (row.size - 1, row.size - 2)) if row[i] > row[j]]
        at = np.concatenate([at, [i for i in ends if row[i] > 0]]).astype(int)
    return at[np.argsort(-row[at], kind="stable")].tolist()


def _edge_maximum(row: np.ndarray, grid: np.ndarray, points: tuple[np.ndarray, np.ndarray]) -> int:
    """The highest maximum of ``row`` whose rise the data hold (:func:`rises_at`); -1: none."""
    for i in _maxima(row):
        if rises_at(points[0], points[1], float(grid[i])):
            return i
    return -1


def _climb(row: np.ndarray, k: int) -> int:
    """The local maximum of ``row`` that ``k`` climbs to, one uphill neighbour at a time."""
    while True:
        if k + 1 < row.size and row[k + 1] > row[k]:
            k += 1
        elif k > 0 and row[k - 1] > row[k]:
            k -= 1
        else:
            return k


def _wide_peak(row: np.ndarray, c: int, i: int) -> bool:
    """Whether the maximum ``c`` below ``i`` stays a strong peak of its own on ``row`` smoothed
    by :data:`FOIL_WIDE` more: the two climb to different maxima there, the lower at least
    :data:`FOIL_LOWEST` of the higher, with a dip under :data:`FOIL_WIDE_DIP` of the lower
    between (a noise ripple on a flank climbs to ``i``'s, or stays a low bump).
    """
    finite = np.flatnonzero(np.isfinite(row))
    a, b = int(finite[0]), int(finite[-1]) + 1  # the window's margins are -inf
    wide = gaussian_filter1d(row[a:b], FOIL_WIDE / E0_STEP, mode="nearest")
    c2, i2 = _climb(wide, c - a), _climb(wide, i - a)
    if c2 >= i2 or float(wide[c2]) < FOIL_LOWEST * float(wide[i2]):
        return False
    return float(wide[c2:i2].min()) < FOIL_WIDE_DIP * float(wide[c2])


def _lowest_maximum(
    row: np.ndarray,
    grid: np.ndarray,
    i: int,
    points: tuple[np.ndarray, np.ndarray] | None,
    border: tuple[int, ...],
) -> int:
    """The maximum of ``row`` lowest in energy below ``i`` that is at least
    :data:`FOIL_LOWEST` of row[i], a peak of its own (the derivative falls under
    :data:`FOIL_DIP` of it before ``i``, also smoothed wider: :data:`FOIL_WIDE`) and held by
    the data ``points`` (None: any); ``i`` (the steepest) when there is none."""
    floor = FOIL_LOWEST * float(row[i])
    for c in sorted(c for c in _maxima(row) if c < i and row[c] >= floor and c not in border):
        if float(row[c:i].min()) >= FOIL_DIP * float(row[c]) or not _wide_peak(row, c, i):
            continue  # a ripple on the rise to ``i``, not a rise of its own
        if points is None or rises_at(points[0], points[1], float(grid[c])):
            return c
    return i


def e0_rows(grid: np.ndarray, m: np.ndarray) -> np.ndarray:
    """E0 of each row of ``m`` (n, grid.size), values on ``grid``; NaN where mu never rises
    or rises most at the window's upper border (:func:`e0_rows_why`, with no data points: every
    maximum stands)."""
    return e0_rows_why(grid, m)[0]


def e0_rows_why(
    grid: np.ndarray,
    m: np.ndarray,
    low_border: bool = False,
    points: Points | None = None,
    strict: bool = False,
    foil: bool = False,
    screen: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """E0 of each row of ``m`` (n, grid.size), values on ``grid``, and per row why there is
    none (NaN): :data:`NEVER_RISES`, or :data:`AT_BORDER` where the steepest rise is at the
    window's last point it may be (``low_border``: or its first), so the edge itself lies
    beyond: a scan that ends on the edge, an edge above E0 + search (``low_border``, for a
    window cut at E0 - search: below it). The first point of the data is no such border: a
    calculation may start on its edge (a measured scan needs a pre-edge anyway).

    The maximum of the smoothed derivative, refined by a parabola through its neighbours, or
    the centre of a flat top (:data:`TIE`). Windows of 3.3 eV and less keep their ends, which
    the kernel extends with the end values, and have no border check. ``points(r)``: row r's
    data points (energies, mu): a maximum whose rise they do not hold (:func:`rises_at`, a
    one-point glitch's flank) is passed over for the next highest; where none holds, the
    highest is kept, or (``strict``, a reference foil) the row has none: :data:`ONE_POINT`.
    ``foil`` (a metal foil, whose tabulated edge is its first inflection): a maximum below the
    one found, at least :data:`FOIL_LOWEST` of it and a peak of its own, the lowest such.
    ``screen``: rows that pass the test / hold no lower maximum (``e0_batch.page_screen``).
    """
    d = smoothed_derivative(m)
    size = grid.size
    border: tuple[int, ...] = ()
    if size > 2 * _MARGIN + 3:
        d[:, :_MARGIN] = -np.inf
        d[:, -_MARGIN:] = -np.inf
        border = (_MARGIN, size - 1 - _MARGIN) if low_border else (size - 1 - _MARGIN,)
    out = np.full(d.shape[0], np.nan)
    why: list[str | None] = [None] * d.shape[0]
    peak = d.argmax(axis=1)  # without a screen: every row tested, every foil row searched
    sure, lower = screen(d, peak, border) if screen else (peak < 0, peak >= 0)
    for r, i in enumerate(peak.tolist()):
        row = d[r]
        top = float(row[i])
        if not (math.isfinite(top) and top > 0):
            why[r] = NEVER_RISES
            continue
        if points is not None and not sure[r]:
            data = points(r)
            if not rises_at(data[0], data[1], float(grid[i])):  # else: the maximum, as ever
                edge = _edge_maximum(row, grid, data)
                if edge < 0 and strict:
                    why[r] = ONE_POINT
                    continue
                if edge >= 0:
                    i, top = edge, float(row[edge])
        if i in border:
            why[r] = AT_BORDER
            continue
        if foil and (lower[r] or i != peak[r]):
            i = _lowest_maximum(row, grid, i, None if points is None else points(r), border)
            top = float(row[i])
        out[r] = float(grid[i])
        first, last = _plateau(row, i, top)
        if last > first:  # a flat top (linear mu between points far apart): its centre
            out[r] = 0.5 * (float(grid[first]) + float(grid[last]))
        elif 0 < i < size - 1:  # a parabola through the maximum and its neighbours
            a, c = float(row[i - 1]), float(row[i + 1])
            denom = a - 2 * top + c
            if math.isfinite(a) and math.isfinite(c) and denom != 0:
                shift = min(max(0.5 * (a - c) / denom, -0.5), 0.5)
                out[r] = float(grid[i] + shift * E0_STEP)
    return out, why


NEVER_RISES = "mu never rises: no absorption edge found"
AT_BORDER = (
    "mu rises most at the border of the range E0 is looked for in: the edge lies beyond it "
    "(the scan starts above the edge or ends on it, or the energy calibration is off by more "
    "than the search range)"
)


ONE_POINT = (
    "mu rises steeply only across single points (glitches), never through an edge sampled by "
    "more than one: no absorption edge found"
)


def e0_in_window(
    energy: np.ndarray,
    mu: np.ndarray,
    lo: float,
    hi: float,
    element: str | None,
    edge: str,
    tab: float | None = None,
    strict: bool = False,
    foil: bool = False,
) -> float:
    """:func:`find_e0`'s search between ``lo`` and ``hi`` eV on one spectrum's own axis
    (``tab``: the tabulated edge the window was cut around, named in the error; ``strict``,
    ``foil``: as :func:`e0_rows_why`)."""
    error = window_error(energy, lo, hi, element, edge, tab)
    if error is not None:
        raise error
    grid = np.arange(lo, hi, E0_STEP)
    row = np.interp(grid, energy, mu)[None, :]  # on_grid of the one row
    found, why = e0_rows_why(grid, row, lo > energy[0], lambda _: (energy, mu), strict, foil)
    if why[0] is not None:
        raise SpectrumError("no_edge", why[0])
    return float(found[0])


def find_e0(
    spectrum: Spectrum,
    search: float = 40.0,
    bulk: slice | None = None,
    strict: bool = False,
    foil: bool = False,
) -> float:
    """E0 as the steepest point of the smoothed edge, refined to sub-grid precision.

    The spectrum is put on a uniform 0.1 eV grid and smoothed (sigma 0.5 eV) so that
    irregular FEFF grids and measured noise give the same answer. With a known element the
    search is restricted to the tabulated edge +-``search`` eV. Stray points and lone
    spikes are left out (:func:`scan_points`; ``bulk``: the scan's bulk when known), and a
    steepest rise that stands on one point (a glitch's flank, :func:`rises_at`) gives way to
    the next; ``strict`` (a reference foil): SpectrumError ``no_edge`` when every one does.
    ``foil`` (a metal foil): its first strong rise, not always the steepest
    (:data:`FOIL_LOWEST`).
    """
    energy, mu = spectrum.energy, spectrum.mu
    bulk, keep = scan_points(energy, mu[None, :], bulk)
    energy, mu = energy[bulk], mu[bulk]
    if keep is not None:
        energy, mu = energy[keep[0]], mu[keep[0]]
    lo, hi, tab = search_window(energy, spectrum.element, spectrum.edge, search)
    return e0_in_window(energy, mu, lo, hi, spectrum.element, spectrum.edge, tab, strict, foil)
