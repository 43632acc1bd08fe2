"""Augmentation that teaches models to transfer from computed to measured spectra.

Zheng et al. 2020 broadened or compressed 30 % of the spectra by up to +-5 eV over the
45 eV window; we add energy shifts (E0 error) and noise (counting statistics).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from xasflow.spectra.core import Spectrum


class AugmentParams(BaseModel):
    """Augmentation recipe; stored in the manifest so a bundle says how it was trained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    copies: int = Field(1, ge=0, description="augmented copies per training spectrum")
    stretch_fraction: float = Field(0.3, ge=0, le=1)
    stretch_ev: float = Field(5.0, ge=0, description="+- eV of stretch over stretch_span")
    stretch_span: float = Field(45.0, gt=0)
    shift_sigma: float = Field(0.5, ge=0, description="eV, Gaussian E0 error")
    noise_sigma: float = Field(0.005, ge=0, description="noise relative to the edge step")


def stretch(spectrum: Spectrum, e0: float, factor: float) -> Spectrum:
    """Scale the energy axis about E0 by ``factor`` (>1 broadens, <1 compresses features)."""
    return spectrum.with_(energy=e0 + (spectrum.energy - e0) * factor)


def augment_grid(
    y: np.ndarray,
    grid: np.ndarray,
    params: AugmentParams,
    rng: np.random.Generator,
) -> np.ndarray:
    """Augmented copies of gridded spectra ``y`` (n, m) on ``grid`` (m,), all at once.

    Each copy gets an E0 shift; a ``stretch_fraction`` of copies is also stretched by a
    factor uniform in 1 +- stretch_ev/stretch_span; then Gaussian noise. Ends are held
    constant, which is within the window's extrapolation tolerance for small shifts.
    """
    y = np.atleast_2d(y)
    out = np.empty((y.shape[0] * params.copies, y.shape[1]))
    k = 0
    for _ in range(params.copies):
        for row in y:
            factor = 1.0
            if rng.random() < params.stretch_fraction:
                factor = 1.0 + rng.uniform(-1, 1) * params.stretch_ev / params.stretch_span
            shift = rng.normal(0, params.shift_sigma) if params.shift_sigma else 0.0
            # sample the original curve at the positions the transformed curve is seen at
            src = (grid - shift) / factor
            new = np.interp(src, grid, row)
            if params.noise_sigma:
                new = new + rng.normal(0, params.noise_sigma, size=new.size)
            out[k] = new
            k += 1
    return out
