"""The simulated beamline's physics: a sample and a reference foil behind ion chambers
(:class:`BeamlineModel`), with counting noise, and the energy grids it scans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xasflow.sim.references import _own_reference, default_reference
from xasflow.spectra.core import Spectrum
from xasflow.spectra.edges import edge_energy, infer_edge

#: Detector channel data keys, in order.
CHANNELS: tuple[str, str, str] = ("I0", "It", "Ir")
#: Above this many expected counts the Gaussian approximation replaces Poisson sampling.
_POISSON_MAX = 1e9


class BeamlineRangeError(ValueError):
    """Requested energies fall outside what the sample or reference spectrum covers."""


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
