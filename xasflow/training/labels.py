"""Structure labels per absorbing site: CN, coordination motif, NN distance, valence.

Follows Zheng, Chen et al. 2020 (Patterns) and Torrisi et al. 2020 (TRIXS): CrystalNN
(default parameters) gives a weight per coordination number; the motif vector is matminer's
``CrystalNNFingerprint.from_preset("ops")`` without the Steinhardt q2/q4/q6 entries, rebuilt
here on pymatgen's ``LocalStructOrderParams`` (matminer is not a dependency); valences come
from pymatgen's ``BVAnalyzer`` and the continuous charge from the bond-valence sum.

pymatgen is imported lazily so the vocabulary (``MOTIFS``) and the cache (de)serialisers work
without the ``train`` extra.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = [
    "BV_CUTOFF",
    "BV_DISTANCE_SCALE",
    "CN_MAX",
    "CN_THRESHOLD",
    "LABELS_SCHEMA",
    "MOTIFS",
    "MOTIF_THRESHOLD",
    "LabelFailure",
    "SiteLabels",
    "environment_label",
    "label_sites",
]

#: Version of the label definitions and of the array layout; bump when either changes.
LABELS_SCHEMA = 1
#: Largest coordination number in the CN vector (CN 1..12, as in CrystalNNFingerprint "ops").
CN_MAX = 12
#: A CN enters the CN ranking label when its CrystalNN weight is at least this (Zheng 2020).
CN_THRESHOLD = 0.2
#: A (CN, motif) pair enters the motif ranking when its weighted order parameter reaches this.
MOTIF_THRESHOLD = 0.05
#: Neighbour cutoff (Å) for the bond-valence sum; BVAnalyzer's default ``max_radius``.
BV_CUTOFF = 4.0
#: Distance scale for the bond-valence sum; BVAnalyzer's default, meant for GGA-relaxed cells.
BV_DISTANCE_SCALE = 1.015

#: Label vocabulary: (CN, motif) in fixed order; the motif vector follows this order.
MOTIFS: tuple[tuple[int, str], ...] = (
    (1, "single bond"),
    (2, "L-shaped"),
    (2, "water-like"),
    (2, "bent 120 degrees"),
    (2, "bent 150 degrees"),
    (2, "linear"),
    (3, "trigonal planar"),
    (3, "trigonal non-coplanar"),
    (3, "T-shaped"),
    (4, "square co-planar"),
    (4, "tetrahedral"),
    (4, "rectangular see-saw-like"),
    (4, "see-saw-like"),
    (4, "trigonal pyramidal"),
    (5, "pentagonal planar"),
    (5, "square pyramidal"),
    (5, "trigonal bipyramidal"),
    (6, "hexagonal planar"),
    (6, "octahedral"),
    (6, "pentagonal pyramidal"),
    (7, "hexagonal pyramidal"),
    (7, "pentagonal bipyramidal"),
    (8, "body-centered cubic"),
    (8, "hexagonal bipyramidal"),
    (12, "cuboctahedral"),
)

# Order-parameter type and parameters per motif, exactly as matminer's CrystalNNFingerprint
# passes them to LocalStructOrderParams (taken from pymatgen's cn_opt_params.yaml; None means
# pymatgen's defaults). Pinned here so labels do not drift with the pymatgen version; a test
# checks this table against the installed pymatgen.
_MOTIF_OPS: dict[tuple[int, str], tuple[str, dict[str, float] | None]] = {
    (1, "single bond"): ("sgl_bd", None),
    (2, "L-shaped"): ("bent", {"TA": 0.5, "IGW_TA": 15.15}),
    (2, "water-like"): ("bent", {"TA": 0.5802777777777778, "IGW_TA": 13.95}),
    (2, "bent 120 degrees"): ("bent", {"TA": 0.666666666667, "IGW_TA": 13.25}),
    (2, "bent 150 degrees"): ("bent", {"TA": 0.833333333333333, "IGW_TA": 12.45}),
    (2, "linear"): ("bent", {"TA": 1, "IGW_TA": 8.667}),
    (3, "trigonal planar"): ("tri_plan_max", None),
    (3, "trigonal non-coplanar"): (
        "tet_max",
        {"TA": 0.6081734479693927, "IGW_TA": 18.33, "fac_AA": 1.5, "exp_cos_AA": 2},
    ),
    (3, "T-shaped"): ("T", None),
    (4, "square co-planar"): ("sq_plan_max", None),
    (4, "tetrahedral"): ("tet_max", None),
    (4, "rectangular see-saw-like"): ("see_saw_rect", None),
    (4, "see-saw-like"): (
        "tri_bipyr",
        {
            "min_SPP": 2.356194490192345,
            "IGW_EP": 15.75,
            "IGW_SPP": 12.75,
            "fac_AA": 1.5,
            "exp_cos_AA": 2,
            "w_SPP": 1,
        },
    ),
    (4, "trigonal pyramidal"): ("tri_pyr", None),
    (5, "pentagonal planar"): ("pent_plan_max", None),
    (5, "square pyramidal"): ("sq_pyr", None),
    (5, "trigonal bipyramidal"): ("tri_bipyr", None),
    (6, "hexagonal planar"): ("hex_plan_max", None),
    (6, "octahedral"): ("oct_max", None),
    (6, "pentagonal pyramidal"): ("pent_pyr", None),
    (7, "hexagonal pyramidal"): ("hex_pyr", None),
    (7, "pentagonal bipyramidal"): ("pent_bipyr", None),
    (8, "body-centered cubic"): ("bcc", None),
    (8, "hexagonal bipyramidal"): ("hex_bipyr", None),
    (12, "cuboctahedral"): ("cuboct_max", None),
}

# pymatgen warnings that are known-harmless for this use: unset oxidation states (CrystalNN
# then falls back to covalent/atomic radii, which is what Zheng/Torrisi labels used too) and
# the deprecation chatter that comes with that fallback.
_HARMLESS_WARNINGS = (
    r"No oxidation states specified on sites",
    r"CrystalNN: cannot locate an appropriate radius",
    r"Set OLD_ERROR_HANDLING to false",
)

# Notes are recorded only for weights that matter; CrystalNN routinely leaves ~1e-3 beyond CN 12.
_NOTE_WEIGHT = 1e-3


def environment_label(index: int) -> str:
    """Combined CN-motif environment label for ``MOTIFS[index]``, e.g. ``"CN4-square co-planar"``."""
    cn, name = MOTIFS[index]
    return f"CN{cn}-{name}"


@dataclass(frozen=True, eq=False)
class SiteLabels:
    """Structure labels of one absorbing site (or a site average for a material).

    ``cn_vector[k]`` is the CrystalNN weight of CN k+1; ``motif_vector`` holds the CN-weighted
    order parameters in ``MOTIFS`` order. ``mean_nn_distance`` is in Å (NaN when CrystalNN
    found no first shell). ``oxidation_state`` is None where BVAnalyzer could not assign one;
    ``notes`` says why, and records anything else worth knowing (dropped CN weight, ...).
    """

    cn_vector: np.ndarray
    motif_vector: np.ndarray
    mean_nn_distance: float
    oxidation_state: int | None
    bvs: float | None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        cn = np.array(self.cn_vector, dtype=np.float64).reshape(-1)
        motif = np.array(self.motif_vector, dtype=np.float64).reshape(-1)
        if cn.shape != (CN_MAX,):
            raise ValueError(f"cn_vector must have {CN_MAX} entries, got {cn.shape}")
        if motif.shape != (len(MOTIFS),):
            raise ValueError(f"motif_vector must have {len(MOTIFS)} entries, got {motif.shape}")
        cn.setflags(write=False)
        motif.setflags(write=False)
        object.__setattr__(self, "cn_vector", cn)
        object.__setattr__(self, "motif_vector", motif)
        object.__setattr__(self, "mean_nn_distance", float(self.mean_nn_distance))
        if self.oxidation_state is not None:
            object.__setattr__(self, "oxidation_state", int(self.oxidation_state))
        if self.bvs is not None:
            object.__setattr__(self, "bvs", float(self.bvs))
        notes = tuple(" ".join(str(n).split("\n")) for n in self.notes)  # one line each
        object.__setattr__(self, "notes", notes)

    @property
    def dominant_cn(self) -> int:
        """CN (1..12) with the largest weight; 0 when every weight is zero."""
        if not np.any(self.cn_vector > 0):
            return 0
        return int(np.argmax(self.cn_vector)) + 1

    @property
    def cn_ranking(self) -> tuple[int, ...]:
        """CNs with weight >= ``CN_THRESHOLD``, by weight descending (ties: smaller CN first)."""
        return _ranking(self.cn_vector, CN_THRESHOLD, offset=1)

    @property
    def motif_ranking(self) -> tuple[int, ...]:
        """Indices into ``MOTIFS`` with weighted OP >= ``MOTIF_THRESHOLD``, descending."""
        return _ranking(self.motif_vector, MOTIF_THRESHOLD, offset=0)

    @property
    def environment_ranking(self) -> tuple[str, ...]:
        """``motif_ranking`` as combined labels, e.g. ``("CN4-square co-planar", ...)``."""
        return tuple(environment_label(i) for i in self.motif_ranking)


@dataclass(frozen=True)
class LabelFailure:
    """A site that could not be labelled; ``reason`` is a short machine-readable tag."""

    material_id: str
    site_index: int
    reason: str
    detail: str


LabelResult = SiteLabels | LabelFailure


def _ranking(values: np.ndarray, threshold: float, offset: int) -> tuple[int, ...]:
    keep = np.flatnonzero(values >= threshold)
    order = sorted(keep, key=lambda i: (-values[i], i))
    return tuple(int(i) + offset for i in order)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pymatgen's known-harmless warnings for the duration of a block."""
    with warnings.catch_warnings():
        for pattern in _HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@cache
def _ops_for_cn(cn: int) -> tuple[tuple[int, Any], ...]:
    """(MOTIFS index, LocalStructOrderParams) for each motif of ``cn``, built once per process.

    One object per op type, as matminer does: a single multi-type LocalStructOrderParams gives
    different values for some ops (e.g. sq_plan_max, see_saw_rect), so it is not a shortcut.
    """
    from pymatgen.analysis.local_env import LocalStructOrderParams

    return tuple(
        (i, LocalStructOrderParams([_MOTIF_OPS[m][0]], parameters=[_MOTIF_OPS[m][1]]))
        for i, m in enumerate(MOTIFS)
        if m[0] == cn
    )


def _motif_vector(structure: Structure, n: int, nn_data: Any) -> np.ndarray:
    """CN-weighted order parameters of site ``n`` (matminer CrystalNNFingerprint "ops")."""
    out = np.zeros(len(MOTIFS))
    for cn in sorted({c for c, _ in MOTIFS}):
        weight = float(nn_data.cn_weights.get(cn, 0.0))
        if weight == 0.0:
            continue
        sites = [structure[n], *(entry["site"] for entry in nn_data.cn_nninfo[cn])]
        neighbours = list(range(1, len(sites)))
        for i, op in _ops_for_cn(cn):
            value = op.get_order_parameters(sites, 0, indices_neighs=neighbours)[0]
            out[i] = weight * (value or 0.0)  # None: OP undefined for this shell
    return out


def _cn_vector(nn_data: Any, notes: list[str]) -> np.ndarray:
    vec = np.zeros(CN_MAX)
    dropped: dict[int, float] = {}
    for cn, weight in nn_data.cn_weights.items():
        if 1 <= cn <= CN_MAX:
            vec[cn - 1] = float(weight)
        elif weight > 0:
            dropped[int(cn)] = float(weight)
    high = {cn: w for cn, w in dropped.items() if cn > CN_MAX and w >= _NOTE_WEIGHT}
    if high:
        total = sum(high.values())
        cns = ",".join(str(c) for c in sorted(high))
        notes.append(f"cn>{CN_MAX} weight {total:.3g} dropped (CN {cns})")
    if dropped.get(0, 0.0) >= _NOTE_WEIGHT:
        notes.append(f"cn=0 weight {dropped[0]:.3g} dropped")
    return vec


def _mean_nn_distance(structure: Structure, n: int, nn_data: Any, notes: list[str]) -> float:
    """Mean distance to the first shell that ``CrystalNN().get_nn_info`` returns.

    With default (unweighted) CrystalNN that shell is ``cn_nninfo`` at the highest-weight CN,
    chosen here exactly as pymatgen does, to avoid running CrystalNN twice per site.
    """
    weights = nn_data.cn_weights
    best = max(weights, key=lambda k: weights[k])
    shell = nn_data.cn_nninfo[best]
    if not shell:
        notes.append("no first-shell neighbours")
        return math.nan
    centre = structure[n].coords
    return float(np.mean([np.linalg.norm(e["site"].coords - centre) for e in shell]))


def _valences(structure: Structure) -> tuple[list[int] | None, str]:
    """BVAnalyzer valences for every site (once per structure), or None and the reason."""
    from pymatgen.analysis.bond_valence import BVAnalyzer

    if len(structure.composition.elements) == 1:
        return [0] * len(structure), ""  # an element is neutral; BVAnalyzer cannot say so
    try:
        vals = BVAnalyzer().get_valences(structure)
    except MemoryError:  # the worker's, not the structure's: label it again (worker_lost)
        raise
    except Exception as exc:
        return None, f"valence: {type(exc).__name__}: {exc}"
    return [int(v) for v in vals], ""


def _bvs(structure: Structure, n: int, notes: list[str]) -> float | None:
    """Bond-valence sum of site ``n`` as BVAnalyzer computes it (4 Å cutoff, 1.015 scale)."""
    from pymatgen.analysis.bond_valence import ELECTRONEG, calculate_bv_sum
    from pymatgen.core import Element

    site = structure[n]
    neighbours = structure.get_neighbors(site, BV_CUTOFF)
    try:
        value = calculate_bv_sum(site, neighbours, scale_factor=BV_DISTANCE_SCALE)
    except KeyError as exc:
        notes.append(f"bvs: no bond-valence parameters for {exc}")
        return None
    symbols = {site.specie.symbol} | {nb.specie.symbol for nb in neighbours}
    if not any(Element(sym) in ELECTRONEG for sym in symbols):
        notes.append(f"bvs: no anion within {BV_CUTOFF:g} A, sum is 0 by construction")
    return float(value)


def label_sites(
    structure: Structure, site_indices: Sequence[int], material_id: str = ""
) -> list[LabelResult]:
    """Label each of ``site_indices`` in ``structure``; BVAnalyzer runs once for all of them.

    Oxidation-state decorations are ignored (CrystalNN would switch to ionic radii), so labels
    do not depend on how the structure was loaded. A bad site never raises: it comes back as
    a ``LabelFailure`` in its slot.
    """
    from pymatgen.analysis.local_env import CrystalNN

    indices = [int(i) for i in site_indices]
    if not structure.is_ordered:
        return [
            LabelFailure(material_id, i, "disordered_structure", "partial occupancies")
            for i in indices
        ]
    if any(getattr(site.specie, "oxi_state", None) for site in structure):
        structure = structure.copy()
        structure.remove_oxidation_states()
    results: list[LabelResult] = []
    with _quiet():
        valences, valence_note = _valences(structure)
        cnn = CrystalNN()
        for n in indices:
            if not 0 <= n < len(structure):
                results.append(
                    LabelFailure(material_id, n, "bad_site_index", f"{len(structure)} sites")
                )
                continue
            try:
                nn_data = cnn.get_nn_data(structure, n)
            except MemoryError:  # not the site's failure: nothing cached, labelled again
                raise
            except Exception as exc:
                results.append(
                    LabelFailure(material_id, n, "crystalnn_error", f"{type(exc).__name__}: {exc}")
                )
                continue
            try:
                notes: list[str] = []
                cn_vec = _cn_vector(nn_data, notes)
                if not np.any(cn_vec > 0):
                    weights = {int(k): round(float(v), 3) for k, v in nn_data.cn_weights.items()}
                    reason = "no_neighbours" if set(weights) == {0} else "cn_out_of_range"
                    results.append(LabelFailure(material_id, n, reason, f"cn_weights {weights}"))
                    continue
                motif_vec = _motif_vector(structure, n, nn_data)
                distance = _mean_nn_distance(structure, n, nn_data, notes)
                if valence_note:
                    notes.append(valence_note)
                bvs = _bvs(structure, n, notes)
            except MemoryError:
                raise
            except Exception as exc:
                results.append(
                    LabelFailure(material_id, n, "label_error", f"{type(exc).__name__}: {exc}")
                )
                continue
            results.append(
                SiteLabels(
                    cn_vector=cn_vec,
                    motif_vector=motif_vec,
                    mean_nn_distance=distance,
                    oxidation_state=None if valences is None else valences[n],
                    bvs=bvs,
                    notes=tuple(notes),
                )
            )
    return results
