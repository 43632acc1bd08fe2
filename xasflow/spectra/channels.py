"""mu(E) from detector channels, and energy alignment with a reference foil."""

from __future__ import annotations

from typing import Literal

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import edge_energy

Mode = Literal["transmission", "fluorescence", "reference"]


def mu_from_channels(mode: Mode, i0: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """Transmission ln(I0/It), fluorescence If/I0, or reference ln(It/Ir) (``i0`` is then It)."""
    i0 = np.asarray(i0, dtype=np.float64)
    signal = np.asarray(signal, dtype=np.float64)
    if i0.shape != signal.shape:
        raise SpectrumError("bad_channel", f"channel lengths differ: {i0.shape} vs {signal.shape}")
    if not (np.all(np.isfinite(i0)) and np.all(np.isfinite(signal))):
        raise SpectrumError("not_finite", "a detector channel holds NaN or infinite values")
    if mode == "fluorescence":
        if np.any(i0 <= 0):
            raise SpectrumError("bad_channel", "I0 is not positive everywhere")
        return signal / i0
    if np.any(i0 <= 0) or np.any(signal <= 0):
        raise SpectrumError("bad_channel", f"{mode} needs positive intensities for the logarithm")
    if mode in ("transmission", "reference"):
        return np.log(i0 / signal)
    raise SpectrumError("bad_channel", f"unknown mode {mode!r}")


def alignment_shift(
    reference: Spectrum, element: str, edge: str = "K", search: float = 40.0
) -> float:
    """eV to add to the energy axis so the reference foil's E0 lands on the tabulated edge."""
    from xasflow.spectra.process import find_e0

    ref = reference.with_(element=element, edge=edge)
    return edge_energy(element, edge) - find_e0(ref, search)


def align(spectrum: Spectrum, shift: float) -> Spectrum:
    """Shift a spectrum's energy axis by ``shift`` eV, recording it in ``meta['energy_shift']``."""
    meta = dict(spectrum.meta)
    meta["energy_shift"] = meta.get("energy_shift", 0.0) + shift
    return spectrum.with_(energy=spectrum.energy + shift, meta=meta, e0=None)
