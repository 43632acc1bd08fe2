"""mu(E) from detector channels, and energy alignment with a reference foil."""

from __future__ import annotations

from typing import Literal

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError, nonfinite_detail
from xasflow.spectra.edges import edge_energy

Mode = Literal["transmission", "fluorescence", "reference"]


def mu_from_channels(
    mode: Mode,
    i0: np.ndarray,
    signal: np.ndarray,
    names: tuple[str, str] = ("I0", "signal"),
    energy: np.ndarray | None = None,
) -> np.ndarray:
    """Transmission ln(I0/It), fluorescence If/I0, or reference ln(It/Ir) (``i0`` is then It).

    ``names`` label the two channels in error messages (e.g. a file's column names), and
    ``energy`` (eV, optional) says where a NaN point is.
    """
    i0 = np.asarray(i0, dtype=np.float64)
    signal = np.asarray(signal, dtype=np.float64)
    if i0.shape != signal.shape:
        raise SpectrumError("bad_channel", f"channel lengths differ: {i0.shape} vs {signal.shape}")
    if not (np.all(np.isfinite(i0)) and np.all(np.isfinite(signal))):
        bad0, bad1 = ~np.isfinite(i0), ~np.isfinite(signal)
        which = " and ".join(n for n, b in zip(names, (bad0, bad1), strict=True) if b.any())
        noun = (f"point of {which}", f"points of {which}")
        raise SpectrumError("not_finite", nonfinite_detail(bad0 | bad1, energy, noun))
    if mode not in ("transmission", "fluorescence", "reference"):
        raise SpectrumError("bad_channel", f"unknown mode {mode!r}")
    checked = [(names[0], i0)] if mode == "fluorescence" else [(names[0], i0), (names[1], signal)]
    for name, values in checked:
        bad = int(np.count_nonzero(values <= 0))
        if bad:
            raise SpectrumError(
                "bad_channel",
                f"{name} has {bad} non-positive values ({mode} needs positive intensities)",
            )
    if mode == "fluorescence":
        return signal / i0
    return np.log(i0 / signal)


def alignment_shift(
    reference: Spectrum, element: str, edge: str = "K", search: float = 40.0
) -> float:
    """eV to add to the energy axis so the reference foil's E0 lands on the tabulated edge.

    SpectrumError ``no_edge`` when the foil's steepest rises all stand on single points
    (glitches, ``find_e0``'s ``strict``): a foil shifted onto a glitch's flank moved 15-30 eV.
    The foil's E0 is its first strong rise (``find_e0``'s ``foil``,
    :data:`~xasflow.spectra.e0.FOIL_LOWEST`): the tabulated edge is a metal's first inflection,
    and a noisy Ni or Fe foil's second derivative peak was often the highest.
    """
    from xasflow.spectra.e0 import find_e0

    ref = reference.with_(element=element, edge=edge)
    return edge_energy(element, edge) - find_e0(ref, search, None, True, True)


def align(spectrum: Spectrum, shift: float) -> Spectrum:
    """Shift a spectrum's energy axis by ``shift`` eV, recording it in ``meta['energy_shift']``."""
    meta = dict(spectrum.meta)
    meta["energy_shift"] = meta.get("energy_shift", 0.0) + shift
    return spectrum.with_(energy=spectrum.energy + shift, meta=meta, e0=None)
