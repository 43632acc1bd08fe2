"""Where a measured scan must start: on a pre-edge, below E0 and below its tabulated edge.

A scan that starts on or after its edge has no pre-edge to subtract, and the E0 search can
land on a later post-edge rise from which the data seem to start far enough below "E0"; the
tabulated edge, on the axis prepared, does not move with the search. Used by
:func:`~xasflow.spectra.process.prepare` and the batched normalisation alike.
"""

from __future__ import annotations

import numpy as np

from xasflow.spectra.edges import edge_energy
from xasflow.spectra.norm import leading_strays

__all__ = [
    "MIN_PRE_EDGE",
    "MIN_TAB_PRE_EDGE",
    "measured_start_why",
    "no_pre_edge",
    "tabulated_edge",
]


#: eV of data a spectrum declared measured (``meta["calculated"] is False``: XDI files, and
#: the daemon's spectra unless ``analysis.calculated`` or the run's start says otherwise)
#: needs below E0, and below its tabulated edge: a scan that starts later has no pre-edge to
#: subtract, and its "E0" may be a rise after the edge. The library's Cu foil cut to start
#: at its edge gave an E0 10.8 eV too high (10.3 eV cut 0.5 eV later), cut 5 eV above it
#: 11 eV too high: 10 eV let the first through. Cut 6-20 eV above the edge, E0 lands 25-40
#: eV up on a post-edge rise and the data start "far below E0" (Fe foil cut at 7130.9 eV:
#: E0 7147.0): the tabulated edge, on the axis prepared (aligned where a foil shift was
#: applied), does not move with the search. Every XDI file of the shared library starts
#: 18.9 eV or more below E0 and 19.0 eV or more below its tabulated edge (scans are
#: planned around the tabulated edge on the monochromator's own axis).
#: (A test of how steeply the data rise at their start caught the cut at the edge but
#: not 0.5 eV later, and refused 2.5 % of flat pre-edges with 10 % point noise: dropped.)
#: Undeclared spectra (two-column files of mu; a text file of detector channels is declared
#: measured) are left to ``is_calculated``: its guess can take a calculation cropped near its
#: edge for a measurement.
MIN_PRE_EDGE = 15.0
#: eV a measured scan's data must start below its tabulated edge (on the axis prepared). A
#: scan starting above its edge is what this catches; 15 eV, as below E0, also refused good
#: scans: XANES scans starting 20-30 eV below an E0 that a chemical shift puts 10-20 eV above
#: the tabulated edge (Cr2O3, Mn and As oxides: 139 of 267 library scans cut to start at
#: E0-20), and scans on a monochromator reading 4-10 eV high with no foil. At 5 eV the scans
#: cut to start 0-20 eV above their E0 are refused as at 15 (all but 7 of 2,959, the same
#: Au/Pb L1 foils with no tabulated edge; 349 accepted with no such rule).
MIN_TAB_PRE_EDGE = 5.0


def tabulated_edge(element: str | None, edge: str | None) -> float | None:
    """The tabulated energy of ``element``'s ``edge`` (eV), None where none is tabulated:
    what a measured scan's start is also held to (:func:`measured_start_why`)."""
    if element is None or edge is None:
        return None
    try:
        return edge_energy(element, edge)
    except KeyError:
        return None


def measured_start_why(
    rel: np.ndarray, lead: int | None = None, tab: np.ndarray | None = None
) -> list[str | None]:
    """Per row of a measured spectrum on ``rel`` (energies minus E0, rows of one axis
    shifted: (n, m) ascending), why its data do not start on a pre-edge (None where they
    do): fewer than :data:`MIN_PRE_EDGE` eV below E0, or (``tab``: each row's tabulated
    edge minus its E0, (n,)) fewer than :data:`MIN_TAB_PRE_EDGE` below the tabulated edge,
    which a found E0 on a post-edge rise cannot move. The data start at the scan's bulk (row 0's
    :func:`~xasflow.spectra.norm.leading_strays` left out, as the pre-edge fit leaves them
    out; ``lead``: their number when known): a stray point far below E0 is no pre-edge."""
    s = int(leading_strays(rel[0])[0]) if lead is None else lead
    start = rel[:, s]
    out = [no_pre_edge(float(x)) if x > -MIN_PRE_EDGE else None for x in start.tolist()]
    if tab is not None:
        above = (start - tab).tolist()
        for i, x in enumerate(above):
            if out[i] is None and x > -MIN_TAB_PRE_EDGE:
                out[i] = no_pre_edge(float(start[i]), x)
    return out


def no_pre_edge(start: float, from_tab: float | None = None) -> str:
    """Why a measured spectrum whose data start at E0 + ``start`` eV (``from_tab``: and at
    the tabulated edge + this) is refused."""
    if from_tab is None:
        return (
            f"data start at E0{start:+.1f} eV: a measured scan needs {MIN_PRE_EDGE:g} eV or "
            "more below the edge (its pre-edge); one that starts later may not hold the edge "
            "at all"
        )
    side = "above" if from_tab >= 0 else "below"
    return (
        f"data start {abs(from_tab):.1f} eV {side} the tabulated edge (E0 found "
        f"{from_tab - start:+.1f} eV from it, perhaps on a rise after the edge): a measured "
        f"scan needs to start {MIN_TAB_PRE_EDGE:g} eV or more below the tabulated edge and "
        f"{MIN_PRE_EDGE:g} eV below E0; if the monochromator reads high, align with a "
        "reference foil"
    )
