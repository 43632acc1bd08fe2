"""Absurd values in the pre- and post-edge ranges, found before the background and the edge
step are fitted: one glitch (a value of 1e6, a dropout) at the ordinary energy spacing
otherwise enters the least-squares fits and sets the step alone (Cu foil's 2.77 became 6050).

Each range gets a resistant line, through the medians (x and y) of its first and its last
half, which a few absurd points cannot move. The post-edge range is measured above the
pre-edge's resistant line (a calculation's: above zero), and the mean of its halves'
medians is a robust edge step ``J``. A point is absurd where its residual from its range's
line exceeds both :data:`OUTLIER_STEPS` (pre-edge: :data:`OUTLIER_STEPS_PRE`) times ``|J|``
and :data:`OUTLIER_MADS` times the range's median absolute residual: far from the
spectrum's own scale, and far outside the range's noise and shape (a weak, noisy edge keeps
its noise). No point of the 270 scans of the shared XAS Data Library nor of the 4,831
shared Cu FEFF spectra is absurd by this rule (largest residuals: pre-edge 0.05 ``|J|``,
post-edge 1.17 on a weak Fe edge, else 0.57), so their results do not change. Ranges of
fewer than :data:`MIN_SCREENED` points are not screened.

:func:`absurd_points` screens one spectrum; :func:`absurd_rows` the rows of a batch, each
on its own ranges, with the same arithmetic (the same points go). :func:`lone_spikes` finds,
for the E0 search, single points further from their neighbours than the rest of the scan
spans.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MAX_SPIKES",
    "MIN_SCREENED",
    "OUTLIER_MADS",
    "OUTLIER_STEPS",
    "OUTLIER_STEPS_PRE",
    "absurd_points",
    "absurd_rows",
    "lone_spikes",
    "range_medians",
]

#: A residual this many robust edge steps from its range's resistant line may be absurd:
#: in the post-edge range, which holds the oscillations and the white line's tail ...
OUTLIER_STEPS = 3.0
#: ... and in the pre-edge range, a smooth background whose few points each move the step
#: far more (one -5 among Cu foil's ten moved it 25 %) ...
OUTLIER_STEPS_PRE = 0.5
#: ... and this many median absolute residuals of its range (noise and shape).
OUTLIER_MADS = 10.0
#: Ranges with fewer points are not screened (each half's median needs 3 to resist one).
MIN_SCREENED = 6


#: ``ndarray.max``/``min``: the same ufunc reductions (the same values, NaN included) without
#: their Python wrappers; :func:`absurd_points` takes several per spectrum.
_max, _min = np.maximum.reduce, np.minimum.reduce


def _median(v: np.ndarray) -> float:
    """The median of ``v`` as ``np.median`` gives it (at a fifth of its cost)."""
    s = v.copy()  # np.sort(v), without its wrapper
    s.sort()
    n = s.size
    return 0.5 * (s.item((n - 1) // 2) + s.item(n // 2))


def _x_halves(x: np.ndarray) -> tuple[int, float, float]:
    """(h, xa, xb): the size of the first and the last half of ``x`` (ascending) and the
    median x of each (:func:`_halves` of one row)."""
    n = x.size
    h = n // 2
    i, j = (h - 1) // 2, h // 2
    return h, 0.5 * (x.item(i) + x.item(j)), 0.5 * (x.item(n - h + i) + x.item(n - h + j))


def _resistant(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(ya, slope, xa, level): the line ``ya + slope (x - xa)`` through the medians of the
    first and the last half of (x, y) (x ascending), and its mean level ``(ya + yb) / 2``."""
    h, xa, xb = _x_halves(x)
    ya, yb = _median(y[:h]), _median(y[y.size - h :])
    return ya, (yb - ya) / (xb - xa), xa, 0.5 * (ya + yb)


def _reach(x: np.ndarray) -> float:
    """A bound on |residual| / (max y - min y) for :func:`_resistant`'s line of any y on
    ``x``: the halves' medians lie within the values, and the line reaches the ends of the
    range from the first one at a slope of at most their span over ``xb - xa``."""
    _, xa, xb = _x_halves(x)
    return 1.0 + max(xa - x.item(0), x.item(x.size - 1) - xa) / (xb - xa)


#: The bounds decide only with this much room (rounding of the residuals).
_ROOM = 1.0 - 1e-9


def _keep(r: np.ndarray, floor: float) -> np.ndarray | None:
    """Which residuals ``r`` are not absurd (None: all), ``floor``: their range's
    ``OUTLIER_STEPS`` times ``|J|``."""
    dev = np.abs(r)
    if not _max(dev) > floor:  # nothing beyond the floor: no median needed
        return None
    keep = dev <= max(OUTLIER_MADS * _median(dev), floor)
    return None if keep.all() else keep


def absurd_points(
    rel: np.ndarray, mu: np.ndarray, pre: tuple[int, int] | None, post: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Which points of the pre-edge range ``mu[q1:q2]`` (``pre``; None for a calculation)
    and of the post-edge range ``mu[p1:p2]`` (``post``) the fits keep: boolean masks over
    each range, or None where every point is kept.

    Usually decided without the post-edge medians: where the post-edge values above the
    pre-edge line are all positive, ``J`` is at least their minimum, and the spans of the
    values (:func:`_reach`) bound every residual below the floors.
    """
    p1, p2 = post
    xp, z = rel[p1:p2], mu[p1:p2]
    if z.size < MIN_SCREENED:
        return None, None
    line = None
    if pre is not None:
        xq, yq = rel[pre[0] : pre[1]], mu[pre[0] : pre[1]]
        if yq.size >= MIN_SCREENED:
            line = _resistant(xq, yq)
            z = z - (line[0] + line[1] * (xp - line[2]))
        else:
            z = z - _median(yq)
    low = _min(z)
    post_safe = low > 0 and (_max(z) - low) * _reach(xp) <= _ROOM * OUTLIER_STEPS * low
    if post_safe and (
        line is None or (_max(yq) - _min(yq)) * _reach(xq) <= _ROOM * OUTLIER_STEPS_PRE * low
    ):
        return None, None
    ya, slope, xa, level = _resistant(xp, z)
    keep_pre = None
    if line is not None:
        r_pre = yq - (line[0] + line[1] * (xq - line[2]))
        keep_pre = _keep(r_pre, OUTLIER_STEPS_PRE * abs(level))
    return keep_pre, _keep(z - (ya + slope * (xp - xa)), OUTLIER_STEPS * abs(level))


def _row_reduce(
    block: np.ndarray, lo: np.ndarray, hi: np.ndarray, ufunc: np.ufunc, fill: float
) -> np.ndarray:
    """``ufunc.reduce`` (np.minimum, np.maximum) of each row's ``block[i, lo[i]:hi[i]]``:
    the columns all rows hold at once, the few at the ends each row masked (``fill``)."""
    a, b = int(lo.max()), int(hi.min())
    if b <= a:  # ranges that do not overlap: all masked
        a = b = int(lo.min())
    out = ufunc.reduce(block[:, a:b], axis=1) if b > a else np.full(block.shape[0], fill)
    for c0, c1 in ((int(lo.min()), a), (b, int(hi.max()))):
        if c1 > c0:
            cols = np.arange(c0, c1)
            inside = (cols >= lo[:, None]) & (cols < hi[:, None])
            out = ufunc(out, ufunc.reduce(np.where(inside, block[:, c0:c1], fill), axis=1))
    return out


def range_medians(block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row i, the median of ``block[i, lo[i]:hi[i]]`` (each range non-empty), as
    :func:`_median`: the columns ``min(lo)..max(hi)`` sorted, those outside a row's range
    as +inf (past its values; only the few columns at the ends that some row leaves out)."""
    a, b = int(lo.min()), int(hi.max())
    s = block[:, a:b].copy()
    left, right = int(lo.max()) - a, int(hi.min()) - a
    cols = np.arange(b - a)
    if left > 0:
        s[:, :left][cols[:left] < (lo - a)[:, None]] = np.inf
    if right < b - a:
        s[:, right:][cols[right:] >= (hi - a)[:, None]] = np.inf
    s.sort(axis=1)
    n = hi - lo
    rows = np.arange(block.shape[0])
    return 0.5 * (s[rows, (n - 1) // 2] + s[rows, n // 2])


def _halves(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: (h, xa, xb), the halves' size and the median x of each (x ascending)."""
    rows = np.arange(x.shape[0])
    h = (hi - lo) // 2
    i, j = (h - 1) // 2, h // 2
    xa = 0.5 * (x[rows, lo + i] + x[rows, lo + j])
    xb = 0.5 * (x[rows, hi - h + i] + x[rows, hi - h + j])
    return h, xa, xb


def _resistant_rows(
    x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_resistant` of each row's ``[lo, hi)`` of the blocks ``x`` and ``y``."""
    h, xa, xb = _halves(x, lo, hi)
    ya, yb = range_medians(y, lo, lo + h), range_medians(y, hi - h, hi)
    return ya, (yb - ya) / (xb - xa), xa, 0.5 * (ya + yb)


def _reach_rows(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """:func:`_reach` of each row's ``[lo, hi)`` of the block ``x``."""
    rows = np.arange(x.shape[0])
    _, xa, xb = _halves(x, lo, hi)
    return 1.0 + np.maximum(xa - x[rows, lo], x[rows, hi - 1] - xa) / (xb - xa)


def _minus_line(
    y: np.ndarray, x: np.ndarray, base: np.ndarray, slope: np.ndarray, xa: np.ndarray
) -> np.ndarray:
    """``y - (base + slope (x - xa))`` per row (the last three (k,)), as :func:`absurd_points`
    computes it, in one new array."""
    out = np.subtract(x, xa[:, None])
    out *= slope[:, None]
    out += base[:, None]
    return np.subtract(y, out, out=out)


def _keep_rows(
    dev: np.ndarray, lo: np.ndarray, hi: np.ndarray, floor: np.ndarray, screened: np.ndarray
) -> np.ndarray | None:
    """:func:`_keep` of each screened row's ``[lo, hi)`` of the block of absolute residuals
    ``dev``: a mask over the block (True outside the ranges and in rows not screened), or
    None: all kept. Rows none of whose block reaches ``floor`` are done at one ``max``."""
    near = np.flatnonzero(screened & (dev.max(axis=1) > floor))
    if not near.size:
        return None
    cols = np.arange(dev.shape[1])
    inside = (cols >= lo[near, None]) & (cols < hi[near, None])
    d = np.where(inside, dev[near], 0.0)
    over = d.max(axis=1) > floor[near]
    if not over.any():
        return None
    g, d = near[over], d[over]
    bound = np.maximum(OUTLIER_MADS * range_medians(d, lo[g], hi[g]), floor[g])
    drop = np.zeros(dev.shape, dtype=bool)
    drop[g] = d > bound[:, None]
    return None if not drop.any() else ~drop


def absurd_rows(
    rel: np.ndarray,
    mu: np.ndarray,
    pre: tuple[np.ndarray, np.ndarray] | None,
    measured: np.ndarray,
    post: tuple[np.ndarray, np.ndarray],
) -> tuple[tuple[slice, np.ndarray] | None, tuple[slice, np.ndarray] | None]:
    """:func:`absurd_points` of every row of ``rel``/``mu`` (k, m): pre-edge ranges
    ``[q1, q2)`` of the rows ``measured`` (``pre`` holds their q1 and q2 in order; the other
    rows are calculations), post-edge ranges ``[p1, p2)`` of all.

    Returns per range None (every point kept) or (the columns it spans, a mask over them
    for those rows: False where a point is absurd); the pre-edge mask has the measured rows.
    The medians are taken only in the rows the bounds do not decide.
    """
    k = mu.shape[0]
    p1, p2 = post
    pa, pb = int(p1.min()), int(p2.max())
    lo, hi = p1 - pa, p2 - pa
    screened = hi - lo >= MIN_SCREENED
    if not screened.any():
        return None, None
    lo, hi = np.where(screened, lo, 0), np.where(screened, hi, 2)  # others: a dummy range
    xp, z = rel[:, pa:pb], mu[:, pa:pb]
    wide = np.zeros(k, dtype=bool)  # measured rows with a screened pre-edge range
    if pre is not None and measured.any():
        meas = np.flatnonzero(measured)
        qa, qb = int(pre[0].min()), int(pre[1].max())
        qlo, qhi = np.zeros(k, dtype=int), np.full(k, 2)
        qlo[meas], qhi[meas] = pre[0] - qa, pre[1] - qa
        wide[meas] = qhi[meas] - qlo[meas] >= MIN_SCREENED
        xq, yq = rel[:, qa:qb], mu[:, qa:qb]
        base, slope, xa = np.zeros(k), np.zeros(k), np.zeros(k)
        w, nw = np.flatnonzero(wide), meas[~wide[meas]]
        if w.size:
            base[w], slope[w], xa[w], _ = _resistant_rows(xq[w], yq[w], qlo[w], qhi[w])
        if nw.size:
            base[nw] = range_medians(yq[nw], qlo[nw], qhi[nw])
        z = _minus_line(z, xp, base, slope, xa)  # a calculation's: 0 + 0 (x - 0) = 0
    low = _row_reduce(z, lo, hi, np.minimum, np.inf)
    span = _row_reduce(z, lo, hi, np.maximum, -np.inf) - low
    safe = (low > 0) & (span * _reach_rows(xp, lo, hi) <= _ROOM * OUTLIER_STEPS * low)
    w = np.flatnonzero(wide & safe)
    if w.size:
        spread = _row_reduce(yq[w], qlo[w], qhi[w], np.maximum, -np.inf)
        spread -= _row_reduce(yq[w], qlo[w], qhi[w], np.minimum, np.inf)
        bound = spread * _reach_rows(xq[w], qlo[w], qhi[w])
        safe[w] = bound <= _ROOM * OUTLIER_STEPS_PRE * low[w]
    g = np.flatnonzero(screened & ~safe)
    if not g.size:
        return None, None
    ya, slope_p, xa_p, level = _resistant_rows(xp[g], z[g], lo[g], hi[g])
    dev = np.abs(_minus_line(z[g], xp[g], ya, slope_p, xa_p))
    some = _keep_rows(dev, lo[g], hi[g], OUTLIER_STEPS * np.abs(level), np.ones(g.size, bool))
    keep_post = None
    if some is not None:
        keep_post = np.ones((k, pb - pa), dtype=bool)
        keep_post[g] = some
    keep_pre = None
    gw = np.flatnonzero(wide[g])
    if gw.size:
        rows = g[gw]
        r = _minus_line(yq[rows], xq[rows], base[rows], slope[rows], xa[rows])
        floor = OUTLIER_STEPS_PRE * np.abs(level[gw])
        some = _keep_rows(np.abs(r), qlo[rows], qhi[rows], floor, np.ones(gw.size, bool))
        if some is not None:
            mask = np.ones((k, qb - qa), dtype=bool)
            mask[rows] = some
            keep_pre = (slice(qa, qb), mask[measured])
    return keep_pre, (None if keep_post is None else (slice(pa, pb), keep_post))


#: At most this many lone spikes are set apart from a scan (rounds of :func:`lone_spikes`).
MAX_SPIKES = 3


def lone_spikes(mu: np.ndarray) -> np.ndarray | None:
    """Which points of each row of ``mu`` (n, m) the E0 search keeps: False at a lone spike,
    an inner point further from both its neighbours (above both, or below both) than the
    rest of the row spans. None: no row has one.

    The rest leaves out the points lying out at least half as far as the farthest one (so
    two spikes do not hide each other); after a spike goes, the next round looks again (a
    dropout beside a 1e6), :data:`MAX_SPIKES` rounds. A spike is to mu what
    :func:`~xasflow.spectra.norm.stray_ends` finds in energy: a point apart from the scan
    by more than the scan's extent, whose steep flanks passed for the edge (a 1e6 at E0-30
    eV set Cu foil's E0 there). An end point has one neighbour: its step cannot be told
    from a scan starting or ending on the edge, and is kept. No scan of the shared XAS Data
    Library nor any shared Cu FEFF spectrum has a lone spike (largest: a white line on one
    point, 0.50 of the rest's span, in SrCO3 at 12 K; FEFF 0.09).
    """
    n, m = mu.shape
    if m < 5:
        return None
    # a spike lies further from its neighbours than the ends lie apart, and no point
    # further from a neighbour than the longest step: most rows are decided here
    if n == 1:  # one spectrum: the same test on Python floats
        v = mu[0]
        doubt = [0] if _max(np.abs(v[1:] - v[:-1])) > abs(mu.item(-1) - mu.item(0)) else []
    else:
        step = np.subtract(mu[:, 1:], mu[:, :-1])
        longest = np.abs(step, out=step).max(axis=1)
        doubt = np.flatnonzero(longest > np.abs(mu[:, -1] - mu[:, 0])).tolist()
    keep = None
    for r in doubt:
        row = _spikes_1d(mu[r])
        if row is not None:
            keep = np.ones((n, m), dtype=bool) if keep is None else keep
            keep[r] = row
    return keep


def _spikes_1d(v: np.ndarray) -> np.ndarray | None:
    """:func:`lone_spikes` of one row ``v`` (None: it has none)."""
    keep = np.ones(v.size, dtype=bool)
    at, w = np.arange(v.size), v  # the kept points (all, until one goes)
    for _ in range(MAX_SPIKES):
        d = w[1:] - w[:-1]
        away = np.maximum(np.minimum(d[:-1], -d[1:]), np.minimum(-d[:-1], d[1:]))
        top = _max(away)
        if not top > 0 or top <= abs(w.item(-1) - w.item(0)):
            break  # the ends are in the rest: no point lies out further than they span
        out = away >= 0.5 * top  # left out of the span: the spikes, and points near as far
        rest = np.ones(w.size, dtype=bool)
        rest[1:-1] = ~out
        spike = out & (away > w[rest].max() - w[rest].min())
        if not spike.any():
            break
        keep[at[1:-1][spike]] = False
        at = np.flatnonzero(keep)
        w = v[at]
    return None if keep.all() else keep
