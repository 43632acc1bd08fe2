"""The demo compounds' structures and their FEFF input: crystal structures (pymatgen), the
FEFF settings, absorber-centred clusters and the ``feff.inp`` text.

Split from :mod:`xasflow.sim.feff_demo` (which loads and regenerates the spectra); pymatgen is
needed only here, to regenerate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pymatgen is only needed to regenerate, not to load
    from pymatgen.core import Structure

CU_Z = 29


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
    ``kmax`` Å⁻¹ in 0.04 Å⁻¹ steps). ``vi0`` (eV) is the EXCHANGE card's constant imaginary
    potential: FEFF broadens by ``Gamma_ch / 2 + vi0`` (half width), so a negative value
    takes part of the core-hole width away, as HERFD does (J. Kas on the ifeffit list,
    12 June 2009: "use negative values to offset the core hole broadening").
    """

    cluster_radius: float = 6.5
    fms_radius: float = 5.0
    scf_radius: float = 4.0
    corehole: str = "RPA"
    kmax: float = 6.0
    s02: float = 0.0
    scf_mix: float = 0.2
    vi0: float = 0.0


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
        f"EXCHANGE  0 0.0 {float(settings.vi0)!r} 2",
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
