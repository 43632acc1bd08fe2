"""HERFD spectra brought to the resolution of conventional XANES (and of FEFF with core hole).

High-energy-resolution fluorescence detection selects one emission line with a crystal
analyser, so the spectrum is broadened by an effective width well below the K core-hole
width: for Kalpha1 detection ``1/G_eff^2 = 1/G_K^2 + 1/G_L3^2`` (Hamalainen et al., PRL 67,
2850 (1991); Carra, Fabrizio & Thole, PRL 74, 3700 (1995)). A model trained on spectra with
the full ``G_K`` reads such sharp features wrongly, so a declared HERFD spectrum is convolved
with a Lorentzian of ``G_K - G_eff`` (Lorentzian widths add) before it is prepared. For Cu K
(G_K 1.55 eV, G_L3 0.56 eV; Krause & Oliver 1979) that is 1.02 eV.

A spectrum is HERFD when ``meta["herfd"]`` is true (or a number: the FWHM to use, eV); the
XDI adapter sets it from the file, a caller from its own configuration.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import core_hole_width

#: L3-level natural widths (eV), Krause & Oliver, J. Phys. Chem. Ref. Data 8, 329 (1979),
#: for the elements whose Kalpha1 HERFD is common.
L3_WIDTHS: dict[str, float] = {
    "Mn": 0.32, "Fe": 0.36, "Co": 0.43, "Ni": 0.48, "Cu": 0.56, "Zn": 0.65,
}  # fmt: skip

Shape = Literal["lorentzian", "gaussian"]

#: Declared HERFD widths accepted (eV), wherever they come from (configuration, command line,
#: a start document, a file). Below 0.2 eV the broadening is under any monochromator's
#: resolution, while its grid (a tenth of the width) and cost grow without bound (1e-4 eV
#: took 15 s per spectrum); above 50 eV it is no core-hole width.
FWHM_RANGE = (0.2, 50.0)


def check_fwhm(value: float) -> float:
    """``value`` as a declared HERFD FWHM in eV; ValueError outside :data:`FWHM_RANGE`."""
    lo, hi = FWHM_RANGE
    if not lo <= value <= hi:  # NaN too
        raise ValueError(f"a HERFD FWHM must be within {lo:g}..{hi:g} eV, not {value!r}")
    return float(value)


def herfd_fwhm(element: str | None, edge: str = "K") -> float | None:
    """Lorentzian FWHM (eV) that takes a Kalpha1-HERFD spectrum to the full core-hole width.

    ``G_K - (G_K^-2 + G_L3^-2)^-1/2``; None when the widths are not tabulated (then the
    caller must give a width).
    """
    gk = core_hole_width(element, edge)
    gl = L3_WIDTHS.get((element or "").strip().capitalize())
    if gk is None or gl is None:
        return None
    return gk - (gk**-2 + gl**-2) ** -0.5


def broaden(spectrum: Spectrum, fwhm_ev: float, shape: Shape = "lorentzian") -> Spectrum:
    """Convolve mu(E) with a unit-area Lorentzian or Gaussian of ``fwhm_ev`` (same energies).

    Computed on a uniform grid (a tenth of the FWHM, at most 0.1 eV) with the ends held
    constant, then interpolated back; ``meta["broadened_fwhm"]`` records what was done.
    """
    if not fwhm_ev > 0:
        raise SpectrumError("bad_broadening", f"FWHM must be positive, got {fwhm_ev!r} eV")
    energy, mu = spectrum.energy, spectrum.mu
    step = min(0.1, fwhm_ev / 10.0)
    reach = (60.0 if shape == "lorentzian" else 3.0) * fwhm_ev  # 99.5 % of a Lorentzian
    offsets = np.arange(-round(reach / step), round(reach / step) + 1) * step
    if shape == "lorentzian":
        half = 0.5 * fwhm_ev
        kernel = half / (offsets**2 + half**2)
    elif shape == "gaussian":
        sigma = fwhm_ev / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    else:
        raise SpectrumError("bad_broadening", f"shape must be lorentzian or gaussian: {shape!r}")
    kernel /= kernel.sum()
    grid = np.arange(energy[0], energy[-1] + step / 2, step)
    pad = offsets.size // 2
    values = np.interp(grid, energy, mu)
    padded = np.concatenate((np.full(pad, values[0]), values, np.full(pad, values[-1])))
    smooth = np.convolve(padded, kernel, mode="valid")
    meta = dict(spectrum.meta)
    meta["broadened_fwhm"] = meta.get("broadened_fwhm", 0.0) + fwhm_ev
    return spectrum.with_(mu=np.interp(energy, grid, smooth), meta=meta)


def herfd_declared(value: Any) -> Any:
    """A start document's ``herfd`` (or ``calculated``) as a declaration: None (null, "")
    when nothing is declared, so the daemon's own setting applies; true/false and FWHM numbers also as
    the text metadata templates often hold ("false", "True", "1.5"); anything else as given
    (the daemon rejects it with a reason)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null"):
            return None
        if text in ("true", "false"):
            return text == "true"
        try:
            return float(text)
        except ValueError:
            return value
    return value


def herfd_width(spectrum: Spectrum) -> float | None:
    """The FWHM a spectrum's HERFD declaration asks for, or None when it is not HERFD.

    ``meta["herfd"]`` true means the tabulated width for its element (SpectrumError
    ``herfd_width`` when there is none), a number means that width; a spectrum already
    broadened (``meta["broadened_fwhm"]``) is not broadened again.
    """
    declared = spectrum.meta.get("herfd")
    if not declared or spectrum.meta.get("broadened_fwhm"):
        return None
    if not isinstance(declared, bool) and isinstance(declared, int | float):
        try:
            return check_fwhm(declared)
        except ValueError as exc:
            raise SpectrumError("bad_broadening", str(exc)) from None
    width = herfd_fwhm(spectrum.element, spectrum.edge)
    if width is None:
        raise SpectrumError(
            "herfd_width",
            f"no tabulated HERFD broadening for {spectrum.element} {spectrum.edge}; "
            "give the FWHM in eV (meta['herfd'] = width)",
        )
    return width
