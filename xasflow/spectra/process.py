"""E0, normalisation and resampling onto a model grid: the one preprocessing path.

Training and the daemon both call :func:`prepare` with the :class:`PrepParams` stored in a
model bundle's manifest, so a spectrum is treated identically offline and online. The
normalisation step (Larch's conventions or the legacy windows, and its refusals) is
:mod:`~xasflow.spectra.normalization`; this module holds the settings, the order of the
steps and the model grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from xasflow.spectra.anchor import centroid
from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.e0 import find_e0
from xasflow.spectra.e0_rivals import rival_origins
from xasflow.spectra.glitches import repaired, repaired_first
from xasflow.spectra.herfd import broaden, herfd_width
from xasflow.spectra.norm import bulk_of
from xasflow.spectra.normalization import normalize
from xasflow.spectra.quality import edge_snr, gated_step, weak_edge
from xasflow.spectra.scan_start import tabulated_edge


class PrepParams(BaseModel):
    """How a spectrum becomes a model input; stored verbatim in a bundle manifest.

    ``method="larch"`` (the default) normalises with Larch ``pre_edge``'s conventions
    (``pre1``/``pre2``/``norm1``/``norm2``/``nnorm``; None = Larch's rule for the scan).
    ``method="legacy"`` is the fixed-window fit of bundles trained before it existed
    (``pre_edge``, ``post_edge``, ``post_edge_degree``): a manifest without ``method``
    loads as legacy so such a bundle behaves as it did.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["legacy", "larch"] = "larch"

    window_start: float = Field(-3.5, description="grid start relative to its origin, eV")
    window_stop: float = Field(56.5, description="grid stop relative to its origin, eV")
    align: Literal["e0", "centroid"] = Field(
        "e0",
        description="the grid's origin: E0, or the centroid of the edge's rise "
        "(xasflow.spectra.anchor: continuous where E0 jumps between two rises)",
    )
    align_window: float = Field(15.0, gt=0.0, description="centroid: eV either side of E0")
    align_power: float = Field(2.0, gt=0.0, description="centroid: the slope's weight exponent")
    e0_rivals: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="also grid the spectrum on each rise near E0 at least this fraction as "
        "steep (xasflow.spectra.e0_rivals); a bundle averages its graphs' outputs over them "
        "(None: E0's grid only)",
    )
    e0_rival_window: float = Field(10.0, gt=0.0, description="e0_rivals: eV either side of E0")
    n_points: int = Field(200, ge=8)
    normalization: Literal["edge_step", "max"] = "edge_step"
    pre_edge: tuple[float, float] = (-150.0, -30.0)
    post_edge: tuple[float, float] = (40.0, 110.0)
    post_edge_degree: int = Field(2, ge=0, le=3)
    max_extrapolation: float = Field(
        2.0, ge=0.0, description="eV the grid may extend past the data (held constant)"
    )
    e0_search: float = Field(
        40.0, description="search E0 within +-this of the tabulated edge (when known), eV"
    )
    pre1: float | None = Field(None, description="larch: pre-edge start rel. E0, eV")
    pre2: float | None = Field(None, description="larch: pre-edge end rel. E0, eV")
    norm1: float | None = Field(None, description="larch: post-edge start rel. E0, eV")
    norm2: float | None = Field(None, description="larch: post-edge end rel. E0, eV")
    nnorm: int | None = Field(None, ge=0, le=3, description="larch: post-edge degree")
    weighting: Literal["points", "energy"] = Field(
        "energy",
        description="larch: post-edge fit weighing energy (trapezoid weights, independent of "
        "the scan's sampling) or the data points (exactly as Larch)",
    )
    calc_start: float = Field(
        -25.0,
        description="larch: an undeclared spectrum starting above E0+this eV, with its first "
        "value in [0, calc_floor*max(mu)], is a calculation (FEFF: no pre-edge, no background)",
    )
    calc_floor: float = Field(0.08, ge=0.0, description="larch: see calc_start")
    edge_tail: bool = Field(
        True,
        description="larch: take the edge's own arctan (core-hole width) out of both fits: "
        "its 1/E tail under a short pre-edge and its slow approach to 1 above E0, so short "
        "scans and FEFF spectra get the step a long scan gets",
    )
    min_post_edge: float = Field(
        45.0,
        description="larch: reject (no_post_edge) data ending below E0+this: the post-edge "
        "line would run through the white line, eV",
    )
    max_norm: float = Field(
        10.0, gt=1.0, description="larch: reject when |normalised mu| in the window exceeds it"
    )
    min_edge_snr: float = Field(
        5.0,
        ge=0.0,
        description="reject (weak_edge) a spectrum whose edge step is below this many times "
        "its point noise (0: never): noise or a smooth background, not an edge",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_manifest(cls, data: Any) -> Any:
        """A stored manifest from before ``method`` existed means the legacy normalisation."""
        if isinstance(data, dict) and "method" not in data and "post_edge" in data:
            return {**data, "method": "legacy"}
        return data

    @model_validator(mode="after")
    def _check_window(self) -> PrepParams:
        if self.window_stop <= self.window_start:
            raise ValueError("window_stop must be above window_start")
        if self.e0_rivals is not None and self.align != "e0":
            raise ValueError("e0_rivals grids on the rises near E0: it needs align 'e0'")
        return self

    @property
    def grid(self) -> np.ndarray:
        """The model grid relative to its origin (E0 unless :attr:`align`), eV (one read-only
        array per window, made once)."""
        return _grid(self.window_start, self.window_stop, self.n_points)

    def origin(self, energy: np.ndarray, mu: np.ndarray, e0: float) -> float:
        """Where the model grid starts counting for a spectrum whose edge is at ``e0``: E0
        itself, or the centroid of its rise (:func:`~xasflow.spectra.anchor.centroid`)."""
        if self.align == "e0":
            return float(e0)
        return centroid(energy, mu, e0, self.align_window, self.align_power)


@functools.lru_cache(maxsize=32)
def _grid(start: float, stop: float, n: int) -> np.ndarray:
    """``linspace`` once per window: every spectrum of a bundle is gridded on it."""
    grid = np.linspace(start, stop, n)
    grid.setflags(write=False)
    return grid


@dataclass(frozen=True)
class Prepared:
    """A spectrum on the model grid: ``y`` normalised mu, plus what was found on the way."""

    y: np.ndarray
    e0: float
    edge_step: float
    extrapolated: float  # eV of the grid that lay outside the data
    spectrum: Spectrum
    #: the spectrum before HERFD broadening (``spectrum`` is the broadened one); None: not
    #: broadened
    unbroadened: Spectrum | None = None
    #: ``y`` again with the grid on each rival rise (``PrepParams.e0_rivals``), normalised at
    #: E0 as ``y`` is; empty for a clear edge or without ``e0_rivals``
    alternates: tuple[np.ndarray, ...] = ()

    @property
    def measured(self) -> Spectrum:
        """The spectrum as recorded (aligned, not broadened): where its point noise is."""
        return self.spectrum if self.unbroadened is None else self.unbroadened


def resample(
    energy_rel: np.ndarray, y: np.ndarray, params: PrepParams, bulk: slice | None = None
) -> tuple[np.ndarray, float]:
    """Linear interpolation onto the model grid; ends held constant up to ``max_extrapolation``.

    The scan's bulk is gridded: points :func:`~xasflow.spectra.norm.stray_ends` sets apart
    neither cover the window nor are interpolated towards (a stray keV out is no data there).
    ``bulk``: the scan's bulk (:func:`~xasflow.spectra.norm.bulk_of`), None: found here.
    """
    bulk = bulk_of(energy_rel) if bulk is None else bulk
    energy_rel, y = energy_rel[bulk], y[bulk]
    grid = params.grid
    first, last = energy_rel.item(0), energy_rel.item(-1)
    below = max(0.0, first - grid.item(0))
    above = max(0.0, grid.item(-1) - last)
    outside = max(below, above)
    if outside > params.max_extrapolation + 1e-9:
        side = "start" if below >= above else "end"
        raise SpectrumError(
            "window",
            f"data cover E0{first:+.1f} to E0{last:+.1f} eV but the model window "
            f"{side} needs E0{(grid[0] if side == 'start' else grid[-1]):+.1f} eV "
            f"({outside:.1f} eV beyond the data; at most {params.max_extrapolation:g} allowed)",
        )
    inside = points_within(energy_rel, grid.item(0), grid.item(-1))
    if inside < MIN_WINDOW_POINTS:
        raise SpectrumError("window", sparse_window(inside, grid))
    return np.interp(grid, energy_rel, y), below + above


def points_within(energy: np.ndarray, lo: float, hi: float) -> int:
    """How many of ``energy`` (strictly increasing) lie in ``[lo, hi]``: the count of
    ``(energy >= lo) & (energy <= hi)``, by two binary searches."""
    return max(int(energy.searchsorted(hi, side="right")) - int(energy.searchsorted(lo)), 0)


#: Data points a spectrum needs inside the model window: fewer, and its model input is a few
#: straight lines drawn between points tens of eV apart (a 10-point survey scan over 1.4 keV
#: left 2 in the window).
MIN_WINDOW_POINTS = 10


def sparse_window(inside: int, grid: np.ndarray) -> str:
    """Why a spectrum with only ``inside`` points in the model window ``grid`` is refused."""
    return (
        f"only {inside} data points between E0{grid[0]:+.1f} and E0{grid[-1]:+.1f} eV, the "
        f"model window (at least {MIN_WINDOW_POINTS} needed): too sparse to resample"
    )


def prepare(spectrum: Spectrum, params: PrepParams, e0: float | None = None) -> Prepared:
    """E0 (unless given), normalisation and resampling: a spectrum ready for featurisation.

    A declared HERFD spectrum (``meta["herfd"]``, see :mod:`xasflow.spectra.herfd`) is first
    broadened to the conventional resolution; ``Prepared.spectrum`` is then the broadened one.
    A step (:func:`~xasflow.spectra.quality.gated_step`) under ``params.min_edge_snr`` times
    the measured point noise raises ``weak_edge``.
    Lone glitches in the model window are interpolated across (``Prepared.spectrum.meta
    ["glitches_interpolated"]``: their energies; :mod:`~xasflow.spectra.glitches`), a HERFD
    spectrum's before its broadening.
    """
    fwhm = herfd_width(spectrum)
    bulk = bulk_of(spectrum.energy)  # once: the E0 search, the fits and the gridding use it
    given = e0 if e0 is not None else spectrum.e0

    def attempt(s: Spectrum) -> tuple[float, np.ndarray, float]:  # E0 anew without glitches
        at = find_e0(s, params.e0_search, bulk) if given is None else given
        return (at, *normalize(s, at, params, bulk))

    measured: Spectrum | None = None  # its point noise: broadening would smooth it away
    if fwhm is not None:  # glitches first: the broadening would smear one over its neighbours
        measured = repaired_first(spectrum, attempt)
        spectrum = broaden(measured, fwhm)
    spectrum, (e0, y, step) = repaired(spectrum, attempt)  # glitches interpolated, recorded
    if measured is None:
        measured = spectrum
    rel = spectrum.energy - e0
    tab = tabulated_edge(spectrum.element, spectrum.edge)
    lead, end = bulk.indices(rel.size)[:2]
    # the step measured around the tabulated edge, not the fit's at E0
    gate = float(gated_step(spectrum.energy, measured.mu, float(e0), tab, step, lead, end))
    snr = edge_snr(rel, measured.mu, gate)  # broaden keeps the axis
    weak = weak_edge(snr, gate, params.min_edge_snr)
    if weak is not None:
        raise SpectrumError("weak_edge", weak)
    origin = params.origin(spectrum.energy, spectrum.mu, e0)
    grid_y, extrapolated = resample(rel if origin == e0 else rel - (origin - e0), y, params, bulk)
    return Prepared(
        y=grid_y,
        e0=float(e0),
        edge_step=step,
        extrapolated=extrapolated,
        spectrum=spectrum,
        unbroadened=None if measured is spectrum else measured,
        alternates=alternate_grids(spectrum.energy, spectrum.mu, rel, y, float(e0), params, bulk),
    )


def alternate_grids(
    energy: np.ndarray,
    mu: np.ndarray,
    rel: np.ndarray,
    y: np.ndarray,
    e0: float,
    params: PrepParams,
    bulk: slice | None = None,
    origins: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, ...]:
    """``y`` (normalised at ``e0``, on ``rel`` = energy - e0) on the model grid placed on
    each rival rise of ``mu`` (:func:`~xasflow.spectra.e0_rivals.rival_origins`, or
    ``origins`` found already), with ``params.e0_rivals``; a rival whose grid would leave
    the data is skipped."""
    if params.e0_rivals is None:
        return ()
    if origins is None:
        origins = rival_origins(energy, mu, e0, params.e0_rivals, params.e0_rival_window)
    out = []
    for at in origins:
        try:
            out.append(resample(rel - (at - e0), y, params, bulk)[0])
        except SpectrumError:  # the shifted window runs past the data (a FEFF tail)
            continue
    return tuple(out)
