"""Absolute edge position as a chemical shift, computed the same way for FEFF and measured spectra.

The oxidation state moves the edge by a few eV, but a model on E0-relative grids never sees
where the edge is. A measured spectrum calibrated to a metal foil has its Fermi level at the
foil's tabulated edge (Cu K 8978.9 eV: the metal's edge onset *is* its Fermi level); a FEFF
spectrum's absolute ``omega`` axis scatters by several eV between runs, but its own Fermi level
on that axis (``Mu`` plus the ``omega - e`` offset, :class:`xasflow.adapters.feff_energy.
FeffEnergies`, carried in ``meta['feff_fermi_absolute']``) is the same physical reference. So
the chemical shift is the edge position (where normalised mu first crosses a level) minus the
spectrum's Fermi-level reference, on both sides.
"""

from __future__ import annotations

import math

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.e0 import find_e0
from xasflow.spectra.edges import edge_energy
from xasflow.spectra.normalization import normalize
from xasflow.spectra.process import PrepParams

#: meta key holding a FEFF spectrum's Fermi level on its absolute omega axis (eV)
FERMI_KEY = "feff_fermi_absolute"
#: the crossing is searched within this range around E0 (eV): the rise, not a later dip
SEARCH = (-25.0, 30.0)


def edge_crossing(
    spectrum: Spectrum, prep: PrepParams, e0: float | None = None, level: float = 0.5
) -> float:
    """Absolute energy (eV) where the normalised mu first rises through ``level``.

    Normalisation is :func:`xasflow.spectra.normalize` with ``prep`` (edge step 1), so the
    answer does not depend on the spectrum's scale; linear interpolation between the two
    bracketing points. SpectrumError ``no_edge`` when mu never reaches ``level`` near E0.
    """
    if e0 is None:
        e0 = spectrum.e0 if spectrum.e0 is not None else find_e0(spectrum, prep.e0_search)
    y, _ = normalize(spectrum, e0, prep)
    energy = spectrum.energy
    near = np.flatnonzero((energy >= e0 + SEARCH[0]) & (energy <= e0 + SEARCH[1]))
    if near.size < 2:
        raise SpectrumError("no_edge", f"no data within {SEARCH} eV of E0 {e0:.1f}")
    lo, hi = int(near[0]), int(near[-1])
    above = np.flatnonzero(y[lo : hi + 1] >= level)
    if above.size == 0:
        raise SpectrumError("no_edge", f"normalised mu never reaches {level:g} near E0")
    i = lo + int(above[0])
    if i == 0 or y[i - 1] >= level:
        return float(energy[i])  # already above the level where the data start
    frac = (level - y[i - 1]) / (y[i] - y[i - 1])
    return float(energy[i - 1] + frac * (energy[i] - energy[i - 1]))


def fermi_reference(spectrum: Spectrum) -> float:
    """The Fermi level on the spectrum's energy axis (eV).

    FEFF spectra: ``meta['feff_fermi_absolute']``. Measured spectra: the tabulated edge of the
    element, which is where a foil calibration puts the metal's edge onset (its Fermi level);
    the spectrum must therefore be foil-calibrated (see :func:`xasflow.spectra.alignment_shift`).
    """
    value = spectrum.meta.get(FERMI_KEY)
    if value is not None and math.isfinite(float(value)):
        return float(value)
    if spectrum.element is None:
        raise SpectrumError("no_element", "a chemical shift needs the absorbing element")
    try:
        return edge_energy(spectrum.element, spectrum.edge)
    except KeyError as exc:
        raise SpectrumError("no_edge", str(exc)) from None


def chemical_shift(
    spectrum: Spectrum, prep: PrepParams, e0: float | None = None, level: float = 0.5
) -> float:
    """Edge position above the Fermi level (eV): :func:`edge_crossing` - :func:`fermi_reference`.

    The one scalar that means the same for a FEFF run and a foil-calibrated measurement.
    """
    return edge_crossing(spectrum, prep, e0, level) - fermi_reference(spectrum)
