"""Choosing a broadening from data: which FWHM turns a sharp spectrum into a reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xasflow.spectra.core import Spectrum
from xasflow.spectra.e0 import find_e0
from xasflow.spectra.herfd import broaden
from xasflow.spectra.normalization import normalize
from xasflow.spectra.process import PrepParams


def match_broadening(
    sharp: Spectrum,
    reference: Spectrum,
    fwhms: Sequence[float],
    window: tuple[float, float] = (-10.0, 50.0),
) -> tuple[float, list[float]]:
    """The FWHM in ``fwhms`` that best turns ``sharp`` into ``reference`` (RMS over ``window``).

    Both are edge-step normalised (default :class:`PrepParams`) and compared relative to
    their own E0 on a 0.2 eV grid; returns (best FWHM, RMS per FWHM). Run it on a HERFD
    spectrum and a conventional one of the same compound to choose the width from data.
    """
    params = PrepParams()
    grid = np.arange(window[0], window[1], 0.2)

    def on_grid(s: Spectrum) -> np.ndarray:
        e0 = find_e0(s, params.e0_search)
        y, _ = normalize(s, e0, params)
        return np.interp(grid, s.energy - e0, y)

    target = on_grid(reference)
    rms = []
    for fwhm in fwhms:
        y = on_grid(broaden(sharp, fwhm) if fwhm > 0 else sharp)
        rms.append(float(np.sqrt(np.mean((y - target) ** 2))))
    return float(fwhms[int(np.argmin(rms))]), rms
