"""Lone glitches inside the model window, found on the normalised spectrum before the
``max_norm`` test: one point far off the line through its two neighbours (a monochromator
glitch, an I0 dropout in fluorescence).

:func:`~xasflow.spectra.process.prepare` interpolates across them (:func:`repaired`: again
until none is new; a HERFD spectrum's before its broadening, :func:`repaired_first`) and
records their energies in ``meta["glitches_interpolated"]`` (the daemon flags the spectrum
``glitch_interpolated``, which withholds stop-early); over :data:`MAX_GLITCHES` points it
refuses the spectrum ``glitches``. Before, a glitch of more than ``max_norm`` edge steps refused
the spectrum as an undetermined edge step (the wrong reason: it sent the operator to the
post-edge range), and smaller ones went to the model (CuO with 2 and 5 steps at E0+60:
out of domain, CN 5 -> 4). A monochromator glitch recurs at one energy in every scan of a
run: refusing it would refuse the whole run, while a point interpolated across leaves the
model its input less one point, and the flag says so.

A point is a glitch where its excursion from its neighbours' line exceeds both
:data:`SPIKE_STEPS` edge steps and :data:`~xasflow.spectra.outliers.OUTLIER_MADS` times the
median excursion of the window (its noise) and of the :data:`NEAR` points on either side
past its neighbours (a sharp peak over several points is as curved there). The window's
points are judged, and the first point past each end (it feeds the grid's end point; where
it is the data's last, off the line its two inner neighbours extend), but not the edge
region :data:`EDGE`. Largest excursion in the clean spectra (Cu bundle's
window, E0-3.5..+116.5 eV): the XAS Data Library's 270 scans 0.83 step (SrCO3 at 12 K,
a white line on one point; next 0.38, S K jarosite), the 4,831 shared Cu FEFF spectra 0.22:
none is touched; sampled at every 2nd..6th point (0.6-1.5 eV steps near the edge), white
lines reach 3.5 steps (pentlandite at 0.75 eV), all within E0-0.6..E0+6.8 eV, inside :data:`EDGE`.

Not repaired, left to the model's out-of-domain score (which flags them, unnamed): a point
under 1.5 steps off (CuO +1 step at E0+60: CN 5 -> 4, ood 54), glitches of 2-3 adjacent
points unless each stands out of its neighbours' line by itself (two adjacent +2 steps: ood
482; three adjacent +3: ood 1140), and points in the edge region :data:`EDGE`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.outliers import OUTLIER_MADS

__all__ = [
    "EDGE",
    "MAX_GLITCHES",
    "REPAIRS",
    "SPIKE_STEPS",
    "WindowGlitch",
    "deglitched",
    "glitch_message",
    "interpolate_over",
    "repaired",
    "repaired_first",
    "spike_rows",
    "window_spikes",
]

#: Edge steps a point must lie off the line through its neighbours to be a glitch (the
#: clean spectra's largest: 0.83, a one-point white line).
SPIKE_STEPS = 1.5
#: The edge and its white line, E0-3..E0+15 eV, are not searched: at 0.6-1.5 eV steps a
#: white line stands on one point as a glitch does (S K pentlandite at 0.6 eV: 1.5 steps).
#: The library's 272 scans at their own sampling and every 2nd..6th point (0.3-7 eV steps)
#: hold every excursion over 1 step within E0-0.6..E0+6.8 (glitch/whiteline_where.out).
EDGE = (-3.0, 15.0)
#: Glitches interpolated across at most: a spectrum with more is refused ``glitches`` (a
#: scan that broken is no measurement to repair).
MAX_GLITCHES = 8
#: Times :func:`repaired` interpolates and looks again (E0 found anew may shift the window).
REPAIRS = 3
#: Rounds of one search: enough to count every glitch of a spectrum far over the cap.
_ROUNDS = 4 * MAX_GLITCHES
#: Points on each side of a candidate (past its two neighbours) whose excursions' median is
#: its surroundings' scale.
NEAR = 5


class WindowGlitch(SpectrumError):
    """Lone glitches in the model window (``found``: their indices and excursions in edge
    steps): :func:`~xasflow.spectra.process.prepare` interpolates across them."""

    found: tuple[tuple[int, float], ...] = ()


def _excursions(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y[j] - `` the line through ``y[j-1]`` and ``y[j+1]`` at ``x[j]``, for the inner
    points of (x, y) (last axis)."""
    t = (x[..., 1:-1] - x[..., :-2]) / (x[..., 2:] - x[..., :-2])
    return y[..., 1:-1] - (y[..., :-2] + t * (y[..., 2:] - y[..., :-2]))


def window_spikes(
    x: np.ndarray, y: np.ndarray, a: int, b: int, e0: float = 0.0, last: bool = False
) -> list[tuple[int, float]]:
    """The glitches among the points ``a..b-1`` of normalised ``y`` on ``x`` (each with
    both neighbours in the data: ``a >= 1``, ``b < x.size``), as (index, excursion in edge
    steps): the largest excursion, if beyond both floors, is one; it is set on its
    neighbours' line and the next round looks again, until none is left (or many rounds).
    Points within :data:`EDGE` of ``e0`` are not judged. ``last``: ``b`` is the data's last
    point and feeds the grid, judged off the line its two inner neighbours extend."""
    if b - a < 3:
        return []
    xs, w = x[a - 1 : b + 1], y[a - 1 : b + 1].copy()
    judged = ~((xs[1:-1] >= e0 + EDGE[0]) & (xs[1:-1] <= e0 + EDGE[1]))
    found: dict[int, float] = {}
    for _ in range(_ROUNDS):
        e = _excursions(xs, w)
        dev = np.abs(e)
        k = int(np.argmax(np.where(judged, dev, 0.0)))
        if not dev[k] > SPIKE_STEPS:
            break
        # its surroundings, less the two neighbours it moves: a sharp peak over several
        # points (a white line) is curved there as much, a glitch stands out of their noise
        near = np.concatenate(
            (dev[max(k - 1 - NEAR, 0) : max(k - 1, 0)], dev[k + 2 : k + 2 + NEAR])
        )
        local = float(np.median(near)) if near.size else 0.0
        if not dev[k] > OUTLIER_MADS * max(float(np.median(dev)), local):
            break
        if last and k == e.size - 1 and abs(e[k - 1]) < 0.25 * dev[k]:
            # not b-1 (a glitch there moves b-2's excursion half as much): b, past it, whose
            # glitch shows only on b-1
            t = (xs[-1] - xs[-2]) / (xs[-2] - xs[-3])
            k, size = e.size, float(w[-1] - w[-2] - t * (w[-2] - w[-3]))
            found.setdefault(a + k, size)
            w[-1] -= size
            continue
        found.setdefault(a + k, float(e[k]))  # once: a neighbour's repair may move it again
        w[k + 1] -= e[k]  # on its neighbours' line
    return sorted(found.items())


def spike_rows(
    x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, last: np.ndarray
) -> np.ndarray:
    """Which rows of ``y`` (k, m) on ``x`` hold a glitch among their points
    ``lo[i]..hi[i]-1`` (each with both neighbours in the row; ``last[i]``: and ``hi[i]``, the
    row's last), as :func:`window_spikes` finds them: the rows with an excursion beyond
    :data:`SPIKE_STEPS` (rare) are asked."""
    k, m = y.shape
    out = np.zeros(k, dtype=bool)
    a, b = max(int(lo.min()), 1), min(int(hi.max()), m - 1)
    if b <= a:
        return out
    dev = np.abs(_excursions(x[:, a - 1 : b + 1], y[:, a - 1 : b + 1]))
    cols = np.arange(a, b)
    inside = (cols >= lo[:, None]) & (cols < hi[:, None])
    for r in np.flatnonzero((np.where(inside, dev, 0.0) > SPIKE_STEPS).any(axis=1)).tolist():
        a, b = max(int(lo[r]), 1), min(int(hi[r]), m - 1)
        out[r] = bool(window_spikes(x[r], y[r], a, b, last=bool(last[r])))
    return out


def interpolate_over(x: np.ndarray, v: np.ndarray, at: tuple[int, ...]) -> np.ndarray:
    """``v`` with the points ``at`` replaced by the line through their nearest neighbours
    not in ``at`` (a copy)."""
    out = v.copy()
    keep = np.ones(v.size, dtype=bool)
    keep[list(at)] = False
    out[~keep] = np.interp(x[~keep], x[keep], v[keep])
    return out


def glitch_message(x: np.ndarray, found: list[tuple[int, float]]) -> str:
    """Why a spectrum with the glitches ``found`` (:func:`window_spikes`) in its model
    window is not normalised as it is."""
    return (
        f"{len(found)} point(s) in the model window lie far off their neighbours, a glitch: "
        f"{_where(x, found)}; normalize does not repair them (prepare interpolates across up "
        f"to {MAX_GLITCHES})"
    )


def _where(x: np.ndarray, found: list[tuple[int, float]]) -> str:
    return ", ".join(f"{x[j]:.1f} eV ({abs(e):.3g}x the edge step)" for j, e in found)


def deglitched(spectrum: Spectrum, at: list[int]) -> Spectrum:
    """``spectrum`` with the points ``at`` interpolated across, their energies recorded in
    ``meta["glitches_interpolated"]``."""
    meta = dict(spectrum.meta)  # after those of an earlier repair (before a broadening)
    done = list(meta.get("glitches_interpolated", []))
    meta["glitches_interpolated"] = done + [float(spectrum.energy[j]) for j in at]
    return spectrum.with_(mu=interpolate_over(spectrum.energy, spectrum.mu, tuple(at)), meta=meta)


R = TypeVar("R")


def repaired(spectrum: Spectrum, attempt: Callable[[Spectrum], R]) -> tuple[Spectrum, R]:
    """``attempt(spectrum)`` (E0 and :func:`~xasflow.spectra.normalization.normalize`), or where it
    raises :class:`WindowGlitch`, ``attempt`` of the spectrum with every glitch found so far
    interpolated across (:func:`deglitched`), until none is new (:data:`REPAIRS` times).
    SpectrumError ``glitches`` over :data:`MAX_GLITCHES` points, or still more after that."""
    found: dict[int, float] = {}
    current = spectrum
    for _ in range(REPAIRS + 1):
        try:
            return current, attempt(current)
        except WindowGlitch as glitch:
            found.update((j, e) for j, e in glitch.found if j not in found)
            if len(found) > MAX_GLITCHES:
                break
            current = deglitched(spectrum, sorted(found))
    many = sorted(found.items())
    raise SpectrumError(
        "glitches",
        f"{len(many)} points lie far off their neighbours (glitches): {_where(spectrum.energy, many)}; "
        f"over {MAX_GLITCHES} or found anew after {REPAIRS} repairs: not interpolated, "
        "the spectrum is refused (deglitch it or rescan)",
    )


def repaired_first(spectrum: Spectrum, attempt: Callable[[Spectrum], object]) -> Spectrum:
    """``spectrum`` with its glitches interpolated across as :func:`repaired` does, before a
    HERFD broadening smears each over its neighbours (CuO +5 steps: never found, ood 338);
    another refusal of ``attempt`` is left to the broadened spectrum's own path."""

    def lenient(s: Spectrum) -> object:
        try:
            return attempt(s)
        except WindowGlitch:
            raise
        except SpectrumError:
            return None

    return repaired(spectrum, lenient)[0]
