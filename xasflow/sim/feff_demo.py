"""xasflow's own demo spectra: Cu K-edge XANES of five reference Cu sites, computed with FEFF10.

Each compound is built with pymatgen from textbook lattice parameters and Wyckoff positions
(written below, with their sources), a small cluster around one Cu absorber is cut out, the
``feff.inp`` cards are written by :func:`feff_input_text`, and FEFF10 is run through the
``feff10-rs`` Python bindings (``feff10.run(text, work_dir)``, which runs each FEFF stage in
a fresh worker process and leaves ``xmu.dat`` in ``work_dir``). The result is stored as one
small JSON file per compound in ``xasflow/data/demo/``; :func:`load_demo_spectra` reads them
back from the installed package without needing FEFF, pymatgen or a network.

Regenerate (minutes on two cores; needs the ``train`` extra and ``feff10-rs``)::

    .venv/bin/python -m xasflow.sim.feff_demo --out xasflow/data/demo

The compounds cover five Cu sites (motif names are the label vocabulary of
:data:`xasflow.training.labels.MOTIFS`, and a test checks that
:func:`xasflow.training.labels.label_sites` gives each site the expected CN, motif and
oxidation state):

=========  ==========================  ==  ================  =====
name       compound                    CN  motif             Cu ox
=========  ==========================  ==  ================  =====
CuO        tenorite                    4   square co-planar  +2
Cu2O       cuprite                     2   linear            +1
CuCl       nantokite (γ-CuCl)          4   tetrahedral       +1
CuAl2O4    normal spinel, A site       4   tetrahedral       +2
Cu_MgO     Cu²⁺ in MgO (rock salt)     6   octahedral        +2
=========  ==========================  ==  ================  =====

Cu_MgO and CuAl2O4 are idealised: the dilute Cu²⁺ in MgO keeps the host's undistorted
Mg site, and CuAl2O4 is taken as a fully normal spinel, although the real compound is
partly inverse (some Cu on the octahedral site). Both are textbook cases of their motif.
Cu_MgO needs slower SCF mixing (``DemoCompound.feff_overrides``): with the default 0.2
FEFF's first SCF iteration overfills the lone Cu 3d shell and stops ("Cannot determine
Norman radius").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xasflow.spectra.core import Spectrum

if TYPE_CHECKING:  # pymatgen is only needed to regenerate, not to load
    from pymatgen.core import Structure

#: Where the generated JSON files live inside the ``xasflow`` package.
DEMO_RESOURCE = ("data", "demo")
#: Format tag written into every JSON file.
SCHEMA = "xasflow.demo_spectrum/1"
CU_Z = 29


# --------------------------------------------------------------------------------------
# Loading (no FEFF, no pymatgen)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSpectrum:
    """One packaged demo spectrum and the labels it is expected to carry.

    ``energy`` (eV, FEFF's absolute scale) and ``mu`` (FEFF ``mu``, normalised to an edge
    step of about one) are 1-D float arrays of equal length.
    """

    name: str
    formula: str
    energy: np.ndarray
    mu: np.ndarray
    expected_cn: int
    expected_motif: str
    expected_oxidation_state: int
    element: str = "Cu"
    edge: str = "K"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, Any]:
        """The expected labels as a plain dict (``cn``, ``motif``, ``oxidation_state``)."""
        return {
            "cn": self.expected_cn,
            "motif": self.expected_motif,
            "oxidation_state": self.expected_oxidation_state,
        }

    def to_spectrum(self) -> Spectrum:
        """Return this demo as an xasflow :class:`~xasflow.spectra.core.Spectrum`.

        ``meta`` carries ``name``, ``source`` (``"feff_demo"``), ``formula`` and the
        expected labels, so downstream code can score a prediction against them.
        """
        meta = {
            "name": self.name,
            "source": "feff_demo",
            "formula": self.formula,
            "expected": self.labels,
            **{k: v for k, v in self.meta.items() if k not in {"feff_inp"}},
        }
        return Spectrum(
            energy=self.energy, mu=self.mu, element=self.element, edge=self.edge, meta=meta
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoSpectrum:
        """Build from the JSON document written by :func:`write_demo_json`."""
        expected = data["expected"]
        keys: tuple[str, ...] = ("structure", "feff", "cluster", "feff_inp", "notes")
        meta: dict[str, Any] = {k: data[k] for k in keys if k in data}
        return cls(
            name=str(data["name"]),
            formula=str(data["formula"]),
            energy=np.asarray(data["energy"], dtype=np.float64),
            mu=np.asarray(data["mu"], dtype=np.float64),
            expected_cn=int(expected["cn"]),
            expected_motif=str(expected["motif"]),
            expected_oxidation_state=int(expected["oxidation_state"]),
            element=str(data.get("element", "Cu")),
            edge=str(data.get("edge", "K")),
            meta=meta,
        )


def load_demo_spectra() -> list[DemoSpectrum]:
    """Load the packaged demo spectra (``xasflow/data/demo/*.json``), sorted by name."""
    root = resources.files("xasflow").joinpath(*DEMO_RESOURCE)
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append(DemoSpectrum.from_dict(json.loads(entry.read_text(encoding="utf-8"))))
    return out


# --------------------------------------------------------------------------------------
# Structures (textbook lattice parameters and Wyckoff positions)
# --------------------------------------------------------------------------------------


def cuo_tenorite() -> Structure:
    """CuO, tenorite: C2/c (15), Cu 4c (1/4,1/4,0), O 4e (0,y,1/4) with y = 0.4184.

    Åsbrink & Norrby, Acta Cryst. B26, 8 (1970): a = 4.6837, b = 3.4226, c = 5.1288 Å,
    β = 99.54°. Cu has four O at 1.95–1.96 Å in a (nearly) square plane.
    """
    from pymatgen.core import Lattice, Structure

    lattice = Lattice.monoclinic(4.6837, 3.4226, 5.1288, 99.54)
    return Structure.from_spacegroup(
        "C2/c", lattice, ["Cu", "O"], [[0.25, 0.25, 0.0], [0.0, 0.4184, 0.25]]
    )


def cu2o_cuprite() -> Structure:
    """Cu2O, cuprite: Pn-3m (224), Cu 4b (0,0,0), O 2a (1/4,1/4,1/4) (origin choice 1).

    Restori & Schwarzenbach, Acta Cryst. B42, 201 (1986): a = 4.2696 Å. Each Cu has two
    O at a√3/4 = 1.849 Å on a straight line (O–Cu–O 180°).
    """
    from pymatgen.core import Lattice, Structure

    a = 4.2696
    # Written out explicitly (the body-centred O sublattice, Cu in half the O-O midpoints),
    # so the result does not depend on the origin choice used by the space-group tables.
    cu = [[0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]]
    o = [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
    return Structure(Lattice.cubic(a), ["Cu"] * 4 + ["O"] * 2, cu + o)


def cucl_nantokite() -> Structure:
    """γ-CuCl, nantokite: zincblende F-43m (216), Cu 4a (0,0,0), Cl 4c (1/4,1/4,1/4).

    Room-temperature a = 5.42 Å (Wyckoff, *Crystal Structures* vol. 1, 2nd ed., 1963;
    Hull & Keen, Phys. Rev. B 50, 5868 (1994)). Cu has four Cl at a√3/4 = 2.35 Å.
    """
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup(
        "F-43m", Lattice.cubic(5.42), ["Cu", "Cl"], [[0.0, 0.0, 0.0], [0.25, 0.25, 0.25]]
    )


def mgo_periclase() -> Structure:
    """MgO, periclase: rock salt Fm-3m (225), Mg 4a (0,0,0), O 4b (1/2,1/2,1/2).

    a = 4.2112 Å (Hazen, Am. Mineral. 61, 266 (1976)). Used as the host of a dilute Cu²⁺
    substituting for Mg (the (Mg,Cu)O rock-salt solid solution): six O at 2.106 Å.
    """
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.2112), ["Mg", "O"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
    )


def cual2o4_spinel() -> Structure:
    """CuAl2O4 as a normal spinel: Fd-3m (227), Cu 8a, Al 16d, O 32e (u,u,u).

    Written in origin choice 1 (pymatgen's setting): Cu (0,0,0), Al (5/8,5/8,5/8),
    O (u,u,u) with u = 0.390 (0.265 in origin choice 2), a = 8.080 Å. Single-crystal XRD
    along the MgAl2O4-CuAl2O4 series ("Cation ordering over short-range and long-range
    scales in the MgAl2O4-CuAl2O4 series", Am. Mineral. 97, 2012) gives a = 8.079-8.087 Å
    and a tetrahedral Cu²⁺-O distance of 1.960 Å; u is chosen to reproduce it
    (√3·a·(u - 1/4) = 1.959 Å here, Al-O = 1.907 Å).
    """
    from pymatgen.core import Lattice, Structure

    u = 0.390
    return Structure.from_spacegroup(
        "Fd-3m",
        Lattice.cubic(8.080),
        ["Cu", "Al", "O"],
        [[0.0, 0.0, 0.0], [0.625, 0.625, 0.625], [u, u, u]],
    )


@dataclass(frozen=True)
class DemoCompound:
    """One reference compound: how to build it and what its Cu site is."""

    name: str
    formula: str
    build: Callable[[], Structure]
    absorber_element: str
    expected_cn: int
    expected_motif: str
    expected_oxidation_state: int
    source: str
    notes: str = ""
    #: FeffSettings fields this compound needs changed (e.g. ``{"scf_mix": 0.05}``).
    feff_overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def substituted(self) -> bool:
        """True when the absorbing Cu replaces a host atom (a dilute dopant)."""
        return self.absorber_element != "Cu"

    def settings(self, base: FeffSettings | None = None) -> FeffSettings:
        """``base`` (default :data:`DEFAULT_SETTINGS`) with this compound's overrides applied."""
        return replace(base or DEFAULT_SETTINGS, **dict(self.feff_overrides))

    def absorber_structure(self) -> tuple[Structure, int]:
        """The structure with Cu on the absorbing site, and that site's index.

        For a substituted compound the first ``absorber_element`` site becomes Cu (the
        structure the FEFF cluster describes); used to label the site with
        :func:`xasflow.training.labels.label_sites`.
        """
        structure = self.build()
        index = next(i for i, s in enumerate(structure) if s.specie.symbol == self.absorber_element)
        if self.substituted:
            structure = structure.copy()
            structure.replace(index, "Cu")
        return structure, index


COMPOUNDS: tuple[DemoCompound, ...] = (
    DemoCompound(
        name="CuO",
        formula="CuO",
        build=cuo_tenorite,
        absorber_element="Cu",
        expected_cn=4,
        expected_motif="square co-planar",
        expected_oxidation_state=2,
        source=(
            "tenorite, C2/c, a=4.6837 b=3.4226 c=5.1288 A, beta=99.54 deg, Cu 4c (1/4,1/4,0), "
            "O 4e (0,0.4184,1/4); Asbrink & Norrby, Acta Cryst. B26, 8 (1970)"
        ),
    ),
    DemoCompound(
        name="Cu2O",
        formula="Cu2O",
        build=cu2o_cuprite,
        absorber_element="Cu",
        expected_cn=2,
        expected_motif="linear",
        expected_oxidation_state=1,
        source=(
            "cuprite, Pn-3m, a=4.2696 A, Cu 4b (0,0,0), O 2a (1/4,1/4,1/4) (origin 1); "
            "Restori & Schwarzenbach, Acta Cryst. B42, 201 (1986)"
        ),
    ),
    DemoCompound(
        name="CuCl",
        formula="CuCl",
        build=cucl_nantokite,
        absorber_element="Cu",
        expected_cn=4,
        expected_motif="tetrahedral",
        expected_oxidation_state=1,
        source=(
            "gamma-CuCl (nantokite), zincblende F-43m, a=5.42 A, Cu 4a (0,0,0), "
            "Cl 4c (1/4,1/4,1/4); Wyckoff, Crystal Structures vol. 1 (1963); "
            "Hull & Keen, Phys. Rev. B 50, 5868 (1994)"
        ),
    ),
    DemoCompound(
        name="CuAl2O4",
        formula="CuAl2O4",
        build=cual2o4_spinel,
        absorber_element="Cu",
        expected_cn=4,
        expected_motif="tetrahedral",
        expected_oxidation_state=2,
        source=(
            "normal spinel CuAl2O4, Fd-3m (origin 1), a=8.080 A, Cu 8a (0,0,0), "
            "Al 16d (5/8,5/8,5/8), O 32e (u,u,u) u=0.390; a and T-O = 1.960 A from "
            "'Cation ordering over short-range and long-range scales in the "
            "MgAl2O4-CuAl2O4 series', Am. Mineral. 97 (2012)"
        ),
        notes=(
            "Fully normal spinel (all Cu tetrahedral, Cu-O = 1.959 A x4); real CuAl2O4 is "
            "partly inverse, with some Cu2+ on the octahedral site."
        ),
    ),
    DemoCompound(
        name="Cu_MgO",
        formula="(Mg,Cu)O",
        build=mgo_periclase,
        absorber_element="Mg",
        expected_cn=6,
        expected_motif="octahedral",
        expected_oxidation_state=2,
        source=(
            "periclase MgO, rock salt Fm-3m, a=4.2112 A, Mg 4a, O 4b; Hazen, Am. Mineral. "
            "61, 266 (1976); one Mg replaced by the absorbing Cu (dilute Cu2+ in MgO)"
        ),
        notes=(
            "Undistorted host geometry: Cu-O = 2.106 A x6, no Jahn-Teller relaxation. "
            "Only the absorber is Cu; all other cations in the cluster are Mg. "
            "SCF mixing 0.05 (0.2 stops in FEFF's first SCF iteration)."
        ),
        feff_overrides={"scf_mix": 0.05},
    ),
)


# --------------------------------------------------------------------------------------
# FEFF input
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeffSettings:
    """The FEFF10 knobs that set cost and quality (radii in Å).

    ``cluster_radius`` is the ATOMS list, ``fms_radius`` the full-multiple-scattering
    sphere, ``scf_radius`` the self-consistent potential sphere and ``scf_mix`` its mixing
    fraction (FEFF's ``ca``). The energy grid matches pymatgen's XANES sets (k from -1 to
    ``kmax`` Å⁻¹ in 0.04 Å⁻¹ steps).
    """

    cluster_radius: float = 6.5
    fms_radius: float = 5.0
    scf_radius: float = 4.0
    corehole: str = "RPA"
    kmax: float = 6.0
    s02: float = 0.0
    scf_mix: float = 0.2


DEFAULT_SETTINGS = FeffSettings()


@dataclass(frozen=True)
class ClusterAtom:
    """One atom of the FEFF cluster, absorber at the origin."""

    symbol: str
    z: int
    xyz: tuple[float, float, float]
    distance: float


def build_cluster(structure: Structure, absorber_element: str, radius: float) -> list[ClusterAtom]:
    """Cut a sphere of ``radius`` Å around the first ``absorber_element`` site.

    The absorber is always written as Cu (Z=29), even when it replaces a host atom; atoms are
    sorted by distance (ties by coordinates, so the output is deterministic).
    """
    from pymatgen.core import Element

    index = next(i for i, s in enumerate(structure) if s.specie.symbol == absorber_element)
    centre = structure[index].coords
    atoms = [ClusterAtom("Cu", CU_Z, (0.0, 0.0, 0.0), 0.0)]
    neighbours = []
    for nb in structure.get_neighbors(structure[index], radius):
        xyz = np.asarray(nb.coords) - centre
        key = tuple(float(c) + 0.0 for c in np.round(xyz, 5))
        neighbours.append((round(float(nb.nn_distance), 5), key, nb))
    neighbours.sort(key=lambda t: (t[0], t[1]))
    for dist, pos, nb in neighbours:
        symbol = nb.specie.symbol
        x, y, z = pos
        atoms.append(ClusterAtom(symbol, Element(symbol).Z, (x, y, z), dist))
    return atoms


def feff_input_text(
    compound: DemoCompound, structure: Structure, settings: FeffSettings = DEFAULT_SETTINGS
) -> str:
    """Write the complete ``feff.inp`` for one compound (Cu K edge XANES)."""
    cluster = build_cluster(structure, compound.absorber_element, settings.cluster_radius)
    # Potentials: 0 = absorbing Cu, then one per element present in the cluster (Cu first,
    # then by increasing Z); the stoichiometry column is the unit-cell composition.
    comp = structure.composition.element_composition
    elements = sorted({a.symbol for a in cluster[1:]}, key=lambda s: (s != "Cu", s))
    ipot = {sym: i + 1 for i, sym in enumerate(elements)}
    lines = [
        f"TITLE xasflow demo: {compound.name} ({compound.formula}), Cu K-edge XANES",
        f"TITLE Cu site: CN {compound.expected_cn} {compound.expected_motif}, "
        f"Cu{compound.expected_oxidation_state}+",
        f"TITLE structure: {compound.source}",
        "",
        "EDGE      K",
        f"S02       {settings.s02:g}",
        "CONTROL   1 1 1 1 1 1",
        "PRINT     1 0 0 0 0 0",
        "EXCHANGE  0 0.0 0.0 2",
        f"COREHOLE  {settings.corehole}",
        f"SCF       {settings.scf_radius:g} 0 30 {settings.scf_mix:g} 1",
        f"FMS       {settings.fms_radius:g} 0",
        f"XANES     {settings.kmax:g} 0.04 0.1",
        "RPATH     -1",
        "EGRID",
        "k_grid    -1 0 0.04",
        f"k_grid    0 {settings.kmax:g} 0.04",
        "",
        "POTENTIALS",
        "*  ipot   Z  tag   lmax1  lmax2  xnatph",
        f"   0   {CU_Z:3d}  Cu      -1     -1   0.0001",
    ]
    for sym in elements:
        from pymatgen.core import Element

        stoich = float(comp[Element(sym)])
        if sym == compound.absorber_element and compound.substituted:
            stoich = max(stoich, 1.0)
        lines.append(f"   {ipot[sym]}   {Element(sym).Z:3d}  {sym:<3s}     -1     -1   {stoich:g}")
    lines += ["", "ATOMS", "*        x          y          z   ipot  tag   distance"]
    for i, atom in enumerate(cluster):
        pot = 0 if i == 0 else ipot[atom.symbol]
        x, y, z = (c + 0.0 for c in atom.xyz)  # + 0.0 turns -0.0 into 0.0
        lines.append(
            f"  {x:10.5f} {y:10.5f} {z:10.5f}   {pot:d}   {atom.symbol:<3s} {atom.distance:9.5f}"
        )
    lines += ["END", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Running FEFF10 and writing the JSON
# --------------------------------------------------------------------------------------


def feff_versions(xmu_header: Sequence[str] = ()) -> dict[str, str]:
    """Versions of the FEFF binding (``feff10-rs``) and, when the header names it, FEFF."""
    from importlib.metadata import version

    out = {"feff10_rs": version("feff10-rs")}
    for line in xmu_header:
        if "FEFF" in line.upper():
            tokens = line.replace("#", " ").split()
            for i, tok in enumerate(tokens):
                if tok.upper() == "FEFF" and i + 1 < len(tokens):
                    out["feff"] = f"FEFF {tokens[i + 1]}"
                    return out
    return out


def _print(message: str) -> None:
    print(message, flush=True)


def run_feff(
    feff_inp: str, work_dir: Path, log: Callable[[str], None] = _print
) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Run FEFF10 on ``feff_inp`` in ``work_dir``; return energy, mu, xmu header, seconds.

    ``feff10.run`` accepts the raw ``feff.inp`` text, runs the default FEFF10 stage
    pipeline (RDINP, POT, SCREEN, XSPH, FMS, ..., FF2X) each in a fresh worker process and
    leaves ``xmu.dat`` in ``work_dir``; ``result.read_xmu()`` parses it.
    """
    import feff10

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "feff.inp").write_text(feff_inp, encoding="utf-8")
    t0 = time.perf_counter()
    result = feff10.run(feff_inp, str(work_dir))  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    slow = sorted(result.stages, key=lambda sr: -sr.duration_secs)[:3]
    log(
        f"  {work_dir.name} slowest stages: "
        + ", ".join(f"{sr.stage.executable_name} {sr.duration_secs:.0f}s" for sr in slow)
    )
    xmu = result.read_xmu()
    # xmu.dat columns: omega (eV), e (eV rel. to edge), k, mu, mu0, chi
    energy = np.asarray(xmu.column(0), dtype=np.float64)
    mu = np.asarray(xmu.column(3), dtype=np.float64)
    return energy, mu, list(xmu.header), seconds


def demo_document(
    compound: DemoCompound,
    energy: np.ndarray,
    mu: np.ndarray,
    feff_inp: str,
    settings: FeffSettings,
    n_atoms: int,
    versions: dict[str, str],
    seconds: float,
) -> dict[str, Any]:
    """Assemble the JSON document for one compound (energy 0.01 eV, mu 5 significant)."""
    return {
        "schema": SCHEMA,
        "name": compound.name,
        "formula": compound.formula,
        "element": "Cu",
        "edge": "K",
        "expected": {
            "cn": compound.expected_cn,
            "motif": compound.expected_motif,
            "oxidation_state": compound.expected_oxidation_state,
        },
        "structure": {"source": compound.source, "builder": compound.build.__name__},
        "cluster": {
            "n_atoms": n_atoms,
            "cluster_radius": settings.cluster_radius,
            "fms_radius": settings.fms_radius,
            "scf_radius": settings.scf_radius,
            "scf_mix": settings.scf_mix,
            "corehole": settings.corehole,
        },
        "feff": {**versions, "runtime_s": round(seconds, 1)},
        "notes": compound.notes,
        "energy": [round(float(e), 2) for e in energy],
        "mu": [float(f"{m:.5g}") for m in mu],
        "feff_inp": feff_inp,
    }


def write_demo_json(doc: dict[str, Any], out_dir: Path) -> Path:
    """Write one document to ``out_dir/<name>.json`` (compact arrays, readable header)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['name']}.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def generate(
    out_dir: Path,
    names: Sequence[str] | None = None,
    settings: FeffSettings = DEFAULT_SETTINGS,
    keep_work: Path | None = None,
    jobs: int = 2,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Build, run FEFF10 for and write every (or each named) demo compound.

    Each compound runs with ``compound.settings(settings)`` (its ``feff_overrides`` on top of
    ``settings``). ``jobs`` FEFF runs go at once (each FEFF10 stage is serial, one core per run).
    ``keep_work`` keeps the FEFF working directories there (one per compound); otherwise
    they live in a temporary directory that is removed afterwards.
    """
    chosen = [c for c in COMPOUNDS if names is None or c.name in names]
    unknown = set(names or ()) - {c.name for c in COMPOUNDS}
    if unknown:
        raise ValueError(f"unknown demo compound(s): {sorted(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="xasflow_feff_")) if keep_work is None else keep_work
    log = log or _print

    def one(compound: DemoCompound) -> Path:
        structure = compound.build()
        own = compound.settings(settings)
        feff_inp = feff_input_text(compound, structure, own)
        n_atoms = len(build_cluster(structure, compound.absorber_element, own.cluster_radius))
        log(f"{compound.name}: {n_atoms} atoms, running FEFF10 ...")
        energy, mu, header, seconds = run_feff(feff_inp, tmp / compound.name, log)
        doc = demo_document(
            compound, energy, mu, feff_inp, own, n_atoms, feff_versions(header), seconds
        )
        path = write_demo_json(doc, out_dir)
        log(f"{compound.name}: {len(energy)} points in {seconds:.0f} s -> {path}")
        return path

    try:
        # feff10.run releases the GIL and runs FEFF in worker processes, so threads suffice.
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, chosen))
    finally:
        if keep_work is None:
            shutil.rmtree(tmp, ignore_errors=True)


def plot_demo_spectra(path: Path, demos: Sequence[DemoSpectrum] | None = None) -> Path:
    """Plot the demo spectra (full range and a zoom on the edge) to ``path`` (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demos = list(demos) if demos is not None else load_demo_spectra()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for d in demos:
        label = f"{d.name}: CN{d.expected_cn} {d.expected_motif}, Cu{d.expected_oxidation_state}+"
        for ax in axes:
            ax.plot(d.energy, d.mu, label=label)
    axes[0].set_title("FEFF10 Cu K-edge XANES (xasflow demo)")
    axes[1].set_title("edge region")
    axes[1].set_xlim(8978, 9015)
    for ax in axes:
        ax.set_xlabel("energy (eV, FEFF absolute scale)")
        ax.set_ylabel("mu (FEFF, edge step ~ 1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m xasflow.sim.feff_demo --out xasflow/data/demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("xasflow/data/demo"))
    parser.add_argument("--only", nargs="*", help="compound names (default: all)")
    parser.add_argument("--keep-work", type=Path, help="keep FEFF work directories here")
    parser.add_argument("--cluster-radius", type=float, default=DEFAULT_SETTINGS.cluster_radius)
    parser.add_argument("--fms-radius", type=float, default=DEFAULT_SETTINGS.fms_radius)
    parser.add_argument("--scf-radius", type=float, default=DEFAULT_SETTINGS.scf_radius)
    parser.add_argument("--corehole", default=DEFAULT_SETTINGS.corehole)
    parser.add_argument("--jobs", type=int, default=2, help="FEFF runs at once (default 2)")
    parser.add_argument("--plot", type=Path, help="only plot the packaged spectra to this PNG")
    args = parser.parse_args(argv)
    if args.plot is not None:
        print(plot_demo_spectra(args.plot))
        return 0
    settings = FeffSettings(
        cluster_radius=args.cluster_radius,
        fms_radius=args.fms_radius,
        scf_radius=args.scf_radius,
        corehole=args.corehole,
    )
    generate(args.out, args.only or None, settings, args.keep_work, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
