"""The E0 search and the reference foil's checks over many spectra on one energy axis.

:func:`find_e0_batch` gives each row the E0 :func:`~xasflow.spectra.e0.find_e0` gives it
alone (bit for bit: training's spectra get theirs that way), :func:`alignment_shift_batch` a
foil's shift as :func:`~xasflow.spectra.channels.alignment_shift`, and :func:`has_edge_batch`
the foil's edge check as :func:`~xasflow.spectra.quality.has_edge`. Used by
:func:`~xasflow.spectra.batch.prepare_batch` and the daemon's stacks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

from xasflow.spectra.core import SpectrumError
from xasflow.spectra.e0 import (
    _DERIVATIVE,
    _PULL,
    _TAPS,
    E0_STEP,
    FOIL_LOWEST,
    RISE_FRACTION,
    Points,
    e0_rows_why,
    on_grid,
)
from xasflow.spectra.e0_window import scan_points, search_window, window_error
from xasflow.spectra.edges import edge_energy
from xasflow.spectra.outliers import range_medians

__all__ = ["alignment_shift_batch", "find_e0_batch", "has_edge_batch", "held_rows", "page_screen"]

#: which rows' derivative maximum (rows, their columns) certainly stands (:func:`held_rows`)
Held = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: :func:`~xasflow.spectra.e0.e0_rows_why`'s screen: (rows known to pass the rise test, foil
#: rows that may hold a lower maximum) from the derivative rows, their maxima and the border
Screen = Callable[[np.ndarray, np.ndarray, tuple[int, ...]], tuple[np.ndarray, np.ndarray]]


def _row_errors(n: int) -> list[SpectrumError | None]:
    return [None] * n


def held_rows(
    grid: np.ndarray, energy: np.ndarray, shifts: np.ndarray, mu: np.ndarray, plain: np.ndarray
) -> Held:
    """The rows whose derivative maximum :func:`~xasflow.spectra.e0.rises_at` holds by its
    first test (no point pulls the derivative below :data:`~xasflow.spectra.e0.RISE_FRACTION`
    of it), found for all rows at once: row r's data points are ``energy + shifts[r]``,
    ``mu[r]`` (``plain[r]``; other rows are left to the test). The test's window and point
    pull to the bit; its derivative from the data points is the grid row's (``d``) less a
    bound on their difference (the grid's and the taps' positions, rounding), so a row found
    here is one the test passes: a clean page's every row, in 1 us each (12 by the test).
    """
    reach = _DERIVATIVE.size // 2
    half = reach * E0_STEP  # as rises_at
    count = energy.size
    offsets = np.arange(-reach, reach + 1)

    def held(d: np.ndarray, peak: np.ndarray) -> np.ndarray:
        k, size = d.shape
        at = grid[peak]
        # the columns that hold every row's window, with an eV to spare each side: rounding
        # moves a point's energy plus its shift by far less
        c0, c1 = np.searchsorted(
            energy,
            (float((at - shifts).min()) - half - 1.0, float((at - shifts).max()) + half + 1.0),
        ).tolist()
        c0, c1 = max(c0 - 3, 0), min(c1 + 3, count)
        if c1 - c0 < 3:
            return np.zeros(k, dtype=bool)
        e = energy[c0:c1] + shifts[:, None]  # as each row's points alone
        m = mu[:, c0:c1]
        a = c0 + np.count_nonzero(e < (at - half)[:, None], axis=1)  # searchsorted's
        b = c0 + np.count_nonzero(e < (at + half)[:, None], axis=1)
        lo, hi = a - 2, b + 2  # the test's window (rows where it meets an end: left to it)
        de, dm = np.diff(e, axis=1), np.diff(m, axis=1)
        # each point's distance from its neighbours' line, as the test takes it
        line = (m[:, :-2] * de[:, 1:] + m[:, 2:] * de[:, :-1]) / (e[:, 2:] - e[:, :-2])
        cols = np.arange(c0 + 1, c1 - 1)
        inner = (cols > lo[:, None]) & (cols < (hi - 1)[:, None])
        pull = np.where(inner, np.abs(m[:, 1:-1] - line), 0.0).max(axis=1)
        # |d - the test's derivative|: positions (grid vs at + taps) times the steepest
        # interval, and rounding of sums of |kernel| x |mu| (each row's band, over its window)
        steep = np.abs(dm / de).max(axis=1)
        inner_peak = np.minimum(np.maximum(peak, reach), size - 1 - reach)
        taps = grid[inner_peak[:, None] + offsets] - (grid[inner_peak][:, None] + _TAPS)
        dx = float(np.abs(taps).max()) + 1e-12 * np.abs(at)
        slack = _PULL * (steep * dx + 1e-12 * np.abs(m).max(axis=1))
        top = d[np.arange(k), peak]
        with np.errstate(invalid="ignore"):
            sure = _PULL * pull < 0.9 * (1.0 - RISE_FRACTION) * (top - slack)
        inside = (peak >= reach) & (peak <= size - 1 - reach)  # the kernel within the grid
        return np.asarray(sure & inside & (lo > 0) & (hi < count) & plain)

    return held


def _lower_maxima(d: np.ndarray, at: np.ndarray, border: tuple[int, ...]) -> np.ndarray:
    """Rows of ``d`` with a maximum (as :func:`~xasflow.spectra.e0.e0_rows_why` finds them)
    below column ``at[r]``, not on the ``border``, at least
    :data:`~xasflow.spectra.e0.FOIL_LOWEST` of ``d[r, at[r]]``: where a foil's first-rise
    search may find one (others keep ``at``), for all rows at once."""
    floor = FOIL_LOWEST * d[np.arange(d.shape[0]), at][:, None]
    peaks = np.zeros(d.shape, dtype=bool)
    inner = d[:, 1:-1]
    peaks[:, 1:-1] = (inner > d[:, :-2]) & (inner >= d[:, 2:])
    if d.shape[1] > 1:
        peaks[:, 0] = d[:, 0] > d[:, 1]
    peaks[:, list(border)] = False
    below = np.arange(d.shape[1]) < at[:, None]
    return np.asarray((peaks & below & (d >= floor)).any(axis=1))


def page_screen(held: Held, foil: bool) -> Screen:
    """A page's screen for :func:`~xasflow.spectra.e0.e0_rows_why`: :func:`held_rows`'
    ``held``, and for a ``foil`` :func:`_lower_maxima` (every row searched otherwise)."""

    def screen(
        d: np.ndarray, peak: np.ndarray, border: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        return held(d, peak), (_lower_maxima(d, peak, border) if foil else peak >= 0)

    return screen


def find_e0_batch(
    energy: np.ndarray,
    mu: np.ndarray,
    element: str | None = None,
    edge: str = "K",
    search: float = 40.0,
    shifts: np.ndarray | None = None,
    strict: bool = False,
    foil: bool = False,
) -> tuple[np.ndarray, list[SpectrumError | None]]:
    """:func:`~xasflow.spectra.e0.find_e0` of every row of ``mu`` (NaN + error on failure).

    Row i lies on ``energy + shifts[i]`` (``energy`` strictly increasing, shared). Rows whose
    search windows coincide (with a tabulated edge and ``search``: all of a fly-scan page
    whose data cover the edge +- ``search``; without one, rows of equal shift) go through
    :func:`~xasflow.spectra.e0.e0_rows` together: the same E0 to the last
    bit as each spectrum alone, which is how training's spectra get theirs. Stray points
    and each row's lone spikes are left out as ``find_e0`` leaves them out
    (:func:`~xasflow.spectra.e0_window.scan_points`), and each row's data points judge its maxima as
    they judge the spectrum's alone (a glitch's flank, :func:`~xasflow.spectra.e0.rises_at`;
    ``strict``, ``foil`` as ``find_e0``'s).
    """
    energy = np.asarray(energy, dtype=np.float64)
    mu = np.atleast_2d(np.asarray(mu, dtype=np.float64))
    n = mu.shape[0]
    s = np.zeros(n) if shifts is None else np.asarray(shifts, dtype=np.float64)
    e0 = np.full(n, np.nan)
    errors = _row_errors(n)
    bulk, keep = scan_points(energy, mu)  # as find_e0: no strays, no lone spikes
    energy, mu = energy[bulk], mu[:, bulk]
    first, last = np.zeros(n, dtype=int), np.full(n, energy.size - 1)
    if keep is not None:  # a spike at an end of the scan: the row's data end before it
        first, last = keep.argmax(axis=1), energy.size - 1 - keep[:, ::-1].argmax(axis=1)

    def axis(i: int) -> np.ndarray:
        """Row i's energies, as its spectrum alone searches them."""
        own = energy + s[i]
        return own if keep is None else own[keep[i]]

    def points(i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i's data points (energies, mu), as its spectrum alone holds them."""
        return axis(i), (mu[i] if keep is None else mu[i][keep[i]])

    def of_group(members: list[int]) -> Points:
        """The data points of a group's k-th row."""
        return lambda k: points(members[k])

    tab = search_window(energy, element, edge, search)[2]
    los, his = energy[first] + s, energy[last] + s  # each row's own data range, as alone
    if tab is not None:
        los, his = np.maximum(los, tab - search), np.minimum(his, tab + search)
    groups: dict[tuple[float, float], list[int]] = {}
    for i, window in enumerate(zip(los.tolist(), his.tolist(), strict=True)):
        groups.setdefault(window, []).append(i)
    for (a, b), members in groups.items():
        rows = np.asarray(members)
        error = window_error(axis(members[0]), a, b, element, edge, tab)
        if error is not None:
            for i in members:  # the detail names each row's own data range
                errors[i] = window_error(axis(i), a, b, element, edge, tab)
            continue
        grid = np.arange(a, b, E0_STEP)
        cut = a > energy[first[rows[0]]] + s[rows[0]]  # the window starts at E0 - search
        m = on_grid(grid, energy, mu[rows], s[rows], None if keep is None else keep[rows])
        plain = np.ones(rows.size, dtype=bool) if keep is None else keep[rows].all(axis=1)
        screen = page_screen(held_rows(grid, energy, s[rows], mu[rows], plain), foil)
        found, why = e0_rows_why(grid, m, cut, of_group(members), strict, foil, screen)
        e0[rows] = found
        for k, reason in enumerate(why):
            if reason is not None:
                errors[members[k]] = SpectrumError("no_edge", reason)
    return e0, errors


def alignment_shift_batch(
    energy: np.ndarray, ref_mu: np.ndarray, element: str, edge: str = "K", search: float = 40.0
) -> tuple[np.ndarray, list[SpectrumError | None]]:
    """:func:`~xasflow.spectra.channels.alignment_shift` of every reference row (NaN on failure:
    also a foil whose steepest rises all stand on single points, strict ``find_e0``)."""
    e0, errors = find_e0_batch(energy, ref_mu, element, edge, search, None, True, True)
    return edge_energy(element, edge) - e0, errors


def has_edge_batch(
    energy: np.ndarray, ref_mu: np.ndarray, e0: np.ndarray, inner: float = 8.0, outer: float = 40.0
) -> np.ndarray:
    """:func:`~xasflow.spectra.quality.has_edge` of every row (its edge at ``e0[i]``)."""
    energy = np.asarray(energy, dtype=np.float64)
    ref_mu = np.atleast_2d(np.asarray(ref_mu, dtype=np.float64))
    e0 = np.asarray(e0, dtype=np.float64)[:, None]
    e = energy[None, :]
    with np.errstate(invalid="ignore"):
        pre = (e >= e0 - outer) & (e <= e0 - inner)
        post = (e >= e0 + inner) & (e <= e0 + outer)
    n_pre, n_post = pre.sum(axis=1), post.sum(axis=1)
    enough = (n_pre >= 3) & (n_post >= 3)
    safe_pre, safe_post = np.maximum(n_pre, 1), np.maximum(n_post, 1)
    jump = (ref_mu * post).sum(axis=1) / safe_post - (ref_mu * pre).sum(axis=1) / safe_pre
    noise = _pre_edge_noise(energy, ref_mu, pre, n_pre, enough)
    with np.errstate(invalid="ignore"):
        return np.asarray(enough & (jump > 10.0 * noise) & (jump > 0))


def _pre_edge_noise(
    energy: np.ndarray, ref_mu: np.ndarray, pre: np.ndarray, n_pre: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Per row, :func:`~xasflow.spectra.quality.has_edge`'s noise: 1.4826 times the median
    absolute deviation of the differences between neighbouring pre-edge points, over sqrt 2
    (NaN for rows not in ``rows``, the rows with pre-edge pairs to judge).

    On an increasing axis each row's pre-edge points are one run of columns, so the medians
    are :func:`~xasflow.spectra.outliers.range_medians` over those runs (one sort of the
    columns they span); numpy's ``nanmedian`` over masked rows walked them one by one in
    Python (8.5 % of the daemon's processing thread at 750 spectra/s). Rows with a
    non-finite value go the masked way, which skips it as the single-spectrum check does not
    need to: same answers as before either way."""
    noise = np.full(ref_mu.shape[0], np.nan)
    d_all = np.diff(ref_mu, axis=1)
    fast = rows.copy()
    if not (energy[1:] > energy[:-1]).all():
        fast[:] = False
    else:
        fast &= np.isfinite(ref_mu).all(axis=1)
    if fast.any():
        d = d_all[fast]
        lo = np.argmax(pre[fast], axis=1)  # the run's first column
        hi = lo + n_pre[fast] - 1  # its pairs: the diffs lo .. lo + n - 2
        med = range_medians(d, lo, hi)
        mad = range_medians(np.abs(d - med[:, None]), lo, hi)
        noise[fast] = 1.4826 * mad / math.sqrt(2.0)
    slow = rows & ~fast
    if slow.any():
        pairs = pre[slow, 1:] & pre[slow, :-1]
        d = np.where(pairs, d_all[slow], np.nan)
        with warnings.catch_warnings():  # a row without pairs: NaN noise
            warnings.simplefilter("ignore", RuntimeWarning)
            dev = np.abs(d - np.nanmedian(d, axis=1, keepdims=True))
            noise[slow] = 1.4826 * np.nanmedian(dev, axis=1) / math.sqrt(2.0)
    return noise
