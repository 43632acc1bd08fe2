"""The simulated beamline as ophyd devices: the energy axis and the step-scan and quick-XAS
(fly) detectors reading a :class:`~xasflow.sim.model.BeamlineModel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ophyd import Component, Device, Signal
from ophyd.sim import NullStatus, SynAxis

from xasflow.sim.model import CHANNELS, BeamlineModel

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
