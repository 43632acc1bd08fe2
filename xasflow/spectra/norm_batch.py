"""Larch-convention normalisation of many rows at once (the rows of a shared-axis batch).

The same science as :func:`~xasflow.spectra.process.normalize` with ``method="larch"`` and
``normalization="edge_step"`` (:func:`~xasflow.spectra.norm.edge_fit` and its checks), for
n rows on one axis shifted per row (alignment) whose ranges and indices differ with their
E0 and shift: every index is one ``searchsorted`` on the shared axis checked against the
row itself; the pre-edge lines are masked sums over the few columns any row uses; the
post-edge power sums are prefix sums and matrix products on one shared coordinate, and the
small normal equations are solved as one stack; rows that leave absurd values out
(:func:`~xasflow.spectra.outliers.absurd_rows`, the points ``edge_fit`` leaves out) have
their post-edge sums made anew. The results equal the per-row function's to
rounding (``tests/test_norm_batch.py``). Rows it cannot reproduce (a user-set post-edge
range below the data's second point) are handed back to the per-row function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xasflow.spectra.core import SpectrumError
from xasflow.spectra.glitches import spike_rows
from xasflow.spectra.norm import stray_ends
from xasflow.spectra.outliers import absurd_rows
from xasflow.spectra.process import PrepParams, undetermined_step
from xasflow.spectra.scan_start import measured_start_why

__all__ = ["normalize_larch_batch"]

Pick = slice | np.ndarray  # all rows (a view) or some (a copy)


def _pick(mask: np.ndarray) -> Pick:
    return slice(None) if mask.all() else np.flatnonzero(mask)


def _below(value: np.ndarray) -> np.ndarray:
    """The float just below ``value``: ``x < value`` is ``x <= _below(value)``."""
    return np.nextafter(value, -np.inf)


def _count_le(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``counts[i, q]``: how many of ``rows[i]`` (sorted) are ``<= values[i, q]``.

    The rows are one axis shifted (up to rounding): one ``searchsorted`` on row 0, then each
    count is checked against its own row's neighbours and recounted there if rounding moved it.
    """
    k, m = rows.shape
    off = rows[:, :1] - rows[0, 0]
    c = np.searchsorted(rows[0], (values - off).ravel(), side="right").reshape(values.shape)
    r = np.arange(k)[:, None]
    good = (c == 0) | (rows[r, np.maximum(c - 1, 0)] <= values)
    good &= (c == m) | (rows[r, np.minimum(c, m - 1)] > values)
    if not good.all():
        i, q = np.nonzero(~good)
        c[i, q] = np.count_nonzero(rows[i] <= values[i, q][:, None], axis=1)
    return c


def _nearest(rel: np.ndarray, value: np.ndarray, below: np.ndarray) -> np.ndarray:
    """``norm._index_nearest`` per row, from ``below`` = how many points lie below ``value``."""
    m = rel.shape[1]
    ic = np.minimum(np.maximum(below, 1), m - 1)  # (np.clip costs more per call)
    rows = np.arange(rel.shape[0])
    near = np.where(rel[rows, ic] - value < value - rel[rows, ic - 1], ic, ic - 1)
    return np.where(below <= 0, 0, np.where(below >= m, m - 1, near))


def _columns(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, np.ndarray]:
    """(the columns ``min(lo)..max(hi)``, each row's ``[lo, hi)`` on them as 0/1)."""
    a, b = int(lo.min()), int(hi.max())
    cols = np.arange(a, b)
    return slice(a, b), ((cols >= lo[:, None]) & (cols < hi[:, None])).astype(np.float64)


def _vander(u: np.ndarray, n: int) -> np.ndarray:
    """``u**0 .. u**(n-1)`` as columns (``np.vander``'s accumulate runs row by row, slowly)."""
    out = np.empty((u.size, n))
    out[:, 0] = 1.0
    for j in range(1, n):
        np.multiply(out[:, j - 1], u, out=out[:, j])
    return out


def _range_sums(
    block: np.ndarray, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """``block[i, lo[i]:hi[i]] @ weights[lo[i]:hi[i]]`` for every row: one product over all
    the columns, less the few at each end that a row does not use (no full-size mask)."""
    out = block @ weights
    left = int(lo.max())
    if left > 0:
        out -= (block[:, :left] * (np.arange(left) < lo[:, None])) @ weights[:left]
    right = int(hi.min())
    if right < block.shape[1]:
        outside = np.arange(right, block.shape[1]) >= hi[:, None]
        out -= (block[:, right:] * outside) @ weights[right:]
    return out


def _rowsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _ranges(
    rel: np.ndarray, params: PrepParams, top: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``norm.default_ranges`` per row, whose data (no strays) end at ``top``: (norm1, norm2,
    nnorm)."""
    k = rel.shape[0]
    norm2 = 5.0 * np.round(top / 5.0) if params.norm2 is None else np.full(k, params.norm2)
    norm2 = np.minimum(np.where(norm2 < 0, top - norm2, norm2), top)
    if params.norm1 is None:
        norm1 = np.minimum(25.0, 5.0 * np.round(norm2 / 15.0))
    else:
        norm1 = np.full(k, float(params.norm1))
    norm1, norm2 = np.minimum(norm1, norm2), np.maximum(norm1, norm2)
    norm1 = np.minimum(norm1, norm2 - 2.0)
    if params.nnorm is None:
        span = norm2 - norm1
        nnorm = np.where(span >= 300, 2, np.where(span >= 30, 1, 0))
    else:
        nnorm = np.full(k, int(params.nnorm))
    return norm1, norm2, np.minimum(np.maximum(nnorm, 0), 3)


def _pre_ranges(
    rel: np.ndarray, params: PrepParams, ie0: np.ndarray, lead: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``edge_fit``'s pre-edge index range ``[q1, q2)`` and ``npre`` of measured rows (each
    row's bulk starting at column ``lead``, :func:`~xasflow.spectra.norm.leading_strays`)."""
    k, m = rel.shape
    rows = np.arange(k)
    if params.pre1 is None:
        r1 = rel[rows, lead + 1]
        pre1 = np.where(ie0 - lead > 20, 5.0 * np.round(r1 / 5.0), 2.0 * np.round(r1 / 2.0))
    else:
        pre1 = np.full(k, float(params.pre1))
    pre1 = np.maximum(pre1, rel[rows, lead])
    pre2 = 0.5 * pre1 if params.pre2 is None else np.full(k, float(params.pre2))
    pre1, pre2 = np.minimum(pre1, pre2), np.maximum(pre1, pre2)
    c = _count_le(rel, np.stack((pre1, _below(pre2), pre2), axis=1))
    q1 = np.maximum(c[:, 0] - 1, 0)
    q2 = _nearest(rel, pre2, c[:, 1])
    npre = (np.maximum(c[:, 2] - 1, 0) - q1 >= 3).astype(int)
    q2 = np.where(npre == 0, np.maximum(q2, q1 + 1), np.maximum(q2, np.minimum(m, q1 + 2)))
    return q1, q2, npre


def _post_edge(
    rel: np.ndarray,
    mu: np.ndarray,
    line: tuple[np.ndarray, np.ndarray, np.ndarray],
    p1: np.ndarray,
    p2: np.ndarray,
    degree: np.ndarray,
    energy_weights: bool,
    half_width: float | None,
    keep: tuple[slice, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``norm._at_zero`` of each row's ``mu - a - b (rel - c)`` on ``[p1, p2)`` (and, with
    ``half_width``, of ``arctan(rel / half_width)``): (the fit's value at 0, the arctan fit's
    value at 0 or None, the weighted centre of each row's x).

    Row i's x is a shift ``o[i]`` of row 0's: every power sum is a difference of prefix sums,
    or a matrix product of the rows' data, with powers of one shared, scaled coordinate ``u``
    (a least-squares polynomial is the same in any affine coordinate); the trapezoid ends are
    corrected per row. Rows with points left out (``keep``: a mask over the columns
    ``p1.min()..p2.max()``, False where a point is absurd) have their sums made anew from
    the points they keep (:func:`_kept_sums`).
    """
    k, m = rel.shape
    rows = np.arange(k)
    pa, pb = int(p1.min()), int(p2.max())
    base = rel[0, pa:pb]
    ref, scale = 0.5 * (base[0] + base[-1]), 0.5 * (base[-1] - base[0]) or 1.0
    u = (base - ref) / scale
    o = rel[:, pa] - base[0]
    top = int(degree.max())
    powers = max(2 * top, 1) + 1  # u^0 .. u^(powers-1)
    h = np.ones(pb - pa)
    if energy_weights:  # interior trapezoid weights; the ends of each row's range below
        lo, hi = max(pa - 1, 0), min(pb + 1, m)
        h[:] = 0.0
        h[lo + 1 - pa : hi - 1 - pa] = 0.5 * (rel[0, lo + 2 : hi] - rel[0, lo : hi - 2])
    plain = _vander(u, powers)
    vand = plain * h[:, None]
    prefix = np.zeros((pb - pa + 1, powers))
    np.cumsum(vand, axis=0, out=prefix[1:])
    sums = prefix[p2 - pa] - prefix[p1 - pa]  # (k, powers): sum of w u^j over each row's range
    low = vand[:, : top + 1]
    data = [_range_sums(mu[:, pa:pb], low, p1 - pa, p2 - pa)]  # sum of w u^j y
    if half_width is not None:
        arc = np.divide(rel[:, pa:pb], half_width)
        np.arctan(arc, out=arc)
        data.append(_range_sums(arc, low, p1 - pa, p2 - pa))
    if energy_weights:  # a row's first and last weights are half its end intervals
        two = p2 - p1 > 1  # (a single point weighs 1)
        first = np.where(two, 0.5 * (rel[rows, np.minimum(p1 + 1, m - 1)] - rel[rows, p1]), 1.0)
        last = 0.5 * (rel[rows, p2 - 1] - rel[rows, np.maximum(p2 - 2, 0)])
        for col, delta in (
            (p1, first - h[p1 - pa]),
            (p2 - 1, np.where(two, last - h[p2 - 1 - pa], 0.0)),
        ):
            uj = _vander(u[col - pa], powers)
            sums += delta[:, None] * uj
            at_end = [mu[rows, col]]
            if half_width is not None:
                at_end.append(np.arctan(rel[rows, col] / half_width))
            for d_sum, y_end in zip(data, at_end, strict=True):
                d_sum += (delta * y_end)[:, None] * uj[:, : top + 1]
    if keep is not None:
        _kept_sums(rel, mu, keep[1], p1, p2, plain, sums, data, energy_weights, half_width)
    a, b, c = line  # data[0] becomes the sums of w u^j (mu - a - b (x - c)), x = s u + ref + o
    low_sums = sums[:, : top + 1]
    wx = scale * sums[:, 1 : top + 2] + (ref + o)[:, None] * low_sums
    data[0] = data[0] - a[:, None] * low_sums - b[:, None] * (wx - c[:, None] * low_sums)
    centre = wx[:, 0] / sums[:, 0]
    out = [d[:, 0] / sums[:, 0] for d in data]
    u0 = (-ref - o) / scale
    for d in sorted(set(degree.tolist()) - {0}):
        g = _pick(degree == d)
        ii = np.arange(d + 1)
        gram = sums[g][:, ii[:, None] + ii[None, :]]
        rhs = np.stack([r[g][:, : d + 1] for r in data], axis=2)
        coef = np.linalg.solve(gram, rhs)  # (g, d+1, len(data))
        value = np.einsum("gi,gic->gc", _vander(u0[g], d + 1), coef)
        for j in range(len(data)):
            out[j][g] = value[:, j]
    return out[0], (out[1] if half_width is not None else None), centre


def _kept_sums(
    rel: np.ndarray,
    mu: np.ndarray,
    keep: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    plain: np.ndarray,
    sums: np.ndarray,
    data: list[np.ndarray],
    energy_weights: bool,
    half_width: float | None,
) -> None:
    """Remake, in place, the power sums ``sums`` and ``data`` (of mu, and of the arctan) of
    the rows that leave points out (``keep`` False), from the points each keeps: weights 1,
    or the trapezoids of the kept energies (``norm._energy_weights`` of them), as ``plain``
    (the powers of the shared coordinate, ``p1.min()..p2.max()``) weighs them."""
    g = np.flatnonzero(~keep.all(axis=1))
    pa, pb = int(p1.min()), int(p2.max())
    cols = np.arange(pb - pa)
    kept = keep[g] & (cols >= (p1[g] - pa)[:, None]) & (cols < (p2[g] - pa)[:, None])
    x = rel[g, pa:pb]
    if energy_weights:
        width = cols.size
        prev = np.maximum.accumulate(np.where(kept, cols, -1), axis=1)
        after = np.minimum.accumulate(np.where(kept, cols, width)[:, ::-1], axis=1)[:, ::-1]
        before = np.hstack((np.full((g.size, 1), -1), prev[:, :-1]))  # the kept point before
        nxt = np.hstack((after[:, 1:], np.full((g.size, 1), width)))  # and after each column
        rows = np.arange(g.size)[:, None]
        lo = np.where(before >= 0, x[rows, np.maximum(before, 0)], x)
        hi = np.where(nxt < width, x[rows, np.minimum(nxt, width - 1)], x)
        w = 0.5 * (hi - lo)
        w[(before < 0) & (nxt >= width)] = 1.0  # a single point (no trapezoid) weighs 1
        w = np.where(kept, w, 0.0)
    else:
        w = kept.astype(np.float64)
    top = data[0].shape[1]
    sums[g] = w @ plain
    data[0][g] = (w * mu[g, pa:pb]) @ plain[:, :top]
    if half_width is not None:
        data[1][g] = (w * np.arctan(x / half_width)) @ plain[:, :top]


def normalize_larch_batch(
    axes: np.ndarray,
    rel: np.ndarray,
    mu: np.ndarray,
    e0: np.ndarray,
    params: PrepParams,
    declared: Sequence[object],
    tail_width: float | None,
    tab: float | None,
    strays: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[SpectrumError | None], np.ndarray]:
    """Larch-convention ``normalize`` of every row of ``mu`` on ``axes`` (``rel = axes - e0``).

    The rows are one axis shifted (``rel[i] = energy + shift[i] - e0[i]``, as in
    ``prepare_batch``); ``declared[i]`` is row i's ``meta.get("calculated")``; ``tab`` the
    tabulated edge (eV) a measured row must start below too; ``strays``: ``stray_ends(rel)``
    where the caller has it. Returns (y on
    the rows' axes, steps, per-row SpectrumError or None, indices of rows left to the
    per-row function).
    """
    n, m = mu.shape
    steps = np.full(n, np.nan)
    errors: list[SpectrumError | None] = [None] * n
    lead, trail = stray_ends(rel) if strays is None else strays
    bulk = m - trail  # each row's data end there: strays are no post-edge
    end = rel[np.arange(n), bulk - 1]
    for i in np.flatnonzero(end < params.min_post_edge).tolist():
        errors[i] = SpectrumError(
            "no_post_edge",
            f"data end at E0{float(end[i]):+.1f} eV, below E0{params.min_post_edge:+g} eV: "
            "cannot find the edge step",
        )
    measured = np.array([d is False for d in declared], dtype=bool)  # as process.normalize
    late = np.zeros(n, dtype=bool)
    if measured.any():
        at = np.flatnonzero(measured)
        tab_rel = None if tab is None else tab - e0[at]  # on each row's (aligned) axis
        for i, why in zip(at.tolist(), measured_start_why(rel[at], None, tab_rel), strict=True):
            if why is not None:
                late[i] = True
                if end[i] >= params.min_post_edge:
                    errors[i] = SpectrumError("no_pre_edge", why)
    usable = (end >= params.min_post_edge) & ~late
    if not usable.any():
        return np.full((n, m), np.nan), steps, errors, np.zeros(0, dtype=int)
    live = _pick(usable)
    r_live, b_live = rel[live], bulk[live]
    norm1, norm2, nnorm = _ranges(r_live, params, end[live])
    c = _count_le(r_live, np.stack((_below(np.zeros(len(norm1))), norm1, _below(norm2)), axis=1))
    ie0 = _nearest(r_live, np.zeros(len(norm1)), c[:, 0])
    p1 = np.minimum(np.maximum(c[:, 1] - 1, 0), b_live - 3)
    p2 = _nearest(r_live, norm2, c[:, 2])
    few = p2 - p1 < 2
    p1 = np.where(few, p1 - 2, p1)
    nnorm = np.where(few, 0, np.where(p2 - p1 < 5, np.minimum(1, nnorm), nnorm))
    idx = np.arange(n)[live]
    # left to the per-row function: Python's negative slice in edge_fit, and any row that is
    # not its axis's shift of the first row's (the shared coordinate of _post_edge)
    probe = r_live[:, [0, m // 2, m - 1]]
    drift = probe - probe[:1] - (probe[:, :1] - probe[0, 0])
    ok = (p1 >= 0) & (np.abs(drift) <= 1e-9 * (1.0 + np.abs(probe))).all(axis=1)
    defer = idx[~ok]
    keep = _pick(ok)
    idx, norm1, norm2, nnorm, p1, p2, ie0 = (
        a[keep] for a in (idx, norm1, norm2, nnorm, p1, p2, ie0)
    )
    if not idx.size:
        return np.full((n, m), np.nan), steps, errors, defer
    rows = slice(None) if idx.size == n else idx
    kept = [declared[i] for i in idx.tolist()]
    calc = _calculated(rel[rows], mu[rows], params, kept, (lead[rows], trail[rows]))
    step, y_fit, bad, spiky = _fit_rows(
        axes[rows],
        rel[rows],
        mu[rows],
        e0[rows],
        params,
        calc,
        tail_width,
        ie0,
        nnorm,
        p1,
        p2,
        (lead[idx], bulk[idx]),
    )
    if spiky.any():  # the per-row function finds the glitches and says so (prepare: repairs)
        defer, step = np.concatenate((defer, idx[spiky])), np.where(spiky, np.nan, step)
    steps[rows] = step
    if idx.size == n:
        y = y_fit
    else:
        y = np.full((n, m), np.nan)
        y[rows] = y_fit
    for r, i in enumerate(idx.tolist()):
        worst = bad[r]
        if worst is None:
            continue
        where = f"post-edge E0{float(norm1[r]):+g}..{float(norm2[r]):+g} eV, degree {nnorm[r]}"
        if worst == 0.0:
            msg = f"edge step {float(step[r]):.3g} is not positive ({where})"
        else:
            msg = undetermined_step(worst, float(step[r]), params, where)
        errors[i] = SpectrumError("edge_step", msg)
    return y, steps, errors, defer


def _calculated(
    rel: np.ndarray,
    mu: np.ndarray,
    params: PrepParams,
    declared: list[object],
    strays: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """``process.is_calculated`` of every row: declared, else a late start from near zero
    (each row's bulk, no ``strays``: ``stray_ends(rel)``)."""
    calc = np.array([bool(d) for d in declared], dtype=bool)
    undeclared = np.array([d is None for d in declared], dtype=bool)
    rows, (lead, trail) = np.arange(mu.shape[0]), strays
    first = mu[rows, lead]
    maybe = undeclared & (rel[rows, lead] > params.calc_start) & (first >= 0.0)
    if maybe.any():
        if lead.any() or trail.any():
            cols = np.arange(mu.shape[1])
            bulk = (cols >= lead[maybe, None]) & (cols < (mu.shape[1] - trail)[maybe, None])
            top = np.where(bulk, mu[maybe], -np.inf).max(axis=1)
        else:
            top = mu[maybe].max(axis=1)
        calc[maybe] = first[maybe] <= params.calc_floor * top
    return calc


def _fit_rows(
    axes: np.ndarray,
    rel: np.ndarray,
    mu: np.ndarray,
    e0: np.ndarray,
    params: PrepParams,
    calc: np.ndarray,
    tail_width: float | None,
    ie0: np.ndarray,
    nnorm: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    ends: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, list[float | None], np.ndarray]:
    """``edge_fit`` and the step checks of rows that passed the range checks (each row's
    data, its strays left out, from column ``ends[0]`` to before ``ends[1]``).

    Returns (steps, y, per row None or the failure: 0.0 for a step that is not positive,
    else the largest |y| in the model window beyond ``max_norm``; the rows that may hold a
    glitch in the window, :func:`~xasflow.spectra.glitches.spike_rows`).
    """
    k = mu.shape[0]
    lead, bulk = ends
    # the background a + b (rel - c) per row: b = 0 for a constant, all 0 for a calculation
    a, b, c = np.zeros(k), np.zeros(k), np.zeros(k)
    meas = _pick(~calc)
    pre: tuple[np.ndarray, np.ndarray] | None = None
    if not calc.all():
        q1, q2, npre = _pre_ranges(rel[meas], params, ie0[meas], lead[meas])
        pre = (q1, q2)
    # absurd values (a glitch of 1e6, a dropout) are left out of both fits, as edge_fit does
    keep_pre, keep_post = absurd_rows(rel, mu, pre, ~calc, (p1, p2))
    if pre is not None:
        qcols, qmask = _columns(q1, q2)
        count = q2 - q1
        if keep_pre is not None:  # the same columns: q1.min() to q2.max()
            qmask *= keep_pre[1]
            count = qmask.sum(axis=1)
        xq = rel[meas, qcols]
        cq = _rowsum(xq, qmask) / count
        tq = (xq - cq[:, None]) * qmask
        tt = _rowsum(tq, tq)
        sloped = (npre == 1) & (count >= 2) & (tt > 0)
        tt_safe = np.where(sloped, tt, 1.0)
        muq = mu[meas, qcols]
        a[meas] = _rowsum(muq, qmask) / count
        b[meas] = np.where(sloped, _rowsum(tq, muq) / tt_safe, 0.0)
        c[meas] = np.where(npre == 1, cq, 0.0)
    # the post-edge polynomial at 0
    size = p2 - p1
    if keep_post is not None:
        size = size - np.count_nonzero(~keep_post[1], axis=1)
    degree = np.where(size <= nnorm, 0, nnorm)
    hw = 0.5 * tail_width if tail_width is not None and tail_width > 0 else None
    first, arc, centre = _post_edge(
        rel, mu, (a, b, c), p1, p2, degree, params.weighting == "energy", hw, keep_post
    )
    if hw is None or arc is None:
        step = first
    else:  # the edge's own arctan taken out of both fits, as edge_fit does
        step = first * (1.0 - (arc / np.pi - 0.5))
        if pre is not None:
            fix = step[meas] > 0
            f = _pick(fix)
            fr = np.arange(k)[meas][f]
            edge = step[fr][:, None] * (0.5 + np.arctan(xq[f] / hw) / np.pi)
            value = _rowsum(edge, qmask[f]) / count[f]
            slope = np.where(sloped[f], _rowsum(tq[f], edge) / tt_safe[f], 0.0)
            a[fr] -= value
            b[fr] -= slope
            at = np.where(nnorm[fr] >= 1, 0.0, centre[fr])
            step[fr] += np.where(npre[f] == 1, value + slope * (at - c[fr]), value)
    positive = step > 0
    y = np.subtract(rel, c[:, None])  # mu - (a + b (rel - c)), divided by the step, in place
    y *= b[:, None]
    y += a[:, None]
    np.subtract(mu, y, out=y)
    y /= np.where(positive, step, 1.0)[:, None]
    win = _count_le(axes, np.stack((_below(e0 + params.window_start), e0 + params.window_stop), 1))
    win[:, 1] = np.minimum(win[:, 1], bulk)
    worst = np.zeros(k)
    spiky = np.zeros(k, dtype=bool)
    if int(win[:, 1].max()) > int(win[:, 0].min()):
        wcols, wmask = _columns(win[:, 0], win[:, 1])
        worst = np.where(wmask > 0, np.abs(y[:, wcols]), 0.0).max(axis=1)
        # the window's points and the first past each end (which feeds the grid's end)
        ends = np.minimum(win[:, 1] + 1, bulk - 1), win[:, 1] >= bulk - 1
        spiky = positive & spike_rows(rel, y, win[:, 0] - 1, *ends)
    bad: list[float | None] = [None] * k
    for r in np.flatnonzero(~positive | (worst > params.max_norm) & ~spiky).tolist():
        bad[r] = 0.0 if not positive[r] else float(worst[r])
    return step, y, bad, spiky
