"""Preparation of many spectra sharing one energy axis (a fly-scan page, a burst of events).

The same science as :func:`~xasflow.spectra.process.prepare` and
:func:`~xasflow.spectra.channels.alignment_shift`, written as matrix operations over the rows
of ``mu`` (n spectra, m points on one axis) so the per-spectrum cost is arithmetic rather
than Python overhead. Vectorised: the normalisation with ``normalization="edge_step"``
(legacy here, larch in :mod:`xasflow.spectra.norm_batch`), the resampling onto the model
grid and the reference foil's edge check. Done per row with the single-spectrum functions:
the grid's origin where it is not E0 (:meth:`~xasflow.spectra.process.PrepParams.origin`),
the E0 search (:func:`~xasflow.spectra.e0_batch.find_e0_batch`: bit for bit the E0 that training's spectra get, and
faster than its matrix version was), ``normalization="max"``
(:func:`~xasflow.spectra.normalization.normalize`), and HERFD spectra (``meta["herfd"]``, whole
:func:`~xasflow.spectra.process.prepare`). Each row fails on its own: a bad row is a
:class:`SpectrumError` in its slot of the result, never an exception for the batch. A stack of
fewer than :data:`BATCH_MIN_ROWS` rows is prepared row by row, where that is faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError, nonfinite_detail
from xasflow.spectra.e0_batch import (
    alignment_shift_batch,
    find_e0_batch,
    has_edge_batch,
)
from xasflow.spectra.e0_rivals import rival_origins_rows
from xasflow.spectra.edges import core_hole_width
from xasflow.spectra.glitches import WindowGlitch
from xasflow.spectra.heap import retain_heap
from xasflow.spectra.norm import stray_ends
from xasflow.spectra.norm_batch import normalize_larch_batch
from xasflow.spectra.normalization import normalize, undetermined_step
from xasflow.spectra.process import (
    MIN_WINDOW_POINTS,
    Prepared,
    PrepParams,
    alternate_grids,
    prepare,
    sparse_window,
)
from xasflow.spectra.quality import edge_snr_rows, gated_steps, weak_edge
from xasflow.spectra.scan_start import tabulated_edge

__all__ = ["alignment_shift_batch", "find_e0_batch", "has_edge_batch", "prepare_batch"]

Result = Prepared | SpectrumError

#: Fewer live rows than this are normalised (larch) by the single-spectrum function: the
#: batched one's fixed cost (some 200 small numpy calls) beats it from about 5 rows on
#: (``bench/prepare_batch.py``).
LARCH_MIN_ROWS = 5

#: Fewer checked rows than this are each prepared by :func:`prepare` itself: the matrix
#: path's fixed cost (the E0 rows, the edge-to-noise rows, the window masks) pays only from
#: about 8 rows on: per 1,000-point spectrum, 2 rows took 402 us on it against 267 us by
#: ``prepare``, 4 rows 310 against 262, 8 rows even (``bench/prepare_batch.py``). The daemon
#: makes such stacks between a spectrum at a time (a group of one, prepared alone anyway) and
#: its full batches. The two paths agree to rounding (1e-16 in y), not bit for bit.
BATCH_MIN_ROWS = 8


def _interp_rows(
    query: np.ndarray, base: np.ndarray, rel: np.ndarray, ys: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """``np.interp(query[i], rel[i], ys[i])`` for every row, as one gather.

    ``rel[i]`` is ``base + offset[i]`` (up to rounding): the segment is found on the shared
    ``base`` axis in one ``searchsorted``, the weights from ``rel`` itself; ends held.
    """
    n, k = query.shape
    m = base.size
    if n > 0 and (offset == offset[0]).all() and (query == query[0]).all():
        # one axis and one query for all rows (a reference page): weights once, a column gather
        j1 = np.clip(np.searchsorted(base, query[0] - offset[0], side="right") - 1, 0, m - 2)
        x0, x1 = rel[0, j1], rel[0, j1 + 1]
        w = np.clip((query[0] - x0) / (x1 - x0), 0.0, 1.0)
        lo = ys[:, j1]
        return lo + w * (ys[:, j1 + 1] - lo)
    j = np.searchsorted(base, (query - offset[:, None]).ravel(), side="right") - 1
    j = np.clip(j, 0, m - 2).reshape(n, k) + (np.arange(n) * m)[:, None]
    flat_x, flat_y = rel.ravel(), ys.ravel()
    x0, x1 = flat_x[j], flat_x[j + 1]
    y0, y1 = flat_y[j], flat_y[j + 1]
    t = np.clip((query - x0) / (x1 - x0), 0.0, 1.0)
    return y0 + t * (y1 - y0)


def _trusted(
    energy: np.ndarray, mu: np.ndarray, element: str | None, edge: str, meta: Any
) -> Spectrum:
    """A Spectrum of already-checked arrays (finite, ``energy`` strictly increasing): its
    fields set in its ``__dict__`` at once (the frozen dataclass's checks and sorting skipped;
    one ``object.__setattr__`` per field cost twice the time)."""
    new = object.__new__(Spectrum)
    vars(new).update(energy=energy, mu=mu, element=element, edge=edge, e0=None, meta=meta)
    return new


@lru_cache(maxsize=64)
def _projection(k: int, degree: int) -> np.ndarray:
    """Least-squares projection (degree+1, k) onto polynomials in t = linspace(-1, 1, k).

    Every row's uniform stretch ``linspace(lo, hi, k)`` centred and scaled is this same t, so
    one normal-equations solve serves all rows (as ``normalization._fit_line`` does per row).
    """
    t = np.linspace(-1.0, 1.0, k)
    powers = np.vander(t, degree + 1, increasing=True)
    proj = np.linalg.solve(powers.T @ powers, powers.T)
    proj.setflags(write=False)
    return proj


def _horner(coef: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Evaluate per-row polynomials (coef (n, d+1), increasing) at u (n, k)."""
    out = np.broadcast_to(coef[:, -1:], u.shape).copy()
    for j in range(coef.shape[1] - 2, -1, -1):
        out = out * u + coef[:, j : j + 1]
    return out


def _uniform_fit(
    energy: np.ndarray,
    rel: np.ndarray,
    ys: np.ndarray,
    d: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    degree: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit each row's data on its ``lo..hi`` stretch resampled at 1 eV (``normalization._uniform``).

    Returns (coef, centre, scale): row i's fit at ``x`` is ``_horner(coef, (x-centre)/scale)``.
    """
    n = ys.shape[0]
    k = np.maximum(np.round(hi - lo) + 1, 3).astype(int)
    coef = np.empty((n, degree + 1))
    centre = np.empty(n)
    scale = np.empty(n)
    for size in np.unique(k):
        rows = np.flatnonzero(k == size)
        u = np.linspace(0.0, 1.0, int(size))
        x = lo[rows, None] + (hi[rows] - lo[rows])[:, None] * u[None, :]
        x[:, -1] = hi[rows]
        y = _interp_rows(x, energy, rel[rows], ys[rows], d[rows])
        coef[rows] = y @ _projection(int(size), degree).T
        centre[rows] = x.mean(axis=1)
        scale[rows] = np.abs(x - centre[rows, None]).max(axis=1)
    scale[scale == 0] = 1.0
    return coef, centre, scale


def _legacy_batch(
    energy: np.ndarray, rel: np.ndarray, mu: np.ndarray, d: np.ndarray, params: PrepParams
) -> tuple[np.ndarray, np.ndarray, list[SpectrumError | None]]:
    """The legacy edge-step normalisation of every row: (y on the rows' axes, steps, errors)."""
    n = mu.shape[0]
    errors: list[SpectrumError | None] = [None] * n

    def stretch(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = mask.sum(axis=1)
        i_lo = np.argmax(mask, axis=1)
        i_hi = rel.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        rows = np.arange(n)
        return count, rel[rows, i_lo], rel[rows, i_hi]

    pre = (rel >= params.pre_edge[0]) & (rel <= params.pre_edge[1])
    n_pre, lo, hi = stretch(pre)
    sub = mu.copy()
    fit = np.flatnonzero(n_pre >= 3)
    if fit.size:
        coef, centre, scale = _uniform_fit(energy, rel[fit], mu[fit], d[fit], lo[fit], hi[fit], 1)
        sub[fit] = mu[fit] - _horner(coef, (rel[fit] - centre[:, None]) / scale[:, None])
    post = (rel >= params.post_edge[0]) & (rel <= params.post_edge[1])
    n_post, lo, hi = stretch(post)
    steps = np.full(n, np.nan)
    ok = n_post >= params.post_edge_degree + 3
    for i in np.flatnonzero(~ok):
        errors[i] = SpectrumError(
            "no_post_edge",
            f"only {int(n_post[i])} points between E0{params.post_edge[0]:+g} and "
            f"E0{params.post_edge[1]:+g} eV; cannot find the edge step",
        )
    todo = np.flatnonzero(ok)
    for degree in range(params.post_edge_degree, -1, -1):
        if not todo.size:
            break
        coef, centre, scale = _uniform_fit(
            energy, rel[todo], sub[todo], d[todo], lo[todo], hi[todo], degree
        )
        at = _horner(coef, ((0.0 - centre) / scale)[:, None])[:, 0]
        good = at > 0
        steps[todo[good]] = at[good]
        last = at
        todo_left = todo[~good]
        if degree == 0:
            for r, i in zip(np.flatnonzero(~good), todo_left, strict=True):
                errors[i] = SpectrumError("no_edge", f"edge step {last[r]:.3g} is not positive")
        todo = todo_left
    with np.errstate(invalid="ignore", divide="ignore"):
        y = sub / steps[:, None]
    win = (rel >= params.window_start) & (rel <= params.window_stop)
    worst = np.where(win, np.abs(np.nan_to_num(y, nan=0.0)), 0.0).max(axis=1)
    for k in np.flatnonzero(np.isfinite(steps) & (worst > params.max_norm)).tolist():
        errors[k] = SpectrumError(
            "edge_step", undetermined_step(float(worst[k]), float(steps[k]), params)
        )
    return y, steps, errors


def prepare_batch(
    energy: np.ndarray,
    mu: np.ndarray,
    params: PrepParams,
    element: str | None,
    edge: str = "K",
    *,
    shifts: np.ndarray | None = None,
    metas: Sequence[dict[str, Any]] | None = None,
) -> list[Result]:
    """:func:`~xasflow.spectra.process.prepare` of every row of ``mu`` on ``energy + shifts[i]``.

    ``energy`` (m,) is shared by the n rows of ``mu`` (n, m); ``metas[i]`` becomes row i's
    ``Spectrum.meta``. Returns per row a :class:`Prepared` or the :class:`SpectrumError`
    that row raised (the others are unaffected). See the module docstring for what runs
    vectorised and what falls back to the per-row functions. The first call keeps the heap
    its arrays free for the next (:func:`~xasflow.spectra.heap.retain_heap`).
    """
    retain_heap()
    energy = np.asarray(energy, dtype=np.float64).ravel()
    mu = np.atleast_2d(np.asarray(mu, dtype=np.float64))
    n = mu.shape[0]
    if mu.shape[1] != energy.size:
        raise ValueError(f"mu has {mu.shape[1]} columns but energy {energy.size} points")
    s = np.zeros(n) if shifts is None else np.asarray(shifts, dtype=np.float64).ravel()
    if s.size != n or not np.isfinite(s).all():
        raise ValueError("shifts must be n finite numbers")
    meta_list = [dict(m) for m in metas] if metas is not None else [{} for _ in range(n)]
    if len(meta_list) != n:
        raise ValueError(f"{len(meta_list)} metas for {n} spectra")
    element = element.strip().capitalize() if element is not None else None
    edge = edge.strip().upper()
    out: list[Result | None] = [None] * n
    shared_ok = (
        energy.size >= 3 and np.isfinite(energy).all() and bool((energy[1:] > energy[:-1]).all())
    )
    finite = np.isfinite(mu).all(axis=1)
    slow: list[int] = []
    fast: list[int] = []
    for i in range(n):
        if not shared_ok or meta_list[i].get("herfd"):
            slow.append(i)
        elif not finite[i]:
            detail = nonfinite_detail(~np.isfinite(mu[i]), energy + s[i])
            out[i] = SpectrumError("not_finite", detail)
        else:
            fast.append(i)
    if len(fast) < BATCH_MIN_ROWS:  # a few rows: faster one by one (see BATCH_MIN_ROWS)
        slow, fast = sorted(slow + fast), []
    for i in slow:  # the single-spectrum path does the checks and the HERFD broadening
        try:
            spectrum = Spectrum(energy + s[i], mu[i], element, edge, meta=meta_list[i])
        except SpectrumError as exc:
            out[i] = exc
            continue
        out[i] = _prepare_one(spectrum, params)
    if fast:
        idx = np.asarray(fast)
        for i, res in zip(
            fast,
            _prepare_fast(
                energy, mu[idx], s[idx], params, element, edge, [meta_list[i] for i in fast]
            ),
            strict=True,
        ):
            out[i] = res
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _prepare_one(spectrum: Spectrum, params: PrepParams) -> Result:
    """:func:`~xasflow.spectra.process.prepare`, its SpectrumError returned."""
    try:
        return prepare(spectrum, params)
    except SpectrumError as exc:
        return exc


def _prepare_fast(
    energy: np.ndarray,
    mu: np.ndarray,
    s: np.ndarray,
    params: PrepParams,
    element: str | None,
    edge: str,
    metas: list[dict[str, Any]],
) -> list[Result]:
    """Checked rows of one shared axis: E0, normalisation and gridding as matrix operations."""
    n = mu.shape[0]
    res: list[Result | None] = [None] * n
    e0, errors = find_e0_batch(energy, mu, element, edge, params.e0_search, s)
    axes = energy[None, :] + s[:, None]  # each row's (aligned) energy axis, as align() makes it
    spectra = [_trusted(axes[i], mu[i], element, edge, metas[i]) for i in range(n)]
    for i, err in enumerate(errors):
        if err is not None:
            res[i] = err
    live = np.flatnonzero([r is None for r in res])
    if not live.size:
        return res  # type: ignore[return-value]
    # the live rows' arrays: views of all rows where every row is live (a page's usual
    # case), else copies made once here (each was copied at every use: 6 % of the time)
    every = live.size == n
    ax_l, mu_l, e0_l = (axes, mu, e0) if every else (axes[live], mu[live], e0[live])
    rel = ax_l - e0_l[:, None]
    d = (s if every else s[live]) - e0_l
    y = np.empty_like(rel)
    steps = np.empty(live.size)
    norm_errors: list[SpectrumError | None] = [None] * live.size
    per_row: list[int] = []  # rows normalised by the single-spectrum function
    lead, trail = stray_ends(rel)  # the bulk is gridded, as process.resample: strays are no data
    if params.method == "legacy" and params.normalization == "edge_step":
        y, steps, norm_errors = _legacy_batch(energy, rel, mu_l, d, params)
    elif params.normalization == "edge_step" and live.size >= LARCH_MIN_ROWS:  # larch
        tail = core_hole_width(element, edge) if params.edge_tail else None
        declared = [metas[i].get("calculated") for i in live.tolist()]
        y, steps, norm_errors, deferred = normalize_larch_batch(
            ax_l,
            rel,
            mu_l,
            e0_l,
            params,
            declared,
            tail,
            tabulated_edge(element, edge),
            (lead, trail),
        )
        per_row = deferred.tolist()
    else:  # "max", or a few larch rows
        per_row = list(range(live.size))
    redo: list[int] = []  # rows with a glitch in the window: prepare repairs them
    for r in per_row:
        row = int(live[r])
        try:
            y[r], steps[r] = normalize(spectra[row], float(e0[row]), params)
        except SpectrumError as exc:
            norm_errors[r] = exc
            if isinstance(exc, WindowGlitch):
                redo.append(row)
    tab = tabulated_edge(element, edge)  # the gate's step is measured around it (or E0)
    gate = gated_steps(ax_l, mu_l, e0_l, tab, steps, lead, rel.shape[1] - trail)
    snr = edge_snr_rows(rel, mu_l, gate)
    for r in range(live.size):
        weak = None if norm_errors[r] else weak_edge(snr[r], gate[r], params.min_edge_snr)
        if weak is not None:
            norm_errors[r] = SpectrumError("weak_edge", weak)
    if params.align != "e0":  # each row's grid on its own origin (PrepParams.origin)
        shift = np.array([params.origin(axes[i], mu[i], e0[i]) - e0[i] for i in live.tolist()])
        rel, d = rel - shift[:, None], d - shift
    grid = params.grid
    rows = np.arange(live.size)
    first, last = rel[rows, lead], rel[rows, rel.shape[1] - 1 - trail]
    below = np.maximum(0.0, first - grid[0])
    above = np.maximum(0.0, grid[-1] - last)
    outside = np.maximum(below, above)
    inside = (
        (rel >= np.maximum(grid[0], first)[:, None]) & (rel <= np.minimum(grid[-1], last)[:, None])
    ).sum(axis=1)
    if lead.any() or trail.any():  # ends held at the bulk's, not interpolated towards a stray
        query = np.clip(grid[None, :], first[:, None], last[:, None])
    else:
        query = np.broadcast_to(grid, (live.size, grid.size))
    with np.errstate(invalid="ignore"):
        gridded = _interp_rows(query, energy, rel, y, d)
    rivals = _rivals(axes, mu, e0, live, params)
    for r, i in enumerate(live.tolist()):
        if i in redo:
            res[i] = _prepare_one(spectra[i], params)
        elif norm_errors[r] is not None:
            res[i] = norm_errors[r]
        elif outside[r] > params.max_extrapolation + 1e-9:
            side = "start" if below[r] >= above[r] else "end"
            res[i] = SpectrumError(
                "window",
                f"data cover E0{first[r]:+.1f} to E0{last[r]:+.1f} eV but the model window "
                f"{side} needs E0{(grid[0] if side == 'start' else grid[-1]):+.1f} eV "
                f"({outside[r]:.1f} eV beyond the data; at most {params.max_extrapolation:g} "
                "allowed)",
            )
        elif inside[r] < MIN_WINDOW_POINTS:
            res[i] = SpectrumError("window", sparse_window(int(inside[r]), grid))
        else:
            res[i] = Prepared(
                y=gridded[r],
                e0=float(e0[i]),
                edge_step=float(steps[r]),
                extrapolated=float(below[r] + above[r]),
                spectrum=spectra[i],
                alternates=alternate_grids(
                    axes[i],
                    mu[i],
                    rel[r],
                    y[r],
                    float(e0[i]),
                    params,
                    slice(int(lead[r]), rel.shape[1] - int(trail[r])),
                    rivals[r],
                ),
            )
    return res  # type: ignore[return-value]


def _rivals(
    axes: Sequence[np.ndarray], mu: Any, e0: np.ndarray, live: np.ndarray, params: PrepParams
) -> Sequence[tuple[float, ...] | None]:
    """Each live row's rival rises (``params.e0_rivals``), searched for all rows at once
    (:func:`~xasflow.spectra.e0_rivals.rival_origins_rows`); None each without it."""
    rows = live.tolist()
    if params.e0_rivals is None:
        return [None] * len(rows)
    return rival_origins_rows(
        [axes[i] for i in rows],
        [mu[i] for i in rows],
        [float(e0[i]) for i in rows],
        params.e0_rivals,
        params.e0_rival_window,
    )
