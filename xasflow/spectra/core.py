"""The ``Spectrum`` value type shared by training, the daemon and the adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class SpectrumError(ValueError):
    """A spectrum that cannot be processed; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[SpectrumError], tuple[str, str]]:
        # pickles (the daemon's preparation process sends them back) as (reason, message)
        return (type(self), (self.reason, self.message))


#: How many refused points a not_finite message names before '... and N more'.
_NAMED = 5


def nonfinite_detail(
    bad: np.ndarray, energy: np.ndarray | None = None, noun: tuple[str, str] = ("point", "points")
) -> str:
    """'1 point is NaN or infinite, at 8975.5 eV': how many of ``bad`` (a mask) and where.

    Where is the energy of each (the first few), or its position (``point 3``, from 1) where
    ``energy`` is None or not finite there, so that the value can be found in the file.
    """
    index = np.flatnonzero(bad)
    head = f"1 {noun[0]} is" if index.size == 1 else f"{index.size} {noun[1]} are"
    shown = index[:_NAMED].tolist()
    at_energy = [k for k in shown if energy is not None and np.isfinite(energy[k])]
    at_point = [k + 1 for k in shown if k not in at_energy]
    where = []
    if at_energy and energy is not None:
        where.append(", ".join(f"{energy[k]:.7g}" for k in at_energy) + " eV")
    if at_point:
        word = "point" if len(at_point) == 1 else "points"
        where.append(f"{word} " + ", ".join(map(str, at_point)))
    more = f" and {index.size - len(shown)} more" if index.size > len(shown) else ""
    return f"{head} NaN or infinite, at {', '.join(where)}{more}"


@dataclass(frozen=True)
class Spectrum:
    """One absorption spectrum mu(E) on an absolute energy axis in eV.

    ``energy`` is strictly increasing after construction (points are sorted and exact
    duplicates dropped); ``mu`` is whatever the source gives (FEFF mu, ln(I0/It), ...).
    ``element`` and ``edge`` say which absorption edge this is; ``e0`` is filled once known.
    """

    energy: np.ndarray
    mu: np.ndarray
    element: str | None = None
    edge: str = "K"
    e0: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        energy = np.asarray(self.energy, dtype=np.float64).ravel()
        mu = np.asarray(self.mu, dtype=np.float64).ravel()
        if energy.shape != mu.shape:
            raise SpectrumError("shape", f"energy has {energy.size} points but mu has {mu.size}")
        if energy.size < 3:
            raise SpectrumError("too_short", f"only {energy.size} points")
        if not (np.isfinite(energy).all() and np.isfinite(mu).all()):
            bad = ~np.isfinite(energy) | ~np.isfinite(mu)
            raise SpectrumError("not_finite", nonfinite_detail(bad, energy))
        if not (energy[1:] > energy[:-1]).all():
            order = np.argsort(energy, kind="stable")
            energy, mu = energy[order], mu[order]
            keep = np.concatenate(([True], np.diff(energy) > 0))
            energy, mu = energy[keep], mu[keep]
            if energy.size < 3:
                raise SpectrumError("too_short", "fewer than 3 distinct energies")
        object.__setattr__(self, "energy", energy)
        object.__setattr__(self, "mu", mu)
        if self.element is not None:
            object.__setattr__(self, "element", self.element.strip().capitalize())
        object.__setattr__(self, "edge", self.edge.strip().upper())

    @property
    def label(self) -> str:
        """A short human-readable name for messages."""
        return str(self.meta.get("name") or self.meta.get("source") or "spectrum")

    def with_(self, **changes: Any) -> Spectrum:
        """Return a copy with some fields replaced (the type is immutable)."""
        values: dict[str, Any] = {
            "energy": self.energy,
            "mu": self.mu,
            "element": self.element,
            "edge": self.edge,
            "e0": self.e0,
            "meta": dict(self.meta),
        }
        values.update(changes)
        if "energy" in changes or "mu" in changes:
            return Spectrum(**values)
        # same (already validated) arrays: skip the checks, which cost more than the copy
        new = object.__new__(Spectrum)
        for name, value in values.items():
            object.__setattr__(new, name, value)
        if new.element is not None:
            object.__setattr__(new, "element", new.element.strip().capitalize())
        object.__setattr__(new, "edge", new.edge.strip().upper())
        return new
