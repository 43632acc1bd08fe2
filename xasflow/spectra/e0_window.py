"""Where the E0 search looks and which points it reads: the search window around the
tabulated edge, why a window cannot hold E0, and the scan's points less strays and lone
spikes. Shared by :func:`~xasflow.spectra.e0.find_e0` and
:func:`~xasflow.spectra.e0_batch.find_e0_batch`.
"""

from __future__ import annotations

import numpy as np

from xasflow.spectra.core import SpectrumError
from xasflow.spectra.edges import edge_energy
from xasflow.spectra.norm import bulk_of
from xasflow.spectra.outliers import lone_spikes

__all__ = ["SHORT_OF_EDGE", "no_edge_detail", "scan_points", "search_window", "window_error"]

#: eV: data that end this far below the tabulated edge hold no edge of that element (a
#: pre-edge slope would otherwise pass for E0 and fail later as "data end at E0+15 eV").
#: Chemical shifts and calibration offsets move an edge by a few eV, and any bundle needs data
#: far above E0 (its model window, its post-edge fit), so such data could never be prepared.
SHORT_OF_EDGE = 10.0


def no_edge_detail(energy: np.ndarray, tab: float, element: str | None, edge: str) -> str:
    """Why a spectrum on ``energy`` (eV, increasing) has no data near its tabulated edge
    ``tab``, with the likely cause (keV, or a scan that stops short of the edge)."""
    first, last = float(energy[0]), float(energy[-1])
    text = (
        f"no data near the {element} {edge} edge at {tab:.1f} eV: "
        f"the data cover {first:.6g} to {last:.6g} eV"
    )
    if first <= 0.0:
        return text + " (energies relative to E0? absolute eV are needed)"
    if first * 1000 <= tab <= last * 1000:
        return text + " (energies in keV? the edge lies in their range times 1000)"
    if last < tab:
        return text + ", below the edge"
    if first > tab:
        return text + ", above the edge"
    return text


def window_error(
    energy: np.ndarray, lo: float, hi: float, element: str | None, edge: str, tab: float | None
) -> SpectrumError | None:
    """Why the window ``lo``..``hi`` eV cannot hold E0 (None: it can): under 2 eV wide, or
    the data end more than :data:`SHORT_OF_EDGE` eV below the tabulated edge ``tab``."""
    if hi - lo >= 2.0 and (tab is None or hi >= tab - SHORT_OF_EDGE):
        return None
    if tab is not None:
        return SpectrumError("no_edge", no_edge_detail(energy, tab, element, edge))
    near = f" near the {element} {edge} edge" if element else ""
    return SpectrumError(
        "no_edge", f"only {hi - lo:.3g} eV of data{near} to look for E0 in (at least 2 eV needed)"
    )


def search_window(
    energy: np.ndarray, element: str | None, edge: str, search: float
) -> tuple[float, float, float | None]:
    """The eV window E0 is looked for in, and the tabulated edge it was cut around (None:
    no element, no such edge or no ``search``: the whole scan)."""
    lo, hi = float(energy[0]), float(energy[-1])
    if element is None or search <= 0:
        return lo, hi, None
    try:
        tab = edge_energy(element, edge)
    except KeyError:
        return lo, hi, None
    return max(lo, tab - search), min(hi, tab + search), tab


def scan_points(
    energy: np.ndarray, mu: np.ndarray, bulk: slice | None = None
) -> tuple[slice, np.ndarray | None]:
    """The points of rows ``mu`` (n, m) on ``energy`` that the E0 search uses: (the columns
    of the scan's bulk, None or per row a mask over them that leaves out lone spikes).

    As the normalisation sets them apart, the points :func:`~xasflow.spectra.norm.stray_ends`
    finds at odd energies are no data, and a lone spike in mu
    (:func:`~xasflow.spectra.outliers.lone_spikes`) is none either: the steep flanks of
    either passed for the edge. A scan without them keeps every point (the same E0).
    ``bulk``: the scan's bulk when the caller has it (None: found here).
    """
    bulk = bulk_of(energy) if bulk is None else bulk
    return bulk, lone_spikes(mu[:, bulk])
