"""The grid a recommended region is measured on: steps constant in photoelectron wavenumber
above the edge, regions cut into k pieces, tidy numbers, regions moved between energy
frames and held to the monochromator's range (see :mod:`xasflow.daemon.recommend`, which
places them)."""

from __future__ import annotations

import dataclasses
import math

from xasflow.daemon.recommend_types import RecommenderConfig, Region

__all__ = [
    "clipped_region",
    "finest_step",
    "k_pieces",
    "moved_region",
    "tidy_region",
    "within_range",
]

_EV_PER_K2 = 3.80998  # hbar^2 / 2 m_e in eV * angstrom^2: E = 3.81 k^2


def finest_step(rel: float, config: RecommenderConfig) -> float:
    """The finest useful step (eV) at ``rel`` eV above E0: fine_step, or constant k steps."""
    fine = config.steps()[0]
    if rel <= 0 or config.k_step <= 0:
        return fine
    k = math.sqrt(rel / _EV_PER_K2)
    return max(fine, 2.0 * _EV_PER_K2 * k * config.k_step)


def k_pieces(lo: float, hi: float, config: RecommenderConfig) -> list[tuple[float, float]]:
    """``lo..hi`` (eV above E0) cut where the finest step has grown by ``piece_growth``.

    Above the fine-step floor the finest step grows as sqrt(E - E0) (constant steps in k),
    so a piece ends where E - E0 has grown by ``piece_growth ** 2``: far above the edge a
    region is measured on the coarser grid its features allow, not at the step of its start.
    No piece is narrower than the fine step (a fine step and a coarse ``k_step`` put the floor
    within meV of E0, where pieces would round to nothing).
    """
    g2 = config.piece_growth**2
    fine = config.steps()[0]
    floor = math.inf
    if config.k_step > 0:
        floor = _EV_PER_K2 * (fine / (2.0 * _EV_PER_K2 * config.k_step)) ** 2
    pieces: list[tuple[float, float]] = []
    a = lo
    while g2 > 1.0:
        b = floor if a < floor else a * g2  # the fine-step floor is one piece
        b = max(b, a + fine)
        if b >= hi or hi - b < 0.5 * (b - a):  # a short tail joins the piece before it
            break
        pieces.append((a, b))
        a = b
    pieces.append((a, hi))
    return pieces


def moved_region(region: Region, by: float) -> Region:
    """``region`` moved ``by`` eV (its step, dwell and reason as they were)."""
    return dataclasses.replace(
        region, start=round(region.start + by, 3), stop=round(region.stop + by, 3)
    )


def clipped_region(region: Region, lo: float, hi: float) -> tuple[Region, bool]:
    """``region`` within the monochromator's range ``lo..hi`` eV: (as it was, True) inside,
    (clipped on a tidy grid, True) reaching out, (with the reason why, False) wholly outside
    (or within a meV of it: regions are written to the meV, rounded inwards here)."""
    where = f"the monochromator's range {lo:g}-{hi:g} eV"
    start = max(region.start, math.ceil(lo * 1e3) / 1e3)
    stop = min(region.stop, math.floor(hi * 1e3) / 1e3)
    if stop - start < 1e-3:
        return dataclasses.replace(
            region, reason=f"{region.reason}; outside {where}: dropped"
        ), False
    if (start, stop) == (region.start, region.stop):
        return region, True
    why = f"{region.reason}; clipped to {where}"
    return tidy_region(
        region.name, start, stop, region.step, region.dwell, why, region.importance
    ), True


def within_range(
    regions: list[Region], rescan: Region | None, lo: float, hi: float
) -> tuple[list[Region], Region | None, list[Region]]:
    """(regions, rescan, dropped regions) held to the monochromator's range ``lo..hi`` eV
    (:func:`clipped_region`); a rescan wholly outside is None."""
    clipped = [clipped_region(r, lo, hi) for r in regions]
    if rescan is not None:
        rescan, inside = clipped_region(rescan, lo, hi)
        rescan = rescan if inside else None
    return [r for r, ok in clipped if ok], rescan, [r for r, ok in clipped if not ok]


def tidy_region(
    name: str, start: float, stop: float, step: float, dwell: float, reason: str, w: float
) -> Region:
    """A region with tidy numbers: the step shrunk so it divides the span evenly."""
    start, stop = round(start, 3), round(stop, 3)
    n = max(1, math.ceil((stop - start) / step - 1e-3))
    return Region(
        name=name,
        start=start,
        stop=stop,
        step=round((stop - start) / n, 6),
        dwell=round(dwell, 4),
        reason=reason,
        importance=round(float(w), 4),
    )
