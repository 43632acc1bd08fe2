"""Quality of a measured spectrum: noise, a clear edge step, an unambiguous edge energy.

Science the daemon applies to raw spectra (the recommender's dwell and E0 margin, the
pipeline's reference-foil check), kept beside the rest of the spectra code so it can be
tested and reused without the daemon.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d

from xasflow.spectra.core import Spectrum
from xasflow.spectra.e0_rivals import edge_peaks
from xasflow.spectra.outliers import _halves, range_medians
from xasflow.spectra.shifted_rows import count_le, count_lt

__all__ = [
    "GATE_BASELINE",
    "GATE_TRUST",
    "GATE_WINDOWS",
    "e0_ambiguity",
    "edge_snr",
    "edge_snr_rows",
    "estimate_noise",
    "gate_steps",
    "gated_step",
    "gated_steps",
    "has_edge",
    "weak_edge",
]

#: 7-point quadratic Savitzky-Golay smoothing coefficients.
_SG7 = np.array([-2.0, 3.0, 6.0, 7.0, 6.0, 3.0, -2.0]) / 21.0
#: Offsets of a 7-point window's points, as a column (see :func:`estimate_noise`).
_WINDOW = np.arange(7)[:, None]
#: Where :func:`edge_snr_rows` measures the point noise, eV relative to E0: below the edge
#: and above it, clear of the edge itself; the residuals of both (each that holds 7) pooled.
NOISE_WINDOWS = ((-200.0, -15.0), (15.0, 120.0))
#: ``ndarray.max``: the same ufunc reduction (NaN included) without its Python wrapper.
_max = np.maximum.reduce


def estimate_noise(
    energy: np.ndarray, mu: np.ndarray, lo: float, hi: float, edge_step: float
) -> float | None:
    """Noise of mu within ``[lo, hi]`` eV as a fraction of ``edge_step`` (None: < 7 points).

    Residuals to a quadratic fitted to each 7 points on their own energies, each divided by
    sqrt(1 - h) (h the centre point's leverage) so white noise of standard deviation s gives
    s; robust scatter (1.4826 MAD). On an even grid (steps within 1 %) that is the 7-point
    Savitzky-Golay smooth (h = 1/3), computed as one; on an uneven one (steps of 0.31/0.61
    eV in turn, the library's As scans) the index-space smooth read a clean edge's shape as
    2-4 % of the step.
    """
    energy = np.asarray(energy, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    sel = (energy >= lo) & (energy <= hi)
    y = mu[sel]
    if y.size < 7 or not edge_step > 0:
        return None
    x = energy[sel]
    step = x[1:] - x[:-1]
    if float(_max(step)) - float(step.min()) <= 0.01 * float(step.min()):
        # an even grid: the same fit as one convolution (a third of the time)
        resid = (y[3:-3] - np.convolve(y, _SG7, mode="valid")) / math.sqrt(1.0 - _SG7[3])
        return 1.4826 * _median(np.abs(resid - _median(resid))) / abs(edge_step)
    rows = _WINDOW + np.arange(y.size - 6)  # (7, windows): window j holds points j..j+6
    t = x[rows]
    t -= t[3]  # energies from the window's centre, in units of its width
    t /= t[6] - t[0]
    yw = y[rows]
    t2 = t * t
    s1, s2, s3, s4 = t.sum(0), t2.sum(0), (t2 * t).sum(0), (t2 * t2).sum(0)
    # first row of the normal matrix's inverse (cofactors): the fit at the centre, and its
    # leverage
    c0, c1, c2 = s2 * s4 - s3 * s3, s2 * s3 - s1 * s4, s1 * s3 - s2 * s2
    det = 7.0 * c0 + s1 * c1 + s2 * c2
    fit = (c0 * yw.sum(0) + c1 * (t * yw).sum(0) + c2 * (t2 * yw).sum(0)) / det
    resid = (yw[3] - fit) / np.sqrt(1.0 - c0 / det)
    return 1.4826 * _median(np.abs(resid - _median(resid))) / abs(edge_step)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float array (NaN if any is NaN), by one partition: the same
    number in a third of the time of numpy's general n-d path (the recommender takes two
    per region it measures). ``values`` is partitioned in place (the caller's own array:
    no copy; the same order statistics)."""
    n = values.size
    k = n // 2
    if n % 2:
        values.partition(k)
        middle = float(values[k])
    else:
        values.partition((k - 1, k))
        middle = float((values[k - 1] + values[k]) / 2.0)
    return math.nan if math.isnan(float(_max(values))) else middle


def e0_ambiguity(spectrum: Spectrum, e0: float, window: float, ratio: float) -> float:
    """Distance (eV) to the farthest rival E0 near ``e0``; 0 when the edge is unambiguous.

    A rival is a local maximum of mu's smoothed derivative
    (:func:`~xasflow.spectra.e0_rivals.edge_peaks`) within ``window`` eV of ``e0`` (more
    than 1 eV away) at least ``ratio`` times the largest one there.
    """
    at, height = edge_peaks(spectrum.energy, spectrum.mu, e0, window)
    if height.size == 0:
        return 0.0
    top = float(_max(height))
    if not top > 0:
        return 0.0
    dist = np.abs(at - e0)
    rivals = dist[(height >= ratio * top) & (dist > 1.0)]
    return float(_max(rivals)) if rivals.size else 0.0


def has_edge(ref: Spectrum, e0: float, inner: float = 8.0, outer: float = 40.0) -> bool:
    """Whether a reference spectrum shows a clear edge step at ``e0`` (jump >> noise)."""
    e, mu = ref.energy, ref.mu
    pre = mu[(e >= e0 - outer) & (e <= e0 - inner)]
    post = mu[(e >= e0 + inner) & (e <= e0 + outer)]
    if pre.size < 3 or post.size < 3:
        return False
    jump = float(post.mean() - pre.mean())
    # point-to-point scatter below the edge, robust (1.4826 MAD, as estimate_noise): with a
    # plain standard deviation one glitch in the foil's pre-edge hid a clear edge (align_failed)
    d = np.diff(pre)
    noise = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)
    return jump > 10.0 * noise and jump > 0


def edge_snr_rows(rel: np.ndarray, mu: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The edge step of each row as a multiple of its point noise (NaN: not measurable).

    ``rel`` (n, m): each row's energies relative to its E0, increasing; ``mu`` (n, m) the raw
    rows; ``steps`` (n,) their edge steps. Noise as :func:`estimate_noise` on an even grid
    (residuals to the 7-point Savitzky-Golay smooth, by index, clear of the edge), robust
    scatter as 1.4826 times the residuals' median size, over the residuals centred in
    :data:`NOISE_WINDOWS` (those of each window with at least 7 of them) pooled. The quieter
    window's alone read white noise ~10 % low and scattered more (CuO with noise of a third
    of its step passed a gate of 5 in 12 of 200 copies; pooled: 1). One code for the single
    spectrum (n = 1) and a page, so both decide alike.
    """
    rel = np.atleast_2d(np.asarray(rel, dtype=np.float64))
    mu = np.atleast_2d(np.asarray(mu, dtype=np.float64))
    n, m = mu.shape
    if m < 7:
        return np.full(n, np.nan)
    # residual j is centred on point j + 3; the columns any row has in a window (rows share
    # an axis up to small shifts), found on the rows' column-wise extremes
    centres = rel[:, 3:-3]
    top, bottom = (centres[0], centres[0]) if n == 1 else (centres.max(0), centres.min(0))
    spans = [
        (int(np.searchsorted(top, lo)), int(np.searchsorted(bottom, hi, side="right")), lo, hi)
        for lo, hi in NOISE_WINDOWS
    ]
    spans = [span for span in spans if span[1] - span[0] >= 7]
    if not spans:
        return np.full(n, np.nan)
    first, last = min(span[0] for span in spans), max(span[1] for span in spans)
    smooth = correlate1d(mu[:, first : last + 6], _SG7, axis=1)[:, 3:-3]
    size = np.abs(mu[:, first + 3 : last + 3] - smooth)  # residuals' median is ~0: not centred
    # each window's residuals side by side in one block, those outside a row's window (or
    # of a window holding under 7 of its centres) +inf: the pooled median of each row by one
    # sort in place (hstack, np.where and np.sort's copy made it 1.7x the quieter window's)
    ordered = np.empty((n, sum(b - a for a, b, _, _ in spans)))
    count = np.zeros(n, dtype=np.intp)
    at = 0
    for a, b, lo, hi in spans:
        centre = centres[:, a:b]
        inside = (centre >= lo) & (centre <= hi)
        held = inside.sum(axis=1)
        inside &= (held >= 7)[:, None]
        block = ordered[:, at : at + b - a]
        block.fill(np.inf)
        np.copyto(block, size[:, a - first : b - first], where=inside)
        count += np.where(held >= 7, held, 0)
        at += b - a
    ordered.sort(axis=1)
    rows = np.arange(n)
    middle = 0.5 * (ordered[rows, (count - 1) // 2] + ordered[rows, count // 2])
    noise = np.where(count > 0, 1.4826 * middle / math.sqrt(1.0 - _SG7[3]), np.inf)
    out = np.full(n, np.nan)
    measured = np.isfinite(noise)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[measured] = np.asarray(steps, dtype=np.float64)[measured] / noise[measured]
    return out


def edge_snr(rel: np.ndarray, mu: np.ndarray, step: float) -> float:
    """:func:`edge_snr_rows` of one spectrum (``rel``, ``mu`` (m,), float64), the same number
    on its one row: each window's residuals are those its span holds (its centres are
    ascending, so all lie in the window), and their pooled median is the middle of their
    sort."""
    if mu.size < 7:
        return math.nan
    centres = rel[3:-3]
    spans = []
    for lo, hi in NOISE_WINDOWS:
        a, b = int(centres.searchsorted(lo)), int(centres.searchsorted(hi, side="right"))
        if b - a >= 7:
            spans.append((a, b))
    if not spans:
        return math.nan
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    smooth = correlate1d(mu[first : last + 6], _SG7)[3:-3]
    size = np.abs(mu[first + 3 : last + 3] - smooth)
    if len(spans) == 1:
        ordered = size.copy()  # np.sort, without its wrapper
    else:
        ordered = np.concatenate([size[a - first : b - first] for a, b in spans])
    ordered.sort()
    k = ordered.size
    middle = 0.5 * (ordered.item((k - 1) // 2) + ordered.item(k // 2))
    noise = 1.4826 * middle / math.sqrt(1.0 - _SG7[3])
    if not math.isfinite(noise):
        return math.nan
    if noise > 0:
        return float(step / noise)
    return math.nan if not step or step != step else math.copysign(math.inf, step)  # x / 0.0


#: Where :func:`gate_steps` measures a spectrum's edge step, eV from its tabulated edge (or
#: E0): the pre-edge up to the first value, the post-edge between the other two.
GATE_WINDOWS = (-12.0, 20.0, 60.0)
#: eV the pre-edge halves' medians must lie apart for :func:`gate_steps` (else the fitted
#: step): a scan starting 16 eV below its edge extrapolated a 4 eV slope to 0.66 of its step.
GATE_BASELINE = 20.0


#: eV between E0 and the tabulated edge past which :func:`gated_steps` also measures around
#: E0: a monochromator that far off (alignment failed or out of range) puts the tabulated
#: edge's windows on the post-edge; noise-captured E0s on weak edges lay 6-13 eV off.
GATE_TRUST = 20.0


def gated_steps(
    energy: np.ndarray,
    mu: np.ndarray,
    e0: np.ndarray,
    tab: float | None,
    steps: np.ndarray,
    lead: np.ndarray,
    end: np.ndarray,
) -> np.ndarray:
    """:func:`gate_steps` around the tabulated edge ``tab`` (on the axis prepared; E0 where
    none is tabulated), except for a row whose E0 lies over :data:`GATE_TRUST` eV from it and
    whose step around E0 is over twice the tabulated edge's: an unaligned scan on a
    monochromator that far off (30 eV: -1.8 around the edge, +1.0 around E0). A noisy weak
    edge whose E0 noise carried away keeps the tabulated edge's (its E0 step is inflated
    less than twice). One row: :func:`gated_step` (the same number, without the arrays)."""
    e0 = np.asarray(e0, dtype=np.float64)
    if mu.shape[0] == 1:
        one = gated_step(energy[0], mu[0], float(e0[0]), tab, float(steps[0]), lead[0], end[0])
        return np.array([one])
    if tab is None:
        return gate_steps(energy, mu, e0, steps, lead, end)
    # the pre-edge ends below E0 too: an edge 10-20 eV under the tabulated one (a reduced
    # species, a monochromator reading low) put its rise in the window, and the step read
    # negative (EuO 10 eV low: -0.72, refused weak_edge)
    out = gate_steps(energy, mu, np.full(e0.size, tab), steps, lead, end, np.minimum(e0, tab))
    far = np.flatnonzero(np.abs(e0 - tab) > GATE_TRUST)
    if far.size:
        own = gate_steps(energy[far], mu[far], e0[far], steps[far], lead[far], end[far])
        moved = own > 2.0 * out[far]
        out[far[moved]] = own[moved]
    return out


def gated_step(
    energy: np.ndarray,
    mu: np.ndarray,
    e0: float,
    tab: float | None,
    step: float,
    lead: int,
    end: int,
) -> float:
    """:func:`gated_steps` of one spectrum (``prepare``), by :func:`_gate_one`: the same
    number, without the page's arrays (in about half the time of a (1, m) page)."""
    if tab is None:
        return _gate_one(energy, mu, e0, e0, step, lead, end)
    out = _gate_one(energy, mu, tab, min(e0, tab), step, lead, end)
    if abs(e0 - tab) > GATE_TRUST:
        own = _gate_one(energy, mu, e0, e0, step, lead, end)
        if own > 2.0 * out:
            out = own
    return out


def gate_steps(
    energy: np.ndarray,
    mu: np.ndarray,
    centre: np.ndarray,
    steps: np.ndarray,
    lead: np.ndarray,
    end: np.ndarray,
    pre_centre: np.ndarray | None = None,
) -> np.ndarray:
    """The edge step the ``weak_edge`` gate divides, per row of ``mu`` on ``energy`` (n, m,
    each row's bulk ``lead[i]:end[i]``): the median over ``centre`` + 20..60 eV (its
    tabulated edge, on the axis prepared) of mu above the resistant line (medians of halves,
    as :mod:`~xasflow.spectra.outliers`) of its pre-edge up to ``pre_centre`` (default
    ``centre``) - 12 eV; the fitted ``steps`` where a window holds too few points (under 6
    and 5) or the pre-edge is short (:data:`GATE_BASELINE`).

    The fitted step is the post-edge fit at E0: on a noisy weak edge E0 lands on noise and
    the step grows with it (CuO at a true step/noise of 3 passed the gate 45 times in 200,
    with steps 1.5-2x the true one); these medians do not move with E0.

    Each window is a run of columns (the energies increase): medians over column ranges,
    the pre-edge halves' energies read off their middle points: 14 us per spectrum in a page
    of 64, where masked sorts of whole rows took 63 (the same numbers, bit for bit). One
    spectrum: :func:`_gate_one`, through :func:`gated_step`."""
    c = centre[:, None]
    pre_c = c if pre_centre is None else np.asarray(pre_centre, dtype=np.float64)[:, None]
    # the columns at or below ``pre_centre - 12`` eV, and below ``centre + 20`` / to ``+ 60``
    below = count_le(energy, pre_c + GATE_WINDOWS[0])[:, 0]
    p0 = np.maximum(count_lt(energy, c + GATE_WINDOWS[1])[:, 0], lead)
    p1 = np.minimum(count_le(energy, c + GATE_WINDOWS[2])[:, 0], end)
    stop = np.maximum(np.minimum(below, end), lead)  # the pre-edge: columns lead..stop-1
    half = (stop - lead) // 2
    rows = np.flatnonzero((half >= 3) & (p1 - p0 >= 5))
    out = np.asarray(steps, dtype=np.float64).copy()
    if not rows.size:
        return out
    a, z = lead[rows], stop[rows]
    b0, b1 = int(a.min()), int(z.max())  # the pre-edges' columns (copy those alone)
    a, z = a - b0, z - b0
    h, xa, xb = _halves(energy[rows, b0:b1], a, z)
    y = mu[rows, b0:b1]
    ya, yb = range_medians(y, a, a + h), range_medians(y, z - h, z)
    lo, hi = p0[rows], p1[rows]
    c0, c1 = int(lo.min()), int(hi.max())
    e = energy[rows, c0:c1]
    line = ya[:, None] + ((yb - ya) / (xb - xa))[:, None] * (e - xa[:, None])
    long = xb - xa >= GATE_BASELINE  # a slope over a few eV, taken 50 eV on, is noise
    out[rows[long]] = range_medians(mu[rows, c0:c1] - line, lo - c0, hi - c0)[long]
    return out


def _gate_one(
    energy: np.ndarray, mu: np.ndarray, centre: float, to: float, step: float, lead: int, end: int
) -> float:
    """:func:`gate_steps` of one spectrum (its pre-edge up to ``to`` - 12 eV), by slices and
    partitions: the same number (the same order statistics and arithmetic), 25 us, not 120."""
    below = int(energy.searchsorted(to + GATE_WINDOWS[0], "right"))
    p0 = max(int(energy.searchsorted(centre + GATE_WINDOWS[1], "left")), lead)
    p1 = min(int(energy.searchsorted(centre + GATE_WINDOWS[2], "right")), end)
    stop = max(min(below, end), lead)  # the pre-edge: lead..stop-1
    h = (stop - lead) // 2
    if h < 3 or p1 - p0 < 5:
        return step
    i, j = (h - 1) // 2, h // 2
    xa = 0.5 * (energy[lead + i] + energy[lead + j])
    xb = 0.5 * (energy[stop - h + i] + energy[stop - h + j])
    if not xb - xa >= GATE_BASELINE:
        return step
    ya, yb = _median(mu[lead : lead + h].copy()), _median(mu[stop - h : stop].copy())
    return _median(mu[p0:p1] - (ya + (yb - ya) / (xb - xa) * (energy[p0:p1] - xa)))


def weak_edge(snr: float, step: float, min_snr: float) -> str | None:
    """Why an edge step of ``snr`` times the point noise is too weak to analyse (None: it is
    not, or the noise could not be measured)."""
    if not min_snr > 0 or not np.isfinite(snr) or snr >= min_snr:
        return None
    return (
        f"edge step {step:.3g} is only {snr:.2g} times the point noise (at least {min_snr:g} "
        "needed): no clear absorption edge"
    )
