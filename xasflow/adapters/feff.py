"""Read FEFF run trees in the Lightshow layout, from a directory or a streamed ``.tar.gz``.

Layout: ``<root>/.../<material_id>/POSCAR`` and
``<material_id>/FEFF-XANES/<NNN>_<El>/xmu.dat``, where ``NNN`` is the 0-based index of the
absorbing site in the POSCAR. A material's id is its folder's name (``mp-1234``), or where
folders in different places share a name (runs merged as ``batchA/m1``, ``batchB/m1``) its
path below the root, so that two structures never share one id (and labels, keyed by it).
Bad items never stop a read: each becomes a :class:`ReadIssue`
with a short reason tag, and whatever is usable is kept.

Reason tags: ``missing_poscar`` / ``bad_poscar`` (material dropped: no structure, no labels),
``no_sites`` (material has no usable site spectra), ``missing_xmu``, ``bad_site_dir`` (name is
not ``NNN_El``), ``site_mismatch`` (POSCAR has another element at that index),
``truncated_archive`` (the tar stream ended early; what was read before is kept),
``duplicate_material`` (an id already taken, which only a material at the root itself named
like one of its sub-folders can meet), and from
the ``xmu.dat`` parser (:mod:`xasflow.adapters.feff_xmu`) ``empty_xmu``, ``truncated_xmu``
(fewer than :data:`~xasflow.adapters.feff_xmu.MIN_ROWS` rows, or the last row cut short) and
``bad_xmu`` (non-numeric, ragged, too few columns, non-finite).

Besides the spectrum, each site carries FEFF's energy bookkeeping (:class:`FeffEnergies`: the
Fermi level and interstitial values from the ``xmu.dat`` header, the offset between its
absolute ``omega`` and relative ``e`` columns, and the absorber's SCF charge from ``feff.out``),
which is what places the spectrum on FEFF's absolute energy scale.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xasflow.adapters.feff_energy import FeffEnergies, parse_feff_out
from xasflow.adapters.feff_xmu import _parse_xmu, _XmuProblem
from xasflow.spectra.core import Spectrum

#: Directory that holds one sub-directory per absorbing site.
XANES_DIR = "FEFF-XANES"
#: A material of the OmniXAS data set: ``FEFF/<El>/<Materials Project id>`` below its root
#: (the archive's own layout, ``FEFF/Cu/mp-1036393/FEFF-XANES/015_Cu/xmu.dat``; mvc- ids too).
_OMNIXAS_ID = re.compile(r"^(?:mp|mvc)-\d+$")

_SITE_DIR = re.compile(r"^(\d+)_([A-Za-z]{1,2})$")


@dataclass(frozen=True, eq=False)
class FeffSite:
    """One absorbing site's FEFF spectrum: omega (eV) and mu from xmu.dat."""

    material_id: str
    site_index: int
    element: str
    energy: np.ndarray
    mu: np.ndarray
    source: str
    edge: str = "K"
    energies: FeffEnergies = field(default_factory=FeffEnergies)

    def to_spectrum(self) -> Spectrum:
        """This site as a :class:`Spectrum`; meta has ids, source and ``feff_*`` energies."""
        return Spectrum(
            energy=self.energy,
            mu=self.mu,
            element=self.element,
            edge=self.edge,
            meta={
                "material_id": self.material_id,
                "site_index": self.site_index,
                "source": self.source,
                "calculated": True,  # a calculation: no pre-edge background to subtract
                **self.energies.as_meta(),
            },
        )


@dataclass(frozen=True, eq=False)
class FeffMaterial:
    """A material: its POSCAR text and its usable site spectra, sorted by site index."""

    material_id: str
    poscar: str
    sites: tuple[FeffSite, ...]


@dataclass(frozen=True)
class ReadIssue:
    """Something that could not be read: ``item`` names it, ``reason`` is a short tag."""

    item: str
    reason: str
    detail: str


@dataclass
class FeffTree:
    """The result of reading a tree: usable materials (sorted) and the issues met on the way."""

    materials: list[FeffMaterial] = field(default_factory=list)
    issues: list[ReadIssue] = field(default_factory=list)
    #: whether any usable material lies where the OmniXAS data set puts one (its citation)
    omnixas: bool = False

    @property
    def n_sites(self) -> int:
        """Total number of usable site spectra."""
        return sum(len(m.sites) for m in self.materials)

    def sites(self) -> Iterator[FeffSite]:
        """All usable sites, material by material."""
        for material in self.materials:
            yield from material.sites

    def issue_counts(self) -> dict[str, int]:
        """Number of issues per reason tag, sorted by tag."""
        return dict(sorted(Counter(i.reason for i in self.issues).items()))


def _poscar_species(text: str) -> list[str] | None:
    """Species of each site in POSCAR order, or None when the file does not say (VASP 4)."""
    lines = text.splitlines()
    if len(lines) < 7:
        raise ValueError(f"only {len(lines)} lines")
    names, counts = lines[5].split(), lines[6].split()
    if names and all(tok.isdigit() for tok in names):
        return None  # VASP 4 style: no species line
    if len(names) != len(counts) or not all(tok.isdigit() for tok in counts):
        raise ValueError(f"species line {lines[5]!r} does not match counts {lines[6]!r}")
    return [
        name.split("_")[0].split("/")[0]
        for name, n in zip(names, counts, strict=True)
        for _ in range(int(n))
    ]


@dataclass
class _SiteRaw:
    result: tuple[np.ndarray, np.ndarray, str, FeffEnergies] | None = None
    feff_out: dict[str, float | bool] | None = None
    problem: tuple[str, str] | None = None
    source: str = ""
    has_xmu: bool = False
    crashed: bool = False


@dataclass
class _MaterialRaw:
    name: str
    poscar: str | None = None
    has_xanes_dir: bool = False
    sites: dict[str, _SiteRaw] = field(default_factory=dict)


class _Collector:
    """Accumulates members of a tree in any order; :meth:`finish` builds the FeffTree."""

    def __init__(
        self, root_name: str, element: str | None, limit: int | None, root: tuple[str, ...] = ()
    ) -> None:
        self.root_name = root_name
        self.root = root  # a directory's own path, above the members' parts
        self.element = element.strip().capitalize() if element else None
        self.limit = limit
        self.materials: dict[tuple[str, ...], _MaterialRaw] = {}
        self.extra_issues: list[ReadIssue] = []

    def full(self, key: tuple[str, ...]) -> bool:
        """True when ``key`` would be a material beyond ``limit``."""
        return (
            self.limit is not None
            and key not in self.materials
            and len(self.materials) >= self.limit
        )

    def _material(self, key: tuple[str, ...]) -> _MaterialRaw:
        if key not in self.materials:
            self.materials[key] = _MaterialRaw(name=key[-1] if key else self.root_name)
        return self.materials[key]

    @staticmethod
    def material_key(parts: tuple[str, ...], is_file: bool) -> tuple[str, ...] | None:
        """The material directory a member belongs to, or None when it is not in one."""
        if XANES_DIR in parts:
            return parts[: parts.index(XANES_DIR)]
        if is_file and parts and parts[-1] == "POSCAR":
            return parts[:-1]
        return None

    def add(
        self,
        parts: tuple[str, ...],
        is_file: bool,
        read: Callable[[], bytes],
        source: str,
    ) -> None:
        """Register one member (directory or file); ``read`` is called only when needed."""
        key = self.material_key(parts, is_file)
        if key is None:
            return
        if XANES_DIR not in parts:  # the POSCAR
            self._material(key).poscar = read().decode("utf-8", errors="replace")
            return
        material = self._material(key)
        material.has_xanes_dir = True
        rest = parts[len(key) + 1 :]
        if not rest:
            return
        if len(rest) == 1 and is_file:
            return  # a stray file directly in FEFF-XANES, not a site dir
        site_name = rest[0]
        match = _SITE_DIR.match(site_name)
        if match is None:
            material.sites.setdefault(site_name, _SiteRaw())
            return
        if self.element and match.group(2).capitalize() != self.element:
            return
        site = material.sites.setdefault(site_name, _SiteRaw())
        if len(rest) == 2 and rest[1] == ".feff.error" and is_file:
            site.crashed = True
        elif len(rest) == 2 and rest[1] == "xmu.dat" and is_file:
            site.has_xmu = True
            site.source = source
            try:
                site.result = _parse_xmu(read())
            except _XmuProblem as exc:
                site.problem = (exc.reason, exc.detail)
        elif len(rest) == 2 and rest[1] == "feff.out" and is_file:
            site.feff_out = parse_feff_out(read())

    def finish(self) -> FeffTree:
        """Validate what was collected and build the sorted tree (ids: the module's doc)."""
        tree = FeffTree(issues=list(self.extra_issues))
        names = Counter(raw.name for raw in self.materials.values())
        taken: set[str] = set()
        for key in sorted(self.materials, key=lambda k: (self.materials[k].name, k)):
            raw, where = self.materials[key], "/".join(key)
            mid = where if names[raw.name] > 1 and key else raw.name
            if mid in taken:
                detail = f"{where or self.root_name}: another material has the id {mid!r}"
                tree.issues.append(ReadIssue(mid, "duplicate_material", detail))
                continue
            taken.add(mid)
            material = self._finish_material(raw, mid, where, tree.issues)
            if material is not None:
                tree.materials.append(material)
                tree.omnixas |= _omnixas_layout((*self.root, *key), material)
        tree.issues.sort(key=lambda i: (i.item, i.reason))
        return tree

    def _finish_material(
        self, raw: _MaterialRaw, mid: str, where: str, issues: list[ReadIssue]
    ) -> FeffMaterial | None:
        if raw.poscar is None:
            # with an element filter, an empty site list may just mean "other elements only"
            if raw.sites or not self.element:
                detail = f"{where}: {len(raw.sites)} site dirs but no POSCAR"
                issues.append(ReadIssue(mid, "missing_poscar", detail))
            return None
        try:
            species = _poscar_species(raw.poscar)
        except ValueError as exc:
            issues.append(ReadIssue(mid, "bad_poscar", f"{where}/POSCAR: {exc}"))
            return None
        if not raw.has_xanes_dir:
            issues.append(ReadIssue(mid, "no_sites", f"{where}: POSCAR but no {XANES_DIR} dir"))
            return None
        sites: list[FeffSite] = []
        for site_name in sorted(raw.sites):
            site = self._finish_site(mid, where, site_name, raw.sites[site_name], species, issues)
            if site is not None:
                sites.append(site)
        if not sites:
            if raw.sites:
                detail = f"{where}: none of {len(raw.sites)} site dirs is usable"
            elif self.element:
                return None  # only other elements' sites: filtered, not a problem
            else:
                detail = f"{where}: {XANES_DIR} has no site dirs"
            issues.append(ReadIssue(mid, "no_sites", detail))
            return None
        sites.sort(key=lambda s: s.site_index)
        return FeffMaterial(material_id=mid, poscar=raw.poscar, sites=tuple(sites))

    @staticmethod
    def _finish_site(
        mid: str,
        where: str,
        site_name: str,
        raw: _SiteRaw,
        species: list[str] | None,
        issues: list[ReadIssue],
    ) -> FeffSite | None:
        item = f"{mid}/{site_name}"
        match = _SITE_DIR.match(site_name)
        if match is None:
            issues.append(
                ReadIssue(item, "bad_site_dir", f"{where}: expected NNN_El, got {site_name!r}")
            )
            return None
        if not raw.has_xmu:
            hint = " (FEFF left .feff.error: the run crashed)" if raw.crashed else ""
            issues.append(
                ReadIssue(item, "missing_xmu", f"{where}/{XANES_DIR}/{site_name}: no xmu.dat{hint}")
            )
            return None
        if raw.problem is not None:
            issues.append(ReadIssue(item, raw.problem[0], f"{raw.source}: {raw.problem[1]}"))
            return None
        index, element = int(match.group(1)), match.group(2).capitalize()
        if species is not None and (index >= len(species) or species[index] != element):
            found = species[index] if index < len(species) else f"nothing ({len(species)} sites)"
            issues.append(
                ReadIssue(
                    item, "site_mismatch", f"POSCAR has {found} at index {index}, not {element}"
                )
            )
            return None
        assert raw.result is not None
        energy, mu, edge, energies = raw.result
        if raw.feff_out is not None:
            energies = replace(
                energies,
                absorber_charge=float(raw.feff_out["absorber_charge"]),
                scf_converged=bool(raw.feff_out["scf_converged"]),
            )
        energy.setflags(write=False)
        mu.setflags(write=False)
        return FeffSite(
            material_id=mid,
            site_index=index,
            element=element,
            energy=energy,
            mu=mu,
            source=raw.source,
            edge=edge,
            energies=energies,
        )


def omnixas_citation(element: str) -> str:
    """The citation the OmniXAS FEFF spectra ask for (its licence: attribution), for
    ``element``'s K edge: owed by a bundle trained on them, and only by such a bundle."""
    return (
        f"Training data: FEFF 9 {element} K-edge XANES from the OmniXAS project (BSD-3-Clause) "
        "computed on Materials Project structures (CC-BY 4.0; Jain et al., APL Mater. 1, "
        "011002 (2013))."
    )


def _omnixas_layout(parts: tuple[str, ...], material: FeffMaterial) -> bool:
    """Whether a material at ``parts`` lies as in the OmniXAS data set: ``FEFF/<El>/<MP id>``,
    ``<El>`` its absorbers' element (not just any path with "feff" in it)."""
    return (
        len(parts) >= 3
        and parts[-3] == "FEFF"
        and bool(_OMNIXAS_ID.match(parts[-1]))
        and all(site.element == parts[-2] for site in material.sites)
    )


def is_tree_archive(path: Path) -> bool:
    """Whether ``path`` names a FEFF tree packed as an archive (.tar.gz / .tgz)."""
    name = path.name.lower()
    return name.endswith((".tar.gz", ".tgz"))


def _read_tar(path: Path, collector: _Collector, progress: bool) -> None:
    total = path.stat().st_size
    with (
        open(path, "rb") as raw,
        tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress) as bar,
        tarfile.open(fileobj=raw, mode="r|gz") as tar,
    ):
        try:
            for member in tar:
                bar.update(raw.tell() - bar.n)
                parts = tuple(p for p in member.name.split("/") if p and p != ".")
                key = collector.material_key(parts, member.isfile())
                if key is None:
                    continue
                if collector.full(key):
                    break
                collector.add(
                    parts,
                    member.isfile(),
                    partial(_member_bytes, tar, member),
                    member.name,
                )
        except (EOFError, tarfile.ReadError, OSError, zlib.error) as exc:
            collector.extra_issues.append(
                ReadIssue(path.name, "truncated_archive", f"stream ended early: {exc}")
            )


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of a regular-file member (``add`` reads only those, so one is always there)."""
    stream = tar.extractfile(member)
    assert stream is not None, f"{member.name} is not a regular file"
    return stream.read()


def _read_dir(path: Path, collector: _Collector, progress: bool) -> None:
    with tqdm(desc=path.name, unit=" dirs", disable=not progress) as bar:
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            bar.update(1)
            rel = Path(dirpath).relative_to(path).parts
            key = collector.material_key(rel, False)
            if key is not None:
                if collector.full(key):
                    return
                collector.add(rel, False, bytes, dirpath)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                parts = (*rel, name)
                key = collector.material_key(parts, True)
                if key is None:
                    continue
                if collector.full(key):
                    return
                collector.add(parts, True, Path(full).read_bytes, full)


def read_feff_tree(
    path: str | Path,
    element: str | None = None,
    progress: bool = False,
    limit: int | None = None,
) -> FeffTree:
    """Read every material's POSCAR and site spectra under ``path`` (a directory or .tar.gz).

    A tar is streamed in one pass, never extracted. ``element`` keeps only ``NNN_<element>``
    site dirs; ``limit`` stops after that many materials (archive order for a tar, sorted
    directory order on disk). Output is sorted by material id, then site index.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no FEFF tree at {path}")
    root_name = path.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    root = path.resolve().parts if path.is_dir() else ()
    collector = _Collector(root_name, element, limit, root)
    if path.is_dir():
        _read_dir(path, collector, progress)
    elif is_tree_archive(path):
        _read_tar(path, collector, progress)
    else:
        raise ValueError(f"{path} is neither a directory nor a .tar.gz/.tgz archive")
    return collector.finish()
