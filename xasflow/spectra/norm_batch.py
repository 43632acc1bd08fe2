"""Larch-convention normalisation of many rows at once (the rows of a shared-axis batch).

The same science as :func:`~xasflow.spectra.normalization.normalize` with ``method="larch"`` and
``normalization="edge_step"`` (:func:`~xasflow.spectra.norm.edge_fit` and its checks), for
n rows on one axis shifted per row (alignment) whose ranges and indices differ with their
E0 and shift: every index is one ``searchsorted`` on the shared axis checked against the
row itself (:mod:`~xasflow.spectra.shifted_rows`); the pre-edge lines are masked sums over
the few columns any row uses; the post-edge polynomials are fitted as one stack
(:mod:`~xasflow.spectra.post_edge_batch`), rows that leave absurd values out
(:func:`~xasflow.spectra.outliers.absurd_rows`, the points ``edge_fit`` leaves out) with
sums made anew. This module holds the ranges, the range checks, the pre-edge lines and the
step checks. The results equal the per-row function's to
rounding (``tests/test_norm_batch.py``). Rows it cannot reproduce (a user-set post-edge
range below the data's second point) are handed back to the per-row function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xasflow.spectra.core import SpectrumError
from xasflow.spectra.glitches import spike_rows
from xasflow.spectra.norm import stray_ends
from xasflow.spectra.normalization import undetermined_step
from xasflow.spectra.outliers import absurd_rows
from xasflow.spectra.post_edge_batch import post_edge
from xasflow.spectra.process import PrepParams
from xasflow.spectra.scan_start import measured_start_why
from xasflow.spectra.shifted_rows import below, columns, count_le, nearest, pick, rowsum

__all__ = ["normalize_larch_batch"]


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
    c = count_le(rel, np.stack((pre1, below(pre2), pre2), axis=1))
    q1 = np.maximum(c[:, 0] - 1, 0)
    q2 = nearest(rel, pre2, c[:, 1])
    npre = (np.maximum(c[:, 2] - 1, 0) - q1 >= 3).astype(int)
    q2 = np.where(npre == 0, np.maximum(q2, q1 + 1), np.maximum(q2, np.minimum(m, q1 + 2)))
    return q1, q2, npre


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
    measured = np.array([d is False for d in declared], dtype=bool)  # as normalization.normalize
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
    live = pick(usable)
    r_live, b_live = rel[live], bulk[live]
    norm1, norm2, nnorm = _ranges(r_live, params, end[live])
    c = count_le(r_live, np.stack((below(np.zeros(len(norm1))), norm1, below(norm2)), axis=1))
    ie0 = nearest(r_live, np.zeros(len(norm1)), c[:, 0])
    p1 = np.minimum(np.maximum(c[:, 1] - 1, 0), b_live - 3)
    p2 = nearest(r_live, norm2, c[:, 2])
    few = p2 - p1 < 2
    p1 = np.where(few, p1 - 2, p1)
    nnorm = np.where(few, 0, np.where(p2 - p1 < 5, np.minimum(1, nnorm), nnorm))
    idx = np.arange(n)[live]
    # left to the per-row function: Python's negative slice in edge_fit, and any row that is
    # not its axis's shift of the first row's (the shared coordinate of post_edge)
    probe = r_live[:, [0, m // 2, m - 1]]
    drift = probe - probe[:1] - (probe[:, :1] - probe[0, 0])
    ok = (p1 >= 0) & (np.abs(drift) <= 1e-9 * (1.0 + np.abs(probe))).all(axis=1)
    defer = idx[~ok]
    keep = pick(ok)
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
    """``normalization.is_calculated`` of every row: declared, else a late start from near zero
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
    meas = pick(~calc)
    pre: tuple[np.ndarray, np.ndarray] | None = None
    if not calc.all():
        q1, q2, npre = _pre_ranges(rel[meas], params, ie0[meas], lead[meas])
        pre = (q1, q2)
    # absurd values (a glitch of 1e6, a dropout) are left out of both fits, as edge_fit does
    keep_pre, keep_post = absurd_rows(rel, mu, pre, ~calc, (p1, p2))
    if pre is not None:
        qcols, qmask = columns(q1, q2)
        count = q2 - q1
        if keep_pre is not None:  # the same columns: q1.min() to q2.max()
            qmask *= keep_pre[1]
            count = qmask.sum(axis=1)
        xq = rel[meas, qcols]
        cq = rowsum(xq, qmask) / count
        tq = (xq - cq[:, None]) * qmask
        tt = rowsum(tq, tq)
        sloped = (npre == 1) & (count >= 2) & (tt > 0)
        tt_safe = np.where(sloped, tt, 1.0)
        muq = mu[meas, qcols]
        a[meas] = rowsum(muq, qmask) / count
        b[meas] = np.where(sloped, rowsum(tq, muq) / tt_safe, 0.0)
        c[meas] = np.where(npre == 1, cq, 0.0)
    # the post-edge polynomial at 0
    size = p2 - p1
    if keep_post is not None:
        size = size - np.count_nonzero(~keep_post[1], axis=1)
    degree = np.where(size <= nnorm, 0, nnorm)
    hw = 0.5 * tail_width if tail_width is not None and tail_width > 0 else None
    first, arc, centre = post_edge(
        rel, mu, (a, b, c), p1, p2, degree, params.weighting == "energy", hw, keep_post
    )
    if hw is None or arc is None:
        step = first
    else:  # the edge's own arctan taken out of both fits, as edge_fit does
        step = first * (1.0 - (arc / np.pi - 0.5))
        if pre is not None:
            fix = step[meas] > 0
            f = pick(fix)
            fr = np.arange(k)[meas][f]
            edge = step[fr][:, None] * (0.5 + np.arctan(xq[f] / hw) / np.pi)
            value = rowsum(edge, qmask[f]) / count[f]
            slope = np.where(sloped[f], rowsum(tq[f], edge) / tt_safe[f], 0.0)
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
    win = count_le(axes, np.stack((below(e0 + params.window_start), e0 + params.window_stop), 1))
    win[:, 1] = np.minimum(win[:, 1], bulk)
    worst = np.zeros(k)
    spiky = np.zeros(k, dtype=bool)
    if int(win[:, 1].max()) > int(win[:, 0].min()):
        wcols, wmask = columns(win[:, 0], win[:, 1])
        worst = np.where(wmask > 0, np.abs(y[:, wcols]), 0.0).max(axis=1)
        # the window's points and the first past each end (which feeds the grid's end)
        ends = np.minimum(win[:, 1] + 1, bulk - 1), win[:, 1] >= bulk - 1
        spiky = positive & spike_rows(rel, y, win[:, 0] - 1, *ends)
    bad: list[float | None] = [None] * k
    for r in np.flatnonzero(~positive | (worst > params.max_norm) & ~spiky).tolist():
        bad[r] = 0.0 if not positive[r] else float(worst[r])
    return step, y, bad, spiky
