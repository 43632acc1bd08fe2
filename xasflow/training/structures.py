"""What the dataset builders read off a structure: absorber counts, sites and the formula
that groups materials for the split (polymorphs and duplicate entries share one)."""

from __future__ import annotations

import re


def _species(name: str) -> str:
    """The element of a POSCAR species name (``Cu``, ``Cu_pv``, ``Cu/5f3b`` -> ``Cu``)."""
    return re.split(r"[_/]", name, maxsplit=1)[0]


def poscar_counts(poscar: str) -> dict[str, int]:
    """Sites per element of a VASP 5 POSCAR (species and counts on lines 6-7); empty if absent."""
    lines = poscar.splitlines()
    for k in range(5, min(len(lines) - 1, 8)):
        names, counts = lines[k].split(), lines[k + 1].split()
        if names and counts and all(c.isdigit() for c in counts) and len(names) == len(counts):
            out: dict[str, int] = {}
            for n, c in zip(names, counts, strict=True):
                out[_species(n)] = out.get(_species(n), 0) + int(c)
            return out
    return {}


def element_count(poscar: str, element: str) -> int:
    """How many sites of ``element`` a POSCAR holds (0 when its counts cannot be read)."""
    return poscar_counts(poscar).get(element, 0)


def reduced_formula(counts: dict[str, int]) -> str:
    """pymatgen's reduced formula of element counts (``{'Cu': 4, 'O': 4}`` -> ``CuO``), or ""."""
    from pymatgen.core import Composition

    try:
        return str(Composition(counts).reduced_formula) if counts else ""
    except ValueError:  # a species pymatgen does not know: no formula, the id groups alone
        return ""


def poscar_formula(poscar: str) -> str:
    """The reduced formula of a POSCAR, or "" when its species line is missing."""
    return reduced_formula(poscar_counts(poscar))


def structure_poscar(structure: dict) -> tuple[str, str]:
    """A pymatgen structure dict as POSCAR text (the label workers take POSCAR strings) and
    its reduced formula."""
    from pymatgen.core import Structure
    from pymatgen.io.vasp import Poscar

    s = Structure.from_dict(structure)
    return Poscar(s).get_str(), str(s.composition.reduced_formula)


def element_sites(structure: dict, element: str) -> tuple[int, ...]:
    """Indices of the sites of ``element`` in a pymatgen structure dict."""
    out = []
    for i, site in enumerate(structure.get("sites", [])):
        species = [s.get("element", "") for s in site.get("species", [])]
        if any(str(sp).rstrip("0123456789+-") == element for sp in species):
            out.append(i)
    return tuple(out)
