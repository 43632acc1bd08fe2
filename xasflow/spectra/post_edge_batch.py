"""The post-edge polynomial of many rows at E0, for the batched Larch normalisation
(:mod:`~xasflow.spectra.norm_batch`): each row's least-squares fit on its own index range,
from power sums of one shared coordinate (prefix sums and matrix products over the page, the
trapezoid ends corrected per row), the small normal equations solved as one stack; rows that
leave absurd points out have their sums made anew from the points they keep.
"""

from __future__ import annotations

import numpy as np

from xasflow.spectra.shifted_rows import pick

__all__ = ["post_edge"]


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


def post_edge(
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
        g = pick(degree == d)
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
