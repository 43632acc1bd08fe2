"""A small synthetic FEFF run tree (Lightshow layout) for end-to-end training tests.

Three real structure types with Cu in different environments (cuprite Cu2O: CN 2 linear,
zincblende CuCl: CN 4 tetrahedral, rocksalt CuO: CN 6 octahedral), each at a few lattice
scalings. The ``xmu.dat`` spectra are model curves whose white line, edge position and
oscillation period depend on the environment, so a model can learn them and a test can fail
if the pipeline scrambles rows, labels or features. ``small_config`` trains on it in seconds.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from xasflow.training.fit import TrainConfig

PROTOTYPES = {
    # name: (space group, a (Å), species, coords, edge shift eV, white-line height, width eV)
    "Cu2O": (
        "P1",
        4.27,
        ["Cu"] * 4 + ["O"] * 2,
        [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5], [0.25] * 3, [0.75] * 3],
        0.0,
        0.6,
        3.0,
    ),
    "CuCl": ("F-43m", 5.41, ["Cu", "Cl"], [[0.0, 0.0, 0.0], [0.25, 0.25, 0.25]], 1.5, 1.0, 4.0),
    "CuO": ("Fm-3m", 4.20, ["Cu", "O"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], 4.0, 1.6, 6.0),
}
XMU_HEADER = "# Synthetic test spectrum, FEFF xmu.dat layout\n#  Abs   Z=29 Rmt= 1.2 Rnm= 1.3 K  shell\n#  omega    e    k    mu    mu0     chi\n"
#: FEFF 9 writes the SCF Fermi level and interstitial values in this header line
INTERSTITIAL = "# # Mu={mu:.3E}eV kf=2.090E+00 Vint=-2.132E+01eV Rs_int= 1.736\n"
#: where the synthetic Fermi level sits on the absolute omega axis, eV
FERMI_ABSOLUTE = 8979.0
#: ``feff.out`` tail with the SCF charge transfer per potential (absorber is type 0)
FEFF_OUT = """Calculating SCF potentials ...
New Fermi level:    mu= {mu:7.3f} eV  Charge distance=  0.0001 (partial c.d.=  0.0001)
Charge transfer:  type  charge
       0 {charge:8.3f}
       1   -0.146
       2    0.370
Convergence reached in   14 iterations.
Done with module: potentials.
"""
#: absorber charge transfer per prototype (more oxidised, more charge lost)
CHARGES = {"Cu2O": -0.25, "CuCl": -0.35, "CuO": -0.55}


def model_mu(energy: np.ndarray, e0: float, height: float, width: float, nn: float) -> np.ndarray:
    """Edge step, a white line and EXAFS-like wiggles with a period set by the NN distance."""
    rel = energy - e0
    step = 0.5 + np.arctan(rel / 1.5) / np.pi
    white = height * np.exp(-0.5 * ((rel - width) / 2.5) ** 2)
    k = np.sqrt(np.clip(rel, 0, None) * 0.2625)
    wiggle = 0.15 * np.sin(2 * k * nn + 1.0) * np.exp(-rel / 80) * (rel > 5)
    return step + white + wiggle


def poscar(name: str, scale: float, element: str = "Cu") -> str:
    """POSCAR text of a prototype at a lattice scaling, its Cu replaced by ``element``."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.vasp import Poscar

    species, frac_coords = _cell(name, element)
    return Poscar(
        Structure(Lattice.cubic(PROTOTYPES[name][1] * scale), species, frac_coords)
    ).get_str()


@functools.cache
def _cell(name: str, element: str) -> tuple[list[str], np.ndarray]:
    """The prototype's full cubic cell (species, fractional coordinates), expanded from its
    space group once: a cubic group's orbits in fractional coordinates do not depend on the
    lattice constant, and pymatgen's SpaceGroup took ~0.7 s per ``from_spacegroup`` call,
    most of ``write_tree``'s time (the trees and POSCARs are byte for byte as before)."""
    from pymatgen.core import Lattice, Structure

    sg, a, cu_species, coords, *_ = PROTOTYPES[name]
    species = [element if sp == "Cu" else sp for sp in cu_species]
    if sg == "P1":
        return species, np.array(coords, dtype=float)
    s = Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords)
    return [site.specie.symbol for site in s], s.frac_coords.copy()


#: K-edge energies (eV) of the absorbers a synthetic tree can have.
K_EDGES = {"Cu": 8979.0, "Ni": 8333.0}


def write_tree(
    root: Path, per_type: int = 6, seed: int = 0, broken: bool = True, element: str = "Cu"
) -> Path:
    """Write ``root/<El>/<material>/{POSCAR, FEFF-XANES/000_<El>/xmu.dat}``; returns ``root/<El>``.

    The Cu prototypes with ``element`` on the Cu sites and the edge at its K energy. With
    ``broken``, adds one material with a truncated ``xmu.dat`` and one with a POSCAR
    pymatgen cannot read, so tests can check that bad items are reported, not fatal.
    """
    rng = np.random.default_rng(seed)
    base = root / element
    site_dir = f"000_{element}"
    edge = K_EDGES[element] + 1.0
    for name, (_, a, *_rest, shift, height, width) in PROTOTYPES.items():
        for k in range(per_type):
            scale = 1.0 + 0.04 * (k / max(per_type - 1, 1) - 0.5)
            mid = f"syn-{name}-{k}"
            site = base / mid / "FEFF-XANES" / site_dir
            site.mkdir(parents=True)
            (base / mid / "POSCAR").write_text(poscar(name, scale, element))
            e0 = edge + shift + rng.normal(0, 0.3)
            energy = np.arange(e0 - 18.0, e0 + 130.0, 0.5)
            nn = a * scale * {"Cu2O": np.sqrt(3) / 4, "CuCl": np.sqrt(3) / 4, "CuO": 0.5}[name]
            mu = model_mu(energy, e0, height, width, nn) + rng.normal(0, 0.004, energy.size)
            # FEFF's omega = e + core-level offset; the Fermi level sits at e = Mu
            offset = edge + 15.0 + round(rng.normal(0, 2.0), 3)
            fermi = round(K_EDGES[element] - offset, 3)  # the Fermi level at the edge
            table = np.column_stack(
                [energy, energy - offset, np.zeros_like(energy), mu, np.ones_like(mu), mu - 1]
            )
            rows = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in table)
            header = INTERSTITIAL.format(mu=fermi) + XMU_HEADER
            (site / "xmu.dat").write_text(header + rows + "\n")
            (site / "feff.out").write_text(FEFF_OUT.format(mu=fermi, charge=CHARGES[name]))
    if broken:
        bad = base / "syn-truncated" / "FEFF-XANES" / site_dir
        bad.mkdir(parents=True)
        (base / "syn-truncated" / "POSCAR").write_text(poscar("CuO", 1.0, element))
        (bad / "xmu.dat").write_text(XMU_HEADER + f"{edge:.1f} 0.0 0.0 1.0\n")
        junk = base / "syn-badposcar" / "FEFF-XANES" / site_dir
        junk.mkdir(parents=True)
        (base / "syn-badposcar" / "POSCAR").write_text(f"not a structure\n1.0\n{element}\n1\n")
        good = (base / "syn-CuO-0" / "FEFF-XANES" / site_dir / "xmu.dat").read_text()
        (junk / "xmu.dat").write_text(good)
    return base


def small_config() -> TrainConfig:
    from xasflow.training.fit import TrainConfig

    small = {"members": 2, "max_epochs": 30, "patience": 10}
    cfg = TrainConfig(
        n_estimators=12,
        n_jobs=1,
        test_fraction=0.3,
        val_fraction=0.15,
        split_by="material",  # the synthetic tree's 24 materials have three formulas
        networks=("mlp", "cnn"),
        network_overrides={"mlp": {**small, "hidden": [32, 32]}, "cnn": small},
        ood_spread=True,
    )
    return cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"copies": 1})})
