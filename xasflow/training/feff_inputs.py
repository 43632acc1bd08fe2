"""FEFF10 inputs of generated training spectra: named presets, structures, unique sites, cards.

A :class:`FeffPreset` fixes the knobs that set cost and quality (cluster, SCF and FMS radii,
LDOS, core hole, energy grid); its name and full parameters are recorded in every generated
tree. ``converged`` has the shared Cu set's SCF (7 Å, 100 iterations, mixing 0.2, nmix 3),
FMS (9 Å), COREHOLE RPA, EXCHANGE and S02 cards (Lightshow's FEFF defaults, as in its
``feff.inp`` files) but not all of its cards: its cluster reaches 10 Å (the shared files'
ATOMS about 9.0 Å) and it writes ``XANES 6 0.04 0.1`` with a k grid to 6 Å⁻¹ (theirs:
``XANES 4 0.04 0.1``). The ``feff.inp`` cards are written by pymatgen's
:class:`~pymatgen.io.feff.sets.MPXANESSet` (the writer Lightshow uses), with the preset's tags.
"""

from __future__ import annotations

import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xasflow.adapters.feff import XANES_DIR

if TYPE_CHECKING:
    from pymatgen.core import Structure

_STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")
#: symprec values tried in turn for the symmetry-unique sites (the first one spglib accepts).
SYMPRECS = (0.1, 0.01)


@dataclass(frozen=True)
class FeffPreset:
    """FEFF10 settings of one generation run (radii in Å, ``kmax`` in Å⁻¹).

    ``scf_radius`` None runs without self-consistency (overlapped atomic potentials);
    ``ldos`` adds FEFF's LDOS card (angular-momentum projected DOS, extra cost).
    """

    name: str
    description: str
    cluster_radius: float
    fms_radius: float
    scf_radius: float | None
    scf_iterations: int = 30
    scf_mix: float = 0.2
    scf_nmix: int = 1
    ldos: bool = False
    corehole: str = "RPA"
    kmax: float = 6.0

    def tags(self) -> dict[str, Any]:
        """The ``user_tag_settings`` given to pymatgen's MPXANESSet for this preset."""
        tags: dict[str, Any] = {
            "CONTROL": "1 1 1 1 1 1",
            "PRINT": "1 0 0 0 0 0",
            "COREHOLE": self.corehole,
            "S02": "0",
            "EXCHANGE": "0 0.0 0.0 2",
            "FMS": f"{self.fms_radius:g} 0",
            "XANES": f"{self.kmax:g} 0.04 0.1",
            "RPATH": "-1",
            # the k grid reaches ~137 eV above the edge, past the model window (116.5 eV)
            "EGRID": f"\nk_grid -1 0 0.04\nk_grid 0 {self.kmax:g} 0.04",
        }
        deleted = []
        if self.scf_radius is None:
            deleted.append("SCF")
        else:
            tags["SCF"] = (
                f"{self.scf_radius:g} 0 {self.scf_iterations} {self.scf_mix:g} {self.scf_nmix}"
            )
        if self.ldos:
            tags["LDOS"] = "-30.0 15.0 0.1"
        else:
            deleted.append("LDOS")
        tags["_del"] = deleted
        return tags

    def to_dict(self) -> dict[str, Any]:
        """Every parameter, for ``generation.json`` and bundle manifests."""
        return asdict(self)

    def settings(self) -> dict[str, Any]:
        """Every parameter but the description (words about the others, which a resume
        compares: a tree is not refused because its preset was described otherwise)."""
        return {k: v for k, v in asdict(self).items() if k != "description"}


PRESETS: dict[str, FeffPreset] = {
    p.name: p
    for p in (
        FeffPreset(
            name="fast",
            description="no SCF, FMS 4 Å in a 5 Å cluster: screening and tests",
            cluster_radius=5.0,
            fms_radius=4.0,
            scf_radius=None,
        ),
        FeffPreset(
            name="standard",
            description="SCF 4 Å, FMS 6 Å in a 7 Å cluster: first two or three shells converged",
            cluster_radius=7.0,
            fms_radius=6.0,
            scf_radius=4.0,
        ),
        FeffPreset(
            name="converged",
            description="SCF 7 Å, FMS 9 Å in a 10 Å cluster: the shared Cu set's SCF/FMS cards, "
            "XANES 6 (theirs 4)",
            cluster_radius=10.0,
            fms_radius=9.0,
            scf_radius=7.0,
            scf_iterations=100,
            scf_nmix=3,
        ),
    )
}
#: The preset used when none is named (see the module docstring of xasflow.training.generate).
DEFAULT_PRESET = "standard"


def get_preset(name: str) -> FeffPreset:
    """The preset called ``name``; a ValueError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown FEFF preset {name!r}; known: {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class UniqueSite:
    """A symmetry-unique absorbing site: its index and the indices of all sites equal to it."""

    index: int
    multiplicity: int
    equivalent: tuple[int, ...]


def unique_sites(structure: Structure, element: str) -> tuple[list[UniqueSite], float | None]:
    """Symmetry-unique sites of ``element`` (lowest index of each class) and the symprec used.

    Uses pymatgen's SpacegroupAnalyzer at :data:`SYMPRECS` in turn (0.1 first, as
    :func:`xasflow.training.label_average.site_multiplicities` does, so both agree on the classes).
    If spglib fails at every symprec, every site is its own class and symprec is None.
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    element = element.strip().capitalize()
    mine = [i for i, site in enumerate(structure) if site.specie.symbol == element]
    for symprec in SYMPRECS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sym = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetrized_structure()
            groups = [sorted(int(i) for i in g) for g in sym.equivalent_indices]
        except Exception:  # spglib gives up on some cells: try the next tolerance
            continue
        chosen = [g for g in groups if g[0] in mine]
        if sorted(i for g in chosen for i in g) == mine:
            out = [UniqueSite(g[0], len(g), tuple(g)) for g in chosen]
            return sorted(out, key=lambda s: s.index), symprec
    return [UniqueSite(i, 1, (i,)) for i in mine], None


def feff_input(
    structure: Structure, site_index: int, preset: FeffPreset, edge: str = "K", title: str = ""
) -> str:
    """The ``feff.inp`` text for the absorber at ``site_index`` (pymatgen's MPXANESSet cards)."""
    from pymatgen.io.feff.sets import MPXANESSet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feff_set = MPXANESSet(
            site_index,
            structure,
            edge=edge,
            radius=preset.cluster_radius,
            user_tag_settings=preset.tags(),
        )
        parts = feff_set.all_input()
        parts["HEADER"] = feff_set.header(source=title, comment=f"xasflow preset {preset.name}")
        text = "\n\n".join(
            str(parts[k]) for k in ("HEADER", "PARAMETERS", "POTENTIALS", "ATOMS") if k in parts
        )
    return text + "\n"


@dataclass(frozen=True)
class InputStructure:
    """One input structure as POSCAR text (the indices every site refers to)."""

    material_id: str
    poscar: str
    source: str


@dataclass(frozen=True)
class Failure:
    """Something that produced no spectrum: ``item`` names it, ``reason`` is a short tag."""

    item: str
    reason: str
    detail: str


# ---------------------------------------------------------------------------------------
# Reading structures
# ---------------------------------------------------------------------------------------


def _structure_name(parts: tuple[str, ...]) -> str | None:
    """Material id of a structure file (its stem, or its folder for POSCAR/CONTCAR), or None."""
    name = parts[-1]
    if XANES_DIR in parts:
        return None
    if name.startswith(("POSCAR", "CONTCAR")) and not name.lower().endswith(".cif"):
        return parts[-2] if len(parts) > 1 and name in ("POSCAR", "CONTCAR") else name
    if name.lower().endswith(_STRUCTURE_SUFFIXES):
        return name.rsplit(".", 1)[0]
    return None


def _members(source: Path) -> Iterator[tuple[tuple[str, ...], Callable[[], bytes]]]:
    """(path parts, reader) of every structure file in a directory or tar, in sorted order."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file():
                yield path.relative_to(source).parts, path.read_bytes
        return
    with tarfile.open(source, mode="r:*") as tar:
        for member in tar:
            parts = tuple(p for p in member.name.split("/") if p and p != ".")
            if member.isfile() and parts and _structure_name(parts) is not None:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                yield parts, partial(bytes, data)


def read_structures(
    source: str | Path, element: str | None = None, limit: int | None = None
) -> tuple[list[InputStructure], list[Failure], int]:
    """Structures under ``source`` (directory or tar of CIF/POSCAR files) as POSCAR text.

    With ``element``, structures without it are left out (their number is returned third);
    unreadable or disordered ones become failures. ``limit`` stops after that many kept.
    """
    from pymatgen.core import Structure
    from pymatgen.io.vasp import Poscar

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no structures at {source}")
    if not source.is_dir() and not tarfile.is_tarfile(source):
        raise ValueError(f"{source} is neither a directory nor a tar archive")
    wanted = element.strip().capitalize() if element else None
    kept: dict[str, InputStructure] = {}
    failures: list[Failure] = []
    without = 0
    for parts, read in _members(source):
        mid = _structure_name(parts)
        if mid is None:
            continue
        where = "/".join(parts)
        fmt = "cif" if parts[-1].lower().endswith(".cif") else "poscar"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                text = read().decode("utf-8", "replace")
                structure = Structure.from_str(text, fmt=fmt)  # type: ignore[arg-type]
        except Exception as exc:  # pymatgen raises many kinds for bad files
            failures.append(Failure(where, "unreadable_structure", f"{type(exc).__name__}: {exc}"))
            continue
        if not structure.is_ordered:
            failures.append(Failure(where, "disordered", "partial occupancies: FEFF needs atoms"))
            continue
        if wanted and wanted not in {sp.symbol for sp in structure.composition.elements}:
            without += 1
            continue
        if mid in kept:
            failures.append(
                Failure(where, "duplicate_material", f"{mid} also in {kept[mid].source}")
            )
            continue
        kept[mid] = InputStructure(mid, Poscar(structure).get_str(), where)
        if limit is not None and len(kept) >= limit:
            break
    return list(kept.values()), failures, without
