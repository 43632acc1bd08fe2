"""A material's label from its computed sites: symmetry multiplicities and the weighted mean.

An experiment measures every absorbing site of a material at once, so a material's spectrum is
labelled with the average of its sites' labels (:func:`average_labels`), each weighted by how
many sites of the element it stands for (:func:`site_multiplicities`, by symmetry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xasflow.training.labels import SiteLabels, _quiet

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["average_labels", "site_multiplicities"]


def site_multiplicities(
    structure: Structure,
    site_indices: Sequence[int],
    symprecs: Sequence[float] = (0.1, 0.01, 0.001),
) -> dict[int, int]:
    """How many sites of its element each computed site stands for, by symmetry equivalence.

    Tries each ``symprec`` and keeps the first partition where every site of the element falls
    in a group with exactly one computed site; otherwise the one leaving fewest sites unmapped
    (then fewest shared groups); a group's sites are split evenly among its computed sites.
    Sites in groups without a computed site stay unmapped. If symmetry fails, every site is 1.
    """
    computed = list(dict.fromkeys(int(i) for i in site_indices))
    fallback = dict.fromkeys(computed, 1)
    if not computed or any(not 0 <= i < len(structure) for i in computed):
        return fallback
    try:
        elements = {structure[i].specie.symbol for i in computed}
    except AttributeError:  # disordered site
        return fallback

    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    best: tuple[tuple[int, int], dict[int, int]] | None = None
    with _quiet():
        for symprec in symprecs:
            try:
                sym = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetrized_structure()
                groups = sym.equivalent_indices
            except Exception:
                continue
            score, mult = _split_groups(structure, groups, computed, elements)
            if best is None or score < best[0]:
                best = (score, mult)
            if score == (0, 0):
                break
    return fallback if best is None else best[1]


def _split_groups(
    structure: Structure, groups: Sequence[Sequence[int]], computed: list[int], elements: set[str]
) -> tuple[tuple[int, int], dict[int, int]]:
    """Multiplicities for one symmetry partition, and a score (unmapped sites, shared groups)."""
    mult = dict.fromkeys(computed, 0)
    unmapped = shared = 0
    for group in groups:
        members = [i for i in group if structure[i].specie.symbol in elements]
        if not members:
            continue
        here = [i for i in computed if i in set(members)]
        if not here:
            unmapped += len(members)
            continue
        if len(here) > 1:
            shared += 1
        base, extra = divmod(len(members), len(here))
        for k, i in enumerate(here):
            mult[i] = base + (1 if k < extra else 0)
    for i in computed:  # a computed site the partition missed (should not happen) counts itself
        mult[i] = max(mult[i], 1)
    return (unmapped, shared), mult


def average_labels(
    labels: Sequence[SiteLabels], weights: Sequence[float] | np.ndarray
) -> SiteLabels:
    """Weighted site average for a material, since an experiment measures all sites at once.

    Vectors, distance and BVS are weighted means (BVS None if any site lacks one); the
    oxidation state is kept only when every site has the same one, else None.
    """
    if not labels:
        raise ValueError("average_labels needs at least one SiteLabels")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (len(labels),):
        raise ValueError(f"{len(labels)} labels but {w.size} weights")
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    w = w / w.sum()
    cn = np.einsum("i,ij->j", w, np.stack([lab.cn_vector for lab in labels]))
    motif = np.einsum("i,ij->j", w, np.stack([lab.motif_vector for lab in labels]))
    distance = float(np.dot(w, [lab.mean_nn_distance for lab in labels]))
    bvs_values = [lab.bvs for lab in labels if lab.bvs is not None]
    bvs = float(np.dot(w, bvs_values)) if len(bvs_values) == len(labels) else None
    states = [lab.oxidation_state for lab in labels]
    known_states = [s for s in states if s is not None]
    notes: list[str] = [f"average of {len(labels)} sites"]
    oxidation: int | None = None
    if len(known_states) == len(states) and len(set(states)) == 1:
        oxidation = round(float(np.dot(w, known_states)))
    else:
        notes.append(f"oxidation states differ or missing: {states}")
    notes.extend(dict.fromkeys(n for lab in labels for n in lab.notes))
    return SiteLabels(cn, motif, distance, oxidation, bvs, tuple(notes))
