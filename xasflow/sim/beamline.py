"""A simulated quick-XAS beamline: ophyd sim devices and a real bluesky RunEngine.

The detector channels I0, It and Ir are generated from real spectra (a sample
:class:`~xasflow.spectra.Spectrum` and a reference-foil spectrum, both on an absolute eV
axis) by :class:`BeamlineModel`, with counting noise, slow I0 drift, a smooth sample
background and a monochromator miscalibration shared by sample and reference (so aligning
to the reference foil undoes it). :class:`SimBeamline` runs plans on a RunEngine and
publishes every document through bluesky's 0MQ ``Publisher``; :func:`start_proxy` runs
bluesky's 0MQ ``Proxy`` in a subprocess.

Data keys are the same for both kinds of scan, so consumers need one code path:

* step scans (:func:`step_scan_plan`): one event per point; ``energy`` (the motor
  readback, nominal eV), ``I0``, ``It``, ``Ir`` are scalars.
* fly scans (:func:`fly_scan_plan`): one event per spectrum; ``energy``, ``I0``, ``It``,
  ``Ir`` are arrays of shape ``[N]`` (descriptor ``dtype: "array"``, ``shape: [N]``).

Start-document metadata (:func:`default_md`), i.e. what the daemon can rely on:

``element``, ``edge``
    absorber and edge of the sample (``"Cu"``, ``"K"``).
``edge_energy``
    the tabulated edge energy in eV (not measured).
``sample_name``
    a human-readable sample name.
``xas_mode``
    ``"transmission"``: mu = ln(I0/It); the reference foil is mu_ref = ln(It/Ir).
``xas_channels``
    role -> data key: ``{"energy": "energy", "i0": "I0", "it": "It", "ir": "Ir"}``.
``xas_scan``
    ``"step"`` or ``"fly"`` (added by the plans).
``reference_element``, ``reference_edge``
    the foil behind the sample, for :func:`xasflow.spectra.alignment_shift`.
``beamline_id``
    ``"xasflow-sim"``.
``demo_expected``
    only for a packaged demo sample: its expected labels (``cn``, ``motif``,
    ``oxidation_state``), ground truth like ``simulation``.
``simulation``
    ground truth (offset, flux, drift, thickness, seed, sources) for tests and
    benchmarks; a consumer must not use it for analysis.

Sample spectra: :func:`demo_spectra` gives the project's own FEFF10 spectra of Cu reference
compounds (``xasflow/data/demo``, see :mod:`xasflow.sim.feff_demo`), always available and
the default samples; :func:`sample_spectra` adds the measured spectra of the shared XAS Data
Library (:func:`library_spectra`) when it is present.

0MQ's slow joiner: a PUB socket drops messages until the subscription has propagated, so
:meth:`SimBeamline.warm_up` publishes tiny probe runs (a start document carrying
``xasflow_probe`` and its stop, no events, never through the RunEngine) until the consumer
reports one; :func:`is_probe` recognises them so consumers can skip them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ophyd import Component, Device, Signal
from ophyd.sim import NullStatus, SynAxis

from xasflow import paths
from xasflow.adapters.probes import PROBE_KEY
from xasflow.spectra.channels import align, alignment_shift
from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import edge_energy, infer_edge

__all__ = [
    "CHANNELS",
    "PROBE_KEY",
    "BeamlineModel",
    "BeamlineRangeError",
    "EnergyAxis",
    "ProxyProcess",
    "QuickXasDetector",
    "SimBeamline",
    "XasStepDetector",
    "default_md",
    "default_reference",
    "demo_spectra",
    "fly_energies",
    "fly_scan_plan",
    "is_probe",
    "library_spectra",
    "make_devices",
    "make_quick_xas",
    "sample_spectra",
    "start_proxy",
    "step_energies",
    "step_scan_plan",
    "synthetic_foil",
]

logger = logging.getLogger(__name__)

#: Detector channel data keys, in order.
CHANNELS: tuple[str, str, str] = ("I0", "It", "Ir")
_PROBE_UID_PREFIX = "xasflow-probe-"
#: Above this many expected counts the Gaussian approximation replaces Poisson sampling.
_POISSON_MAX = 1e9
#: Measured foils in the XAS Data Library, by element (K edge).
_LIBRARY_FOIL = "{element}_Foil_rt_2016Foils.xdi"
#: A foil/own-reference whose E0 lies further than this from the tabulated edge is not used.
_MAX_CALIBRATION_SHIFT = 20.0
BEAMLINE_ID = "xasflow-sim"


class BeamlineRangeError(ValueError):
    """Requested energies fall outside what the sample or reference spectrum covers."""


# --------------------------------------------------------------------------- reference spectra


def synthetic_foil(element: str = "Cu", edge: str = "K") -> Spectrum:
    """A plausible metal-foil edge (arctan step, near-edge peak, damped EXAFS), calibrated.

    Built on a 0.1 eV grid from 400 eV below to 1000 eV above the tabulated edge, with a
    Victoreen-like E^-3 pre-edge and E^-2 post-edge fall-off; then shifted so that
    :func:`~xasflow.spectra.find_e0` puts its E0 exactly on the tabulated edge energy.
    """
    e0 = edge_energy(element, edge)
    energy = np.arange(e0 - 400.0, e0 + 1000.0, 0.1)
    x = energy - e0
    step = 0.5 + np.arctan(x / 1.5) / np.pi
    peak = 0.12 * np.exp(-0.5 * ((x - 14.0) / 4.0) ** 2)
    k = np.sqrt(0.2625 * np.clip(x, 0.0, None))  # photoelectron wavenumber, 1/Angstrom
    exafs = (1.0 - np.exp(-np.clip(x, 0.0, None) / 15.0)) * (
        0.3 * np.sin(2.0 * k * 2.55 - 0.8) * np.exp(-2.0 * 0.008 * k**2) / (1.0 + k)
    )
    mu = 0.25 * (energy / e0) ** -3 + 1.6 * (step + peak + exafs * step) * (energy / e0) ** -2
    foil = Spectrum(
        energy=energy,
        mu=mu,
        element=element,
        edge=edge,
        meta={"name": f"synthetic {element} foil", "source": "synthetic"},
    )
    return _calibrate_to_table(foil, element, edge)


def _calibrate_to_table(foil: Spectrum, element: str, edge: str) -> Spectrum:
    """Shift a foil so its E0 sits on the tabulated edge (records ``calibration_shift``)."""
    shift = alignment_shift(foil, element, edge)
    out = align(foil, shift)
    meta = dict(out.meta)
    meta["calibration_shift"] = shift
    return out.with_(meta=meta, e0=edge_energy(element, edge))


def _extend_pre_edge(foil: Spectrum, down_to: float, fit_width: float = 60.0) -> Spectrum:
    """Extend a measured foil below its first point with its pre-edge line (5 eV steps)."""
    first = float(foil.energy[0])
    if first <= down_to:
        return foil
    e_tab = foil.e0 if foil.e0 is not None else first + 100.0
    sel = (foil.energy <= first + fit_width) & (foil.energy <= e_tab - 15.0)
    if np.count_nonzero(sel) < 3:
        sel = np.arange(foil.energy.size) < 3
    coef = np.polyfit(foil.energy[sel], foil.mu[sel], 1)
    new_e = np.arange(down_to, first - 2.5, 5.0)
    meta = dict(foil.meta)
    meta["extrapolated_below"] = first
    return foil.with_(
        energy=np.concatenate((new_e, foil.energy)),
        mu=np.concatenate((np.polyval(coef, new_e), foil.mu)),
        meta=meta,
    )


@functools.lru_cache(maxsize=16)
def _cached_reference(element: str, edge: str, library: str) -> Spectrum:
    path = Path(library) / element / _LIBRARY_FOIL.format(element=element)
    if edge == "K" and path.is_file():
        try:
            from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum

            foil = xdi_to_spectrum(read_xdi(path)).with_(element=element, edge=edge)
            foil = _calibrate_to_table(foil, element, edge)
            if abs(foil.meta["calibration_shift"]) <= _MAX_CALIBRATION_SHIFT:
                return _extend_pre_edge(foil, edge_energy(element, edge) - 250.0)
            logger.warning(
                "%s: E0 is %.1f eV off the tabulated edge; using a synthetic foil",
                path,
                -foil.meta["calibration_shift"],
            )
        except (ValueError, OSError) as exc:  # XdiError and SpectrumError are ValueErrors
            logger.warning("cannot use %s as reference foil (%s); using a synthetic one", path, exc)
    return synthetic_foil(element, edge)


def default_reference(element: str = "Cu", edge: str = "K") -> Spectrum:
    """The reference foil used when none is given: measured if the library has one, else synthetic.

    The measured foil (``<El>_Foil_rt_2016Foils.xdi`` in the shared XAS Data Library) is
    shifted so its E0 is the tabulated edge, and its pre-edge line is extended down to 250 eV
    below the edge (``meta['extrapolated_below']``) so the default 8800-9500 eV Cu grid is
    covered; otherwise :func:`synthetic_foil`. Cached per element and edge.
    """
    sym = element.strip().capitalize()
    return _cached_reference(sym, edge.strip().upper(), str(paths.xas_data_library()))


def _own_reference(sample: Spectrum, element: str, edge: str) -> Spectrum | None:
    """The reference channel measured with the sample (XDI ``irefer``), if it is a usable foil."""
    ref_mu = sample.meta.get("reference_mu")
    if ref_mu is None or np.shape(ref_mu) != sample.energy.shape:
        return None
    try:
        ref = Spectrum(
            energy=sample.energy,
            mu=np.asarray(ref_mu, dtype=np.float64),
            element=element,
            edge=edge,
            meta={"name": f"{sample.label} reference channel", "source": "sample reference"},
        )
        if abs(alignment_shift(ref, element, edge)) > _MAX_CALIBRATION_SHIFT:
            return None
    except (SpectrumError, KeyError):
        return None
    return ref


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, eq=False)
class BeamlineModel:
    """The physics of the simulated beamline: what I0, It and Ir read at each energy.

    ``sample`` and ``reference`` are mu(E) on absolute eV axes (their own grids; mu is
    linearly interpolated). With ``reference=None`` the reference is the sample's own
    measured reference channel (XDI ``irefer``) when it has a usable one, else
    :func:`default_reference` for the sample's element; ``reference_source`` says which.
    The nominal (recorded) energy E corresponds to the true photon energy E +
    ``energy_offset`` for sample and reference alike. Counts: I0 = ``i0_flux`` * dwell *
    drift(progress); It = I0 * exp(-(t*mu_s + bkg)); Ir = It * exp(-mu_ref), each with
    independent Poisson noise (Gaussian above 1e9 counts). ``background`` is the absorbance of
    everything but the absorber edge at the edge energy, falling as E^-3 (a smooth slope).
    """

    sample: Spectrum
    reference: Spectrum | None = None
    i0_flux: float = 1e6
    i0_drift: float = 0.02
    energy_offset: float = 0.0
    sample_thickness: float = 1.0
    seed: int | None = None
    background: float = 0.3
    reference_source: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not (np.isfinite(self.i0_flux) and self.i0_flux > 0):
            raise ValueError(f"i0_flux must be positive, got {self.i0_flux}")
        if not (np.isfinite(self.i0_drift) and 0 <= self.i0_drift < 1):
            raise ValueError(f"i0_drift must be in [0, 1), got {self.i0_drift}")
        if not np.isfinite(self.energy_offset):
            raise ValueError("energy_offset must be finite")
        if not (np.isfinite(self.sample_thickness) and self.sample_thickness > 0):
            raise ValueError(f"sample_thickness must be positive, got {self.sample_thickness}")
        if not np.isfinite(self.background):
            raise ValueError("background must be finite")
        element, edge = self.element, self.edge  # raises when the sample's element is unknown
        ref, source = self.reference, "given"
        if ref is None:
            ref = _own_reference(self.sample, element, edge)
            source = "sample reference channel"
        if ref is None:
            ref = default_reference(element, edge)
            source = str(ref.meta.get("source", "default"))
        object.__setattr__(self, "reference", ref)
        object.__setattr__(self, "reference_source", source)

    @property
    def element(self) -> str:
        """The sample's absorbing element (from the spectrum, else inferred from its range)."""
        if self.sample.element:
            return self.sample.element
        guess = infer_edge(float(self.sample.energy[0]), float(self.sample.energy[-1]))
        if guess is None:
            raise ValueError(
                f"sample {self.sample.label!r} names no element and its range "
                f"{self.sample.energy[0]:.0f}-{self.sample.energy[-1]:.0f} eV holds no known edge"
            )
        return guess[0]

    @property
    def edge(self) -> str:
        """The sample's absorption edge."""
        if self.sample.element:
            return self.sample.edge
        guess = infer_edge(float(self.sample.energy[0]), float(self.sample.energy[-1]))
        return guess[1] if guess else self.sample.edge

    @property
    def edge_energy(self) -> float:
        """Tabulated edge energy of the sample (the centre of the background's E^-3 law)."""
        try:
            return edge_energy(self.element, self.edge)
        except KeyError:
            return float(np.median(self.sample.energy))

    @property
    def energy_range(self) -> tuple[float, float]:
        """The nominal energies (lo, hi) that sample and reference both cover."""
        assert self.reference is not None
        lo = max(self.sample.energy[0], self.reference.energy[0]) - self.energy_offset
        hi = min(self.sample.energy[-1], self.reference.energy[-1]) - self.energy_offset
        return float(lo), float(hi)

    def true_energy(self, energy: np.ndarray) -> np.ndarray:
        """Photon energies for nominal ``energy``; BeamlineRangeError if not all covered."""
        energy = np.asarray(energy, dtype=np.float64)
        if energy.ndim != 1 or energy.size == 0 or not np.all(np.isfinite(energy)):
            raise ValueError("energy must be a non-empty 1-D array of finite values")
        true = energy + self.energy_offset
        assert self.reference is not None
        for what, spec in (("sample", self.sample), ("reference", self.reference)):
            lo, hi = spec.energy[0], spec.energy[-1]
            if true.min() < lo or true.max() > hi:
                off = self.energy_offset
                raise BeamlineRangeError(
                    f"scan energies {energy.min():.1f}-{energy.max():.1f} eV (nominal, true = "
                    f"nominal {off:+g} eV) fall outside the {what} spectrum "
                    f"{spec.label!r}, which covers {lo - off:.1f}-{hi - off:.1f} eV nominal; "
                    f"both spectra cover {self.energy_range[0]:.1f}-"
                    f"{self.energy_range[1]:.1f} eV (model.energy_range)"
                )
        return true

    def mu_sample(self, true_energy: np.ndarray) -> np.ndarray:
        """Sample mu at true photon energies (linear interpolation of the sample spectrum)."""
        return np.interp(true_energy, self.sample.energy, self.sample.mu)

    def mu_reference(self, true_energy: np.ndarray) -> np.ndarray:
        """Reference-foil mu at true photon energies."""
        assert self.reference is not None
        return np.interp(true_energy, self.reference.energy, self.reference.mu)

    def background_mu(self, true_energy: np.ndarray) -> np.ndarray:
        """Smooth non-edge absorbance: ``background * (E / edge_energy)**-3``."""
        return self.background * (np.asarray(true_energy) / self.edge_energy) ** -3

    def i0_scale(self, progress: np.ndarray | float) -> np.ndarray:
        """I0 drift factor at scan progress 0..1: ramp plus slow wobble, ``i0_drift`` end to end.

        ``1 + i0_drift * ((p - 0.5) + 0.25 * sin(3*pi*p))``: 1 - d/2 at the start and
        1 + d/2 at the end of a scan.
        """
        p = np.asarray(progress, dtype=np.float64)
        return 1.0 + self.i0_drift * ((p - 0.5) + 0.25 * np.sin(3.0 * np.pi * p))

    def expected(
        self, energy: np.ndarray, dwell: float = 1.0, progress: np.ndarray | float | None = None
    ) -> dict[str, np.ndarray]:
        """Noise-free mean counts ``{"I0", "It", "Ir"}`` at nominal ``energy``."""
        true = self.true_energy(energy)
        if not dwell > 0:
            raise ValueError(f"dwell must be positive, got {dwell}")
        if progress is None:
            progress = np.linspace(0.0, 1.0, true.size) if true.size > 1 else np.zeros(1)
        i0 = self.i0_flux * dwell * np.broadcast_to(self.i0_scale(progress), true.shape)
        absorbance = self.sample_thickness * self.mu_sample(true) + self.background_mu(true)
        it = i0 * np.exp(-absorbance)
        ir = it * np.exp(-self.mu_reference(true))
        return {"I0": i0, "It": it, "Ir": ir}

    def channels(
        self,
        energy: np.ndarray,
        dwell: float = 1.0,
        rng: np.random.Generator | None = None,
        *,
        progress: np.ndarray | float | None = None,
    ) -> dict[str, np.ndarray]:
        """Noisy detector counts ``{"I0", "It", "Ir"}`` (float64) at nominal ``energy``.

        ``rng`` defaults to a fresh ``default_rng(seed)``, so equal calls give equal counts
        with a seed; devices pass one generator so successive spectra differ. ``progress``
        (0..1 through the scan, for the drift) defaults to 0..1 across ``energy``.
        """
        mean = self.expected(energy, dwell, progress)
        rng = np.random.default_rng(self.seed) if rng is None else rng
        return {name: _count(mean[name], rng) for name in CHANNELS}


def _count(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counting noise: Poisson, or its Gaussian limit for very large means."""
    lam = np.asarray(lam, dtype=np.float64)
    out = np.empty_like(lam)
    big = lam > _POISSON_MAX
    out[~big] = rng.poisson(lam[~big])
    out[big] = rng.normal(lam[big], np.sqrt(lam[big]))
    return out


# --------------------------------------------------------------------------- energy grids


def _restrict(energy: np.ndarray, within: BeamlineModel | None) -> np.ndarray:
    if within is None:
        return energy
    lo, hi = within.energy_range
    kept = energy[(energy >= lo) & (energy <= hi)]
    if kept.size < 3:
        raise BeamlineRangeError(
            f"the grid {energy[0]:.1f}-{energy[-1]:.1f} eV and the model's range "
            f"{lo:.1f}-{hi:.1f} eV share fewer than 3 points"
        )
    return kept


def step_energies(
    element: str = "Cu",
    edge: str = "K",
    *,
    edge_step: float = 0.3,
    pre_step: float = 5.0,
    post_step: float = 2.0,
    within: BeamlineModel | None = None,
) -> np.ndarray:
    """A step-scan grid around an edge: Cu K gives 8800-9500 eV, 0.3 eV steps in 8960-9040.

    Relative to the tabulated edge rounded to 10 eV (Ec): ``pre_step`` from Ec-180 to Ec-20,
    ``edge_step`` to Ec+60, ``post_step`` to Ec+520. ``within`` drops points a model does
    not cover.
    """
    ec = round(edge_energy(element, edge) / 10.0) * 10.0
    grid = np.concatenate(
        (
            np.arange(ec - 180.0, ec - 20.0, pre_step),
            np.arange(ec - 20.0, ec + 60.0, edge_step),
            np.arange(ec + 60.0, ec + 520.0 + 1e-9, post_step),
        )
    )
    return _restrict(np.round(grid, 6), within)


def fly_energies(
    n_points: int = 1000,
    element: str = "Cu",
    edge: str = "K",
    *,
    within: BeamlineModel | None = None,
) -> np.ndarray:
    """A quick-XAS spectrum's energies: ``n_points`` evenly from Ec-180 to Ec+520 eV.

    Ec is the tabulated edge rounded to 10 eV (Cu K: 8800-9500 eV). With ``within`` the
    span is first narrowed to the model's ``energy_range`` so all ``n_points`` are usable.
    """
    if n_points < 3:
        raise ValueError("n_points must be >= 3")
    ec = round(edge_energy(element, edge) / 10.0) * 10.0
    lo, hi = ec - 180.0, ec + 520.0
    if within is not None:
        mlo, mhi = within.energy_range
        lo, hi = max(lo, mlo), min(hi, mhi)
        if hi - lo <= 0:
            raise BeamlineRangeError(f"the model covers {mlo:.1f}-{mhi:.1f} eV, not near {ec}")
    return np.linspace(lo, hi, n_points)


# --------------------------------------------------------------------------- ophyd devices


def _with_units(description: dict[str, Any], units: dict[str, str]) -> dict[str, Any]:
    """Add ``units`` to data-key descriptions (soft ophyd signals do not report any)."""
    for key, value in description.items():
        if key in units:
            value["units"] = units[key]
    return description


_COUNT_UNITS = dict.fromkeys(CHANNELS, "counts")


class EnergyAxis(SynAxis):
    """The simulated monochromator: a ``SynAxis`` whose data keys report units of eV."""

    def describe(self) -> dict[str, Any]:
        """Data keys ``energy`` and ``energy_setpoint``, in eV."""
        desc = super().describe()
        return _with_units(desc, dict.fromkeys(desc, "eV"))


class XasStepDetector(Device):
    """Ion chambers for step scans: I0/It/Ir read the model at the energy motor's position.

    Data keys are ``I0``, ``It``, ``Ir`` (no device prefix). :meth:`start_scan` sets the
    number of points so the I0 drift runs over the scan; without it the drift stays at its
    start value.
    """

    I0 = Component(Signal, value=0.0, kind="hinted")
    It = Component(Signal, value=0.0, kind="hinted")
    Ir = Component(Signal, value=0.0, kind="hinted")
    dwell = Component(Signal, value=1.0, kind="config")

    def __init__(
        self,
        model: BeamlineModel,
        energy_motor: Any,
        *,
        name: str = "xas",
        rng: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        for attr in CHANNELS:
            getattr(self, attr).name = attr
        self._model = model
        self._motor = energy_motor
        self._rng = rng if rng is not None else np.random.default_rng(model.seed)
        self._n_points = 0
        self._index = 0

    def start_scan(self, n_points: int) -> None:
        """Restart the drift clock for a scan of ``n_points`` points."""
        self._n_points = int(n_points)
        self._index = 0

    def trigger(self) -> Any:
        """Count once at the motor's current energy; done immediately."""
        energy = float(self._motor.readback.get())
        progress = self._index / (self._n_points - 1) if self._n_points > 1 else 0.0
        counts = self._model.channels(
            np.array([energy]), float(self.dwell.get()), self._rng, progress=progress
        )
        for attr in CHANNELS:
            getattr(self, attr).put(float(counts[attr][0]))
        self._index += 1
        return NullStatus()

    def describe(self) -> dict[str, Any]:
        """Data keys ``I0``, ``It``, ``Ir`` in counts."""
        return _with_units(super().describe(), _COUNT_UNITS)


class QuickXasDetector(Device):
    """A quick-XAS detector for fly scans: each trigger records one whole spectrum.

    Signals ``energy``, ``I0``, ``It``, ``Ir`` hold arrays of shape ``[N]`` (data keys
    without prefix). Spectrum k of ``n_spectra`` spans drift progress k/n..(k+1)/n; with
    ``bidirectional`` odd spectra run downwards in energy, as an oscillating mono does.
    """

    energy = Component(Signal, value=np.zeros(1), kind="hinted")
    I0 = Component(Signal, value=np.zeros(1), kind="hinted")
    It = Component(Signal, value=np.zeros(1), kind="hinted")
    Ir = Component(Signal, value=np.zeros(1), kind="hinted")
    dwell = Component(Signal, value=1.0, kind="config")

    def __init__(
        self,
        model: BeamlineModel,
        energies: Sequence[float] | np.ndarray,
        *,
        n_spectra: int = 1,
        bidirectional: bool = False,
        name: str = "quick_xas",
        rng: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        grid = np.asarray(energies, dtype=np.float64)
        model.true_energy(grid)  # refuse uncovered energies now, not mid-run
        for attr in ("energy", *CHANNELS):
            sig = getattr(self, attr)
            sig.name = attr
            sig.put(np.zeros_like(grid))
        self.energy.put(grid.copy())
        self._model = model
        self._grid = grid
        self._rng = rng if rng is not None else np.random.default_rng(model.seed)
        self._n_spectra = max(int(n_spectra), 1)
        self._bidirectional = bidirectional
        self._index = 0

    def start_scan(self, n_spectra: int) -> None:
        """Restart the drift clock for a run of ``n_spectra`` spectra."""
        self._n_spectra = max(int(n_spectra), 1)
        self._index = 0

    def trigger(self) -> Any:
        """Record the next spectrum; done immediately."""
        k = self._index
        grid = self._grid[::-1] if self._bidirectional and k % 2 else self._grid
        progress = (k + np.arange(grid.size) / grid.size) / self._n_spectra
        counts = self._model.channels(grid, float(self.dwell.get()), self._rng, progress=progress)
        self.energy.put(grid.copy())
        for attr in CHANNELS:
            getattr(self, attr).put(counts[attr])
        self._index += 1
        return NullStatus()

    def describe(self) -> dict[str, Any]:
        """Array data keys: ``energy`` in eV, ``I0``, ``It``, ``Ir`` in counts."""
        return _with_units(super().describe(), {"energy": "eV", **_COUNT_UNITS})


def make_devices(
    model: BeamlineModel, rng: np.random.Generator | None = None
) -> tuple[EnergyAxis, XasStepDetector]:
    """A ``SynAxis`` named ``energy`` (eV) and a step detector reading the model at its position.

    ``rng`` defaults to ``default_rng(model.seed)``: equal seeds give equal scans.
    """
    motor = EnergyAxis(name="energy", egu="eV", precision=3, value=float(model.energy_range[0]))
    return motor, XasStepDetector(model, motor, rng=rng)


def make_quick_xas(
    model: BeamlineModel,
    energies: Sequence[float] | np.ndarray,
    n_spectra: int = 1,
    *,
    bidirectional: bool = False,
    rng: np.random.Generator | None = None,
) -> QuickXasDetector:
    """The array-valued quick-XAS detector for fly scans over ``energies``."""
    return QuickXasDetector(
        model, energies, n_spectra=n_spectra, bidirectional=bidirectional, rng=rng
    )


# --------------------------------------------------------------------------- plans


def default_md(model: BeamlineModel) -> dict[str, Any]:
    """Start-document metadata for a run of ``model`` (keys documented in the module docstring)."""
    assert model.reference is not None
    sample = model.sample
    name = sample.meta.get("sample") or sample.meta.get("name") or sample.label
    expected = sample.meta.get("expected") if sample.meta.get("source") == "feff_demo" else None
    return {
        "element": model.element,
        "edge": model.edge,
        "edge_energy": float(model.edge_energy),
        "sample_name": str(name),
        "xas_mode": "transmission",
        "xas_channels": {"energy": "energy", "i0": "I0", "it": "It", "ir": "Ir"},
        "reference_element": model.reference.element or model.element,
        "reference_edge": model.reference.edge,
        "beamline_id": BEAMLINE_ID,
        **({"demo_expected": dict(expected)} if isinstance(expected, dict) else {}),
        "simulation": {
            "energy_offset": float(model.energy_offset),
            "i0_flux": float(model.i0_flux),
            "i0_drift": float(model.i0_drift),
            "sample_thickness": float(model.sample_thickness),
            "background": float(model.background),
            "seed": model.seed,
            "sample_source": str(sample.meta.get("source", "")),
            "reference_source": model.reference_source,
        },
    }


def _merge_md(model: BeamlineModel, scan: str, md: dict[str, Any] | None) -> dict[str, Any]:
    merged = default_md(model)
    merged["xas_scan"] = scan
    merged.update(md or {})
    return merged


def step_scan_plan(
    model: BeamlineModel,
    energies: Sequence[float] | np.ndarray,
    md: dict[str, Any] | None = None,
    *,
    dwell: float = 1.0,
    rng: np.random.Generator | None = None,
) -> Generator[Any, Any, str]:
    """A bluesky ``list_scan`` of the energy motor over ``energies``: one event per point.

    Energies outside ``model.energy_range`` raise BeamlineRangeError here, not mid-run.
    """
    import bluesky.plans as bp

    grid = np.asarray(energies, dtype=np.float64)
    model.true_energy(grid)
    motor, det = make_devices(model, rng)
    det.dwell.put(float(dwell))
    merged = _merge_md(model, "step", md)

    def plan() -> Generator[Any, Any, str]:
        det.start_scan(grid.size)
        return (yield from bp.list_scan([det], motor, [float(e) for e in grid], md=merged))

    return plan()


def fly_scan_plan(
    model: BeamlineModel,
    energies: Sequence[float] | np.ndarray,
    n_spectra: int,
    md: dict[str, Any] | None = None,
    period: float = 0.0,
    *,
    dwell: float = 1.0,
    bidirectional: bool = False,
    rng: np.random.Generator | None = None,
) -> Generator[Any, Any, str]:
    """One quick-XAS run: a bluesky ``count`` of ``n_spectra`` events, each a whole spectrum.

    Events carry arrays of shape ``[len(energies)]``; ``period`` seconds pass between spectra.
    """
    import bluesky.plans as bp

    if n_spectra < 1:
        raise ValueError("n_spectra must be >= 1")
    det = make_quick_xas(model, energies, n_spectra, bidirectional=bidirectional, rng=rng)
    det.dwell.put(float(dwell))
    merged = _merge_md(model, "fly", md)
    merged.setdefault("num_points_per_spectrum", int(np.size(energies)))

    def plan() -> Generator[Any, Any, str]:
        det.start_scan(n_spectra)
        return (yield from bp.count([det], num=n_spectra, delay=period, md=merged))

    return plan()


# --------------------------------------------------------------------------- running it


def is_probe(name: str, doc: dict[str, Any]) -> bool:
    """True for the documents of a :meth:`SimBeamline.warm_up` probe run."""
    if name == "start":
        return PROBE_KEY in doc or str(doc.get("uid", "")).startswith(_PROBE_UID_PREFIX)
    if name == "stop":
        return str(doc.get("run_start", "")).startswith(_PROBE_UID_PREFIX)
    return False


class SimBeamline:
    """A RunEngine that publishes every document to a 0MQ proxy with bluesky's ``Publisher``.

    ``publish_to`` is the proxy's *in* address (None: no publishing); ``extra_callbacks``
    are subscribed too. The RunEngine has no signal handlers (``context_managers=[]``), so it
    can be driven from any thread. Call :meth:`close` (or use ``with``) to stop its loop.
    """

    def __init__(
        self,
        publish_to: str | None = "tcp://127.0.0.1:5577",
        prefix: bytes = b"",
        extra_callbacks: Iterable[Callable[[str, dict[str, Any]], Any]] = (),
    ) -> None:
        from bluesky import RunEngine

        self.RE = RunEngine({}, context_managers=[])
        self.publisher: Any = None
        self._closed = False
        try:
            if publish_to is not None:
                import zmq
                from bluesky.callbacks.zmq import Publisher

                self.publisher = Publisher(publish_to, prefix=prefix)
                # bluesky leaves LINGER infinite: close() would hang if the proxy is gone.
                sock = getattr(self.publisher, "_socket", None)
                if sock is not None:
                    sock.setsockopt(zmq.LINGER, 2000)
                self.RE.subscribe(self.publisher)
            for callback in extra_callbacks:
                self.RE.subscribe(callback)
        except BaseException:
            self.close()
            raise

    def run(self, plan: Iterable[Any]) -> list[str]:
        """Run a plan to completion; returns the uids of the runs it opened."""
        if self._closed:
            raise RuntimeError("SimBeamline is closed")
        result = self.RE(plan)
        uids = getattr(result, "run_start_uids", result)
        return [str(u) for u in uids]

    def warm_up(
        self, seen: Callable[[str], bool], timeout: float = 15.0, interval: float = 0.02
    ) -> int:
        """Publish probe runs until ``seen(token)`` is true; returns how many were sent.

        Works around 0MQ's slow joiner. Each probe is a start (``xasflow_probe: token``) and
        its stop, sent straight to the publisher. TimeoutError after ``timeout`` seconds.
        """
        import event_model

        if self.publisher is None:
            raise RuntimeError("warm_up needs a publisher (publish_to was None)")
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        sent = 0
        while True:
            bundle = event_model.compose_run(
                uid=f"{_PROBE_UID_PREFIX}{token}-{sent}",
                metadata={PROBE_KEY: token, "plan_name": "xasflow_probe"},
            )
            self.publisher("start", bundle.start_doc)
            self.publisher("stop", bundle.compose_stop(exit_status="success"))
            sent += 1
            if seen(token):
                return sent
            if time.monotonic() > deadline:
                raise TimeoutError(f"no probe seen after {sent} sent in {timeout:g}s")
            time.sleep(interval)

    def close(self) -> None:
        """Close the publisher and stop the RunEngine's event-loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.publisher is not None:
            self.publisher.close()
        loop = self.RE.loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread = getattr(self.RE, "_th", None)
        if thread is not None:
            thread.join(5.0)
        if (thread is None or not thread.is_alive()) and not loop.is_closed():
            loop.close()

    def __enter__(self) -> SimBeamline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the 0MQ proxy

_PROXY_SCRIPT = """
import sys
from bluesky.callbacks.zmq import Proxy
proxy = Proxy(sys.argv[1], sys.argv[2])
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""


class ProxyProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A running ``bluesky.callbacks.zmq.Proxy``; ``in_address`` for publishers, ``out_address``
    for subscribers. Stop it with :meth:`stop` (or terminate/wait, or ``with``)."""

    in_address: str
    out_address: str

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (then kill if needed) and reap the proxy process."""
        if self.poll() is None:
            self.terminate()
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait(timeout)


def start_proxy(
    in_port: int = 5577, out_port: int = 5578, host: str = "127.0.0.1", timeout: float = 30.0
) -> ProxyProcess:
    """Start bluesky's 0MQ Proxy in a subprocess and return once it is bound and listening.

    Port 0 picks a free port; the actual addresses are ``proc.in_address`` and
    ``proc.out_address``. The caller stops it (``proc.stop()``).
    """

    def address(port: int) -> str:
        return f"tcp://{host}:{port}" if port else f"tcp://{host}"

    with tempfile.TemporaryFile() as errors:
        proc = ProxyProcess(
            [sys.executable, "-c", _PROXY_SCRIPT, address(in_port), address(out_port)],
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                ready = sel.select(timeout)
            line = proc.stdout.readline() if ready else ""
            parts = line.split()
            if len(parts) != 2:
                proc.stop()
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-2000:]
                why = "timed out" if not ready else f"exited with {proc.returncode}"
                raise RuntimeError(f"0MQ proxy on {host}:{in_port}/{out_port} {why}: {tail}")
        except BaseException:
            proc.stop()
            raise
        finally:
            proc.stdout.close()  # the proxy prints nothing else
    proc.in_address, proc.out_address = str(parts[0]), str(parts[1])
    return proc


# --------------------------------------------------------------------------- library replay


def library_spectra(
    element: str = "Cu", edge: str | None = None, *, calibrate: bool = True
) -> list[Spectrum]:
    """Measured spectra of ``element`` from the shared XAS Data Library, for replay.

    Files that cannot be turned into mu, or whose range misses their edge, are skipped. With
    ``calibrate`` a spectrum with a usable reference channel is shifted so that reference's E0
    is the tabulated edge (``meta['calibration_shift']``), putting it on absolute eV.
    """
    from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum

    sym = element.strip().capitalize()
    folder = paths.xas_data_library() / sym
    out: list[Spectrum] = []
    for path in sorted(folder.glob("*.xdi")):
        try:
            spec = xdi_to_spectrum(read_xdi(path))
        except (ValueError, OSError) as exc:  # XdiError, SpectrumError, units
            logger.debug("skipping %s: %s", path, exc)
            continue
        if spec.element not in (None, sym) or (edge and spec.edge != edge.strip().upper()):
            continue
        spec = spec.with_(element=sym)
        try:
            tab = edge_energy(sym, spec.edge)
        except KeyError:
            tab = None
        if tab is not None and not (spec.energy[0] + 10 <= tab <= spec.energy[-1] - 10):
            logger.debug("skipping %s: %s edge %.1f eV outside its range", path, spec.edge, tab)
            continue
        if calibrate:
            ref = _own_reference(spec, sym, spec.edge)
            if ref is not None:
                with contextlib.suppress(SpectrumError, KeyError):
                    shift = alignment_shift(ref, sym, spec.edge)
                    spec = align(spec, shift)
                    spec = spec.with_(meta={**spec.meta, "calibration_shift": shift})
        out.append(spec)
    return out


# --------------------------------------------------------------------------- sample spectra

#: Default extension of the demo spectra: down to this many eV below the tabulated edge.
DEMO_PRE_EDGE = 200.0
#: Width (eV) of the 1/dE tail that continues a FEFF spectrum below its first point.
_TAIL_WIDTH = 4.0


def _extend_feff_below(spectrum: Spectrum, down_to: float) -> Spectrum:
    """Continue a FEFF spectrum below its first point with the tail of its broadened edge.

    FEFF's XANES grid starts about 4 eV below the Fermi level (k = -1/Å), where mu is already
    a few per cent of the edge step. Below that, mu falls as the Lorentzian tail of the
    core-hole-broadened edge, ``mu_first * w / (w + E_first - E)`` with ``w`` = 4 eV
    (continuous at the first point), on a 5 eV grid; FEFF computes no other background.
    """
    first = float(spectrum.energy[0])
    if first <= down_to:
        return spectrum
    new_e = np.arange(down_to, first - 2.5, 5.0)
    tail = float(spectrum.mu[0]) * _TAIL_WIDTH / (_TAIL_WIDTH + first - new_e)
    return spectrum.with_(
        energy=np.concatenate((new_e, spectrum.energy)),
        mu=np.concatenate((tail, spectrum.mu)),
        meta={**spectrum.meta, "extended_below": first},
    )


def demo_spectra(
    names: Sequence[str] | None = None, *, pre_edge: float | None = DEMO_PRE_EDGE
) -> list[Spectrum]:
    """The packaged FEFF10 demo spectra of Cu reference compounds, as sample spectra.

    Read from ``xasflow/data/demo`` (no FEFF, no shared data), in ``names`` order (default:
    all, by name; an unknown name raises KeyError). ``meta`` carries ``name``, ``source``
    (``"feff_demo"``), ``formula`` and the ``expected`` labels. FEFF's grid starts at the
    edge, so by default each is continued down to ``pre_edge`` eV below the tabulated edge
    (:func:`_extend_feff_below`, ``meta['extended_below']``): step scans then get a pre-edge
    and the default grids keep their low end. ``pre_edge=None`` keeps FEFF's own range.
    """
    from xasflow.sim.feff_demo import load_demo_spectra

    demos = {d.name: d for d in load_demo_spectra()}
    chosen = list(demos) if names is None else list(names)
    missing = [n for n in chosen if n not in demos]
    if missing:
        raise KeyError(f"no packaged demo spectrum {missing}; have {sorted(demos)}")
    out = []
    for name in chosen:
        spec = demos[name].to_spectrum()
        if pre_edge is not None:
            spec = _extend_feff_below(spec, edge_energy(spec.element, spec.edge) - pre_edge)
        out.append(spec)
    return out


def sample_spectra(
    element: str = "Cu", edge: str | None = None, *, library: bool = True
) -> list[Spectrum]:
    """Sample spectra for simulated scans: the demo compounds, then measured library spectra.

    The packaged demo spectra (:func:`demo_spectra`, Cu K) come first and are always there
    for Cu; with ``library`` the shared XAS Data Library's spectra of ``element``
    (:func:`library_spectra`) follow when the library is present (nothing is added, and
    nothing fails, when it is not).
    """
    sym = element.strip().capitalize()
    want = edge.strip().upper() if edge else None
    out = [s for s in demo_spectra() if s.element == sym and want in (None, s.edge)]
    if library and paths.xas_data_library().is_dir():
        out += library_spectra(sym, want)
    return out
