"""The unit of a file's energy column: one rule for the XDI and the plain column readers.

Energies are eV, or keV where the header's unit says so or, with no unit, where all lie
below :data:`KEV_BELOW` and the declared edge lies in their range times 1000; below it
without that, or with an eV unit declared, they are refused, never read as eV; so are
values declared keV that can only be eV (above :data:`KEV_ABOVE`). Each rule reads the
column's bulk: end values :func:`~xasflow.spectra.norm.stray_ends` sets apart (a DAQ's
``0 0`` padding row) decide nothing, and are left to the spectra code as stray ends.
"""

from __future__ import annotations

import numpy as np

from xasflow.spectra.core import SpectrumError
from xasflow.spectra.edges import edge_energy
from xasflow.spectra.norm import bulk_of

#: Energy units a header may give (lower case, letters only), as factors to eV.
EV_PER_UNIT = {
    "ev": 1.0,
    "electronvolt": 1.0,
    "electronvolts": 1.0,
    "kev": 1000.0,
    "kiloelectronvolt": 1000.0,
    "kiloelectronvolts": 1000.0,
}
#: Positive energies all below this are no scan of an edge xasflow tabulates in eV (the
#: lowest is Na K, 1,071 eV), while in keV they span every hard X-ray edge: such a column
#: without a unit is read as keV when the declared edge lies in its range times 1000, and
#: refused otherwise (it was read as eV, and E0 "found" at 9 eV).
KEV_BELOW = 200.0
#: Energies declared keV all above this lie past every K edge (uranium's, 115.6 keV) with
#: room to spare: such a column can only be eV, and is refused (it was multiplied by 1000).
KEV_ABOVE = 200.0


def energy_in_ev(
    source: str,
    values: np.ndarray,
    unit: str,
    element: str | None,
    edge: str,
    remedy: str,
) -> tuple[np.ndarray, str | None]:
    """The energy column ``values`` in eV, and what said its unit was not eV (None: eV).

    ``unit`` is a key of :data:`EV_PER_UNIT` or "" (none declared). SpectrumError
    ``units`` naming ``source`` for values that may only be keV with no edge to tell (ending
    with ``remedy``, what the file should say), or with an eV unit declared over them.
    The ranges are the bulk's (a keV column padded with ``0 0`` is keV, not eV from 0).
    """
    ordered = np.sort(values)  # in either order a padding row sorts to an end
    bulk = ordered[bulk_of(ordered)]  # shift- and scale-invariant: keV as eV
    lo, hi = float(bulk.min()), float(bulk.max())
    below = lo > 0.0 and hi < KEV_BELOW
    if unit:
        factor = EV_PER_UNIT[unit]
        if factor != 1.0:
            if lo > KEV_ABOVE:  # keV said of eV values: as contradictory, as refused
                raise SpectrumError(
                    "units",
                    f"{source}: energies {lo:g} to {hi:g} declared 'keV' lie above "
                    f"{KEV_ABOVE:g} keV, past every absorption edge: they can only be eV, which "
                    "the file contradicts. Correct the unit the file declares",
                )
            return values * factor, "keV (the header's unit)"
        if below:  # eV said of keV values: the file contradicts itself, no side is picked
            raise SpectrumError(
                "units",
                f"{source}: energies {lo:g} to {hi:g} declared 'eV' lie below every "
                "tabulated edge (Na K, 1071 eV): they can only be keV, which the file "
                "contradicts. Correct the unit the file declares",
            )
        return values, None
    if not below:
        return values, None
    element = element.strip().capitalize() if element is not None else None
    edge = edge.strip().upper()
    try:
        tab = edge_energy(element, edge) if element is not None else None
    except KeyError:
        tab = None
    if tab is not None and lo * 1000.0 <= tab <= hi * 1000.0:
        return values * 1000.0, f"keV (the {element} {edge} edge lies in the values x 1000)"
    why = (
        f"read as keV they do not hold the {element} {edge} edge at {tab:.1f} eV either"
        if tab is not None
        else "keV? no element was given to tell"
    )
    raise SpectrumError(
        "units",
        f"{source}: energies {lo:g} to {hi:g} with no unit in the header: in eV they lie "
        f"below every tabulated edge (Na K, 1071 eV); {why}. {remedy}",
    )
