"""Chemical shift: edge position above the Fermi level, for FEFF and foil-calibrated spectra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_feff import FERMI_ABSOLUTE, PROTOTYPES, write_tree

from xasflow.adapters.feff import read_feff_tree
from xasflow.spectra import PrepParams, Spectrum, SpectrumError, find_e0
from xasflow.spectra.energy import chemical_shift, edge_crossing, fermi_reference

# plain Larch-style fits (no edge-tail correction): the synthetic edges have no arctan tail
PREP = PrepParams(window_stop=116.5, n_points=240, edge_tail=False)


def step_edge(e0: float, meta: dict | None = None, element: str | None = "Cu") -> Spectrum:
    """A clean edge: mu rises linearly from 0 to 1 between e0 - 2 and e0 + 2, flat above."""
    energy = np.arange(e0 - 60.0, e0 + 150.0, 0.25)
    mu = np.clip((energy - (e0 - 2.0)) / 4.0, 0.0, 1.0)
    return Spectrum(energy=energy, mu=mu, element=element, meta=meta or {})


def test_edge_crossing_interpolates_the_rise() -> None:
    s = step_edge(8983.0)
    assert edge_crossing(s, PREP, e0=8983.0, level=0.5) == pytest.approx(8983.0, abs=1e-9)
    assert edge_crossing(s, PREP, e0=8983.0, level=0.25) == pytest.approx(8982.0, abs=1e-9)
    # E0 found from the data when not given; scale-free (normalised to the edge step)
    scaled = s.with_(mu=3.0 * s.mu + 0.5)
    assert edge_crossing(scaled, PREP, level=0.75) == pytest.approx(8984.0, abs=1e-9)


def test_edge_crossing_follows_an_energy_shift() -> None:
    energy = np.linspace(8940.0, 9100.0, 700)
    mu = 0.5 + np.arctan((energy - 8981.3) / 1.5) / np.pi
    a = Spectrum(energy=energy, mu=mu, element="Cu")
    b = Spectrum(energy=energy + 2.7, mu=mu, element="Cu")
    assert edge_crossing(b, PREP, level=0.4) - edge_crossing(a, PREP, level=0.4) == pytest.approx(
        2.7, abs=1e-6
    )


def test_level_never_reached_is_an_error() -> None:
    s = step_edge(8983.0)
    with pytest.raises(SpectrumError, match=r"never reaches 1\.5"):
        edge_crossing(s, PREP, e0=8983.0, level=1.5)


def test_fermi_reference_feff_meta_or_tabulated_edge() -> None:
    assert fermi_reference(step_edge(8983.0, {"feff_fermi_absolute": 8987.6})) == 8987.6
    assert fermi_reference(step_edge(8983.0)) == 8978.9  # foil-calibrated: Cu K edge
    assert fermi_reference(step_edge(8983.0, {"feff_fermi_absolute": float("nan")})) == 8978.9
    with pytest.raises(SpectrumError, match="absorbing element"):
        fermi_reference(step_edge(8983.0, element=None))


def test_same_physics_same_shift_on_both_axes() -> None:
    # a FEFF run whose omega axis is 8.7 eV off, and the measured spectrum of the same edge
    feff = step_edge(8983.0 + 8.7, {"feff_fermi_absolute": 8978.9 + 8.7})
    measured = step_edge(8983.0)
    assert chemical_shift(feff, PREP) == pytest.approx(4.1, abs=1e-9)
    assert chemical_shift(measured, PREP) == pytest.approx(4.1, abs=1e-9)


def test_synthetic_tree_shifts_follow_the_prototypes(tmp_path: Path) -> None:
    tree = read_feff_tree(write_tree(tmp_path, per_type=2, broken=False))
    shifts: dict[str, list[float]] = {}
    for site in tree.sites():
        spectrum = site.to_spectrum()
        assert fermi_reference(spectrum) == pytest.approx(FERMI_ABSOLUTE, abs=0.01)
        value = chemical_shift(spectrum, PREP, find_e0(spectrum))
        shifts.setdefault(site.material_id.split("-")[1], []).append(value)
    # the omega offsets scatter by ~2 eV between runs, the shifts of one prototype do not
    assert all(np.ptp(v) < 0.5 for v in shifts.values())
    # CuO's edge is 4 eV above Cu2O's; the white lines and the normalisation of a calculation
    # (step from the post-edge mean) move the half-height crossings by under an eV
    gap = PROTOTYPES["CuO"][4] - PROTOTYPES["Cu2O"][4]
    assert abs(np.mean(shifts["CuO"]) - np.mean(shifts["Cu2O"]) - gap) < 1.0
