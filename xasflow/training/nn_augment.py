"""On-the-fly augmentation of network training batches, so FEFF-trained networks transfer to
measured spectra.

Measured spectra differ from FEFF ones by instrumental broadening (Gaussian, monochromator),
extra lifetime-like broadening (Lorentzian), a different E0 pick on a broader edge (a shift),
edge-step errors of the normalisation (a scale) and noise. Each training batch gets a fresh
draw of these per row (a fraction ``p`` of rows is left clean), on the gridded spectrum part
of the bundle input ``x``; the white-line scalars are recomputed from the result, as
:func:`xasflow.spectra.model_input` computes them. Nothing is copied: a draw costs a few
milliseconds per batch of 64, so every epoch sees new variants.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

#: the kernel support, eV either side (a Lorentzian's tails are truncated there and renormalised)
KERNEL_HALF_WIDTH_EV = 20.0


class NetAugment(BaseModel):
    """What each training row may undergo; all widths in eV. The default does nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p: float = Field(0.0, ge=0.0, le=1.0, description="fraction of training rows augmented")
    shift_ev: float = Field(0.0, ge=0.0, description="E0 shift, uniform in +-shift_ev")
    stretch: float = Field(0.0, ge=0.0, lt=0.5, description="energy scale about E0, 1 +- this")
    gauss_fwhm_ev: float = Field(0.0, ge=0.0, description="Gaussian FWHM, uniform in [0, max]")
    lorentz_fwhm_ev: float = Field(0.0, ge=0.0, description="Lorentzian FWHM, uniform [0, max]")
    scale_sigma: float = Field(0.0, ge=0.0, description="relative edge-step error (Gaussian)")
    noise_sigma: float = Field(0.0, ge=0.0, description="Gaussian noise, edge-step units")

    @property
    def active(self) -> bool:
        """Whether any row is ever changed."""
        widths = (self.shift_ev, self.stretch, self.gauss_fwhm_ev, self.lorentz_fwhm_ev)
        return self.p > 0 and (
            any(w > 0 for w in widths) or self.scale_sigma + self.noise_sigma > 0
        )


class BatchAugmenter:
    """Applies a :class:`NetAugment` recipe to batches of bundle input on a uniform grid."""

    def __init__(self, recipe: NetAugment, grid: np.ndarray, n_scalars: int = 2) -> None:
        g = np.array(grid, dtype=np.float64)  # a copy: the model grid is read-only
        if g.ndim != 1 or g.size < 3:
            raise ValueError("the augmentation grid must be 1-D with at least 3 points")
        step = np.diff(g)
        if not np.allclose(step, step[0], rtol=1e-6, atol=1e-9) or step[0] <= 0:
            raise ValueError("the augmentation grid must be increasing and uniform")
        if n_scalars not in (0, 2):
            raise ValueError("n_scalars must be 0 or 2 (white-line energy and height)")
        self.recipe = recipe
        self.n_points = g.size
        self.n_scalars = n_scalars
        self.step = float(step[0])
        self.grid = torch.from_numpy(g).float()
        self.half = max(1, math.ceil(KERNEL_HALF_WIDTH_EV / self.step))
        self.offsets = torch.arange(-self.half, self.half + 1, dtype=torch.float32) * self.step

    def to(self, device: torch.device) -> BatchAugmenter:
        """Keep the grid and kernel offsets on ``device`` (where the batches are); the random
        draws stay on the caller's CPU generator, so every device sees the same augmentation."""
        self.grid = self.grid.to(device)
        self.offsets = self.offsets.to(device)
        return self

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A new batch: the chosen rows augmented, the others as they were."""
        r = self.recipe
        if not r.active:
            return x
        n = x.shape[0]
        y = x[:, : self.n_points]
        dev = x.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(dev)

        pick = (torch.rand(n, generator=gen) < r.p).to(dev)
        out = y
        if r.shift_ev > 0 or r.stretch > 0:
            fixed = torch.zeros(n, device=dev)
            shift = uniform(-r.shift_ev, r.shift_ev) if r.shift_ev > 0 else fixed
            factor = uniform(1 - r.stretch, 1 + r.stretch) if r.stretch > 0 else fixed + 1
            out = self._shift(out, shift, factor)
        if r.gauss_fwhm_ev > 0:
            sigma = uniform(0.0, r.gauss_fwhm_ev) / (2 * math.sqrt(2 * math.log(2)))
            kern = torch.exp(-0.5 * (self.offsets[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
            out = self._convolve(out, kern)
        if r.lorentz_fwhm_ev > 0:
            gamma = (uniform(0.0, r.lorentz_fwhm_ev) / 2).clamp_min(1e-3)[:, None]
            out = self._convolve(out, gamma / (self.offsets[None, :] ** 2 + gamma**2))
        if r.scale_sigma > 0:
            out = out * (1 + r.scale_sigma * torch.randn(n, 1, generator=gen).to(dev))
        if r.noise_sigma > 0:
            out = out + r.noise_sigma * torch.randn(out.shape, generator=gen).to(dev)
        y_new = torch.where(pick[:, None], out, y)
        if self.n_scalars == 0:
            return y_new
        height, idx = y_new.max(dim=1)
        scalars = torch.stack([self.grid[idx], height], dim=1)
        return torch.cat([y_new, scalars.to(x.dtype)], dim=1)

    def _shift(self, y: torch.Tensor, shift: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Each row's energy axis scaled by ``factor`` about E0, then moved by ``shift`` eV
        (features appear later for positive shifts); the ends are held at their values."""
        src = (self.grid[None, :] - shift[:, None]) / factor[:, None]
        pos = (src - self.grid[0]) / self.step
        pos = pos.clamp(0, self.n_points - 1)
        lo = pos.floor().long().clamp(max=self.n_points - 2)
        frac = pos - lo
        return y.gather(1, lo) * (1 - frac) + y.gather(1, lo + 1) * frac

    def _convolve(self, y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Each row convolved with its own (unnormalised, symmetric) kernel; ends replicated."""
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        padded = F.pad(y[None], (self.half, self.half), mode="replicate")
        return F.conv1d(padded, kernel[:, None, :], groups=y.shape[0])[0]
