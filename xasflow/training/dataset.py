"""Training datasets: site spectra with structure labels, from FEFF trees or MP XAS documents.

A :class:`Dataset` is a flat table (one row per absorbing site) of spectra and label arrays,
plus every item that could not be used and why. Labels are expensive (CrystalNN, BVAnalyzer),
so they are cached on disk keyed by a fingerprint of the input; the cache is plain ``.npz``
(:mod:`~xasflow.training.label_cache`).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xasflow import paths
from xasflow.adapters.feff import ReadIssue, is_tree_archive, omnixas_citation, read_feff_tree
from xasflow.spectra import PrepParams, Spectrum, SpectrumError, prepare
from xasflow.training import label_average as LA
from xasflow.training import label_cache
from xasflow.training import labels as L
from xasflow.training import structures as S
from xasflow.training.label_jobs import compute_labels
from xasflow.training.reference_table import (
    EDGE,
    ReferenceTableError,
    is_reference_table,
    reference_rows,
)

#: What a dataset is, told beside an error about one (measured spectra are no dataset).
_WANTED = (
    ": --data takes labelled FEFF runs (a Lightshow tree, per material a POSCAR and per site "
    "FEFF-XANES/NNN_<El>/xmu.dat); to analyse measured spectra use `xasflow predict FILE`"
)


class DatasetError(RuntimeError):
    """A dataset that cannot be built at all (no data for the element, unreadable source)."""


@dataclass
class Dataset:
    """Absorbing sites with spectra and labels; arrays are aligned row by row."""

    element: str
    edge: str
    source: str
    fingerprint: str
    material_id: np.ndarray  # (n,) str
    site_index: np.ndarray  # (n,) int
    multiplicity: np.ndarray  # (n,) int: sites of the element each row stands for
    complete: np.ndarray  # (n,) bool: the material's computed sites cover all its absorbers
    spectra: list[Spectrum]
    cn_vector: np.ndarray  # (n, 12)
    motif_vector: np.ndarray  # (n, 25)
    distance: np.ndarray  # (n,)
    valence: np.ndarray  # (n,) float, NaN where BVAnalyzer gave none
    bvs: np.ndarray  # (n,) float, NaN where missing
    # (n,) str: reduced formula, the split's group (polymorphs and duplicate entries of one
    # composition on one side); "" where unknown, and then the material groups alone
    formula: np.ndarray
    issues: list[ReadIssue] = field(default_factory=list)
    # measured references: nothing in them was trained on, whatever their names
    measured: bool = False
    # what the data ask to be cited with: the OmniXAS data set's, laid out as its tree
    citation: str = ""

    def __len__(self) -> int:
        return len(self.spectra)

    @property
    def dominant_cn(self) -> np.ndarray:
        """Dominant CrystalNN coordination number per row (0 where unknown, or where every
        weight is zero, as :attr:`~xasflow.training.labels.SiteLabels.dominant_cn` has it)."""
        w = self.cn_vector
        known = np.all(np.isfinite(w), axis=1) & np.any(w > 0, axis=1)
        return np.where(known, np.argmax(np.nan_to_num(w, nan=-1), axis=1) + 1, 0)

    @property
    def n_materials(self) -> int:
        """Number of distinct materials."""
        return int(np.unique(self.material_id).size)

    def issue_counts(self) -> dict[str, int]:
        """How many items were dropped, by reason."""
        return dict(Counter(i.reason for i in self.issues))

    def subset(self, rows: np.ndarray | Sequence[int]) -> Dataset:
        """The rows ``rows`` as a new dataset (issues are kept whole)."""
        rows = np.asarray(rows)
        return Dataset(
            element=self.element,
            edge=self.edge,
            source=self.source,
            fingerprint=self.fingerprint,
            material_id=self.material_id[rows],
            site_index=self.site_index[rows],
            multiplicity=self.multiplicity[rows],
            complete=self.complete[rows],
            spectra=[self.spectra[i] for i in rows],
            cn_vector=self.cn_vector[rows],
            motif_vector=self.motif_vector[rows],
            distance=self.distance[rows],
            valence=self.valence[rows],
            bvs=self.bvs[rows],
            formula=self.formula[rows],
            issues=list(self.issues),
            measured=self.measured,
            citation=self.citation,
        )


def fingerprint_path(path: Path) -> str:
    """sha256 over a file's bytes, or over a directory's relative paths and contents.

    A path is hashed as the file system's bytes (``os.fsencode``): the UTF-8 of every
    UTF-8 name, as before, and a name in another encoding (Latin-1 from an old share) too,
    where ``str.encode`` raised UnicodeEncodeError on its undecodable bytes."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            digest.update(os.fsencode(p.relative_to(path)))
            digest.update(p.read_bytes())
    return digest.hexdigest()


def label_cache_path(fingerprint: str) -> Path:
    """Where the labels of a dataset with this fingerprint are cached: keyed on the input, the
    label schema and the versions of the packages that compute them (another pymatgen labels
    again, into a file of its own)."""
    versions = label_cache.label_dependencies()
    key = hashlib.sha256(repr((fingerprint, sorted(versions.items()))).encode()).hexdigest()[:16]
    return paths.cache_dir() / f"labels-v{L.LABELS_SCHEMA}-{key}.npz"


def _cached_labels(
    fingerprint: str,
    jobs: list[tuple[str, str, tuple[int, ...]]],
    n_jobs: int,
    progress: bool,
    scheduler: str | None = None,
) -> tuple[dict[tuple[str, int], L.LabelResult], dict[tuple[str, int], int]]:
    """Labels from the on-disk cache when the input and label schema match; the materials it
    lacks (none cached, or sites whose worker was lost last time) are labelled and the cache
    rewritten (:mod:`~xasflow.training.label_cache`: damaged files, concurrent builds)."""
    cache = label_cache_path(fingerprint)
    labels, mult = label_cache.read_cache(cache) or ({}, {})
    todo = [job for job in jobs if any((job[0], s) not in labels for s in job[2])]
    if not todo:
        return labels, mult
    new, new_mult = compute_labels(todo, n_jobs=n_jobs, progress=progress, scheduler=scheduler)
    labels.update(new)
    mult.update(new_mult)
    label_cache.write_cache(cache, labels, mult)
    return labels, mult


def build_feff_dataset(
    path: str | Path,
    element: str,
    n_jobs: int = 2,
    progress: bool = True,
    limit: int | None = None,
    scheduler: str | None = None,
) -> Dataset:
    """Read a FEFF run tree (directory or .tar.gz) and label every usable absorbing site.

    Labels are dask tasks (:func:`compute_labels`: ``scheduler`` or a LocalCluster of ``n_jobs``).

    Bad items (unreadable spectra, structures pymatgen cannot read, sites CrystalNN cannot
    label) are dropped and recorded in ``issues`` with a reason; they never stop the build.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no FEFF data at {path}")
    element = element.strip().capitalize()
    if not path.is_dir() and not is_tree_archive(path):
        raise DatasetError(f"{path} is neither a directory nor a .tar.gz/.tgz archive{_WANTED}")
    tree = read_feff_tree(path, element=element, progress=progress, limit=limit)
    if tree.n_sites == 0:
        raise DatasetError(
            f"no {element} sites in {path} ({tree.n_sites} sites; issues: "
            f"{tree.issue_counts()}){_WANTED}"
        )
    fingerprint = fingerprint_path(path) + (f"-limit{limit}" if limit else "")
    jobs = [(m.material_id, m.poscar, tuple(s.site_index for s in m.sites)) for m in tree.materials]
    labels, mult = _cached_labels(fingerprint, jobs, n_jobs, progress, scheduler)
    issues = list(tree.issues)
    rows: list[tuple] = []
    for material in tree.materials:
        n_abs = S.element_count(material.poscar, element)
        formula = S.poscar_formula(material.poscar)
        covered = sum(mult.get((material.material_id, s.site_index), 1) for s in material.sites)
        kept: list[tuple] = []
        for site in material.sites:
            key = (material.material_id, site.site_index)
            item = labels.get(key)
            if not isinstance(item, L.SiteLabels):
                reason = item.reason if item is not None else "unlabelled"
                detail = item.detail if item is not None else ""
                issues.append(ReadIssue(f"{key[0]}/{key[1]:03d}_{element}", reason, detail))
                continue
            try:
                spectrum = site.to_spectrum()
            except SpectrumError as exc:
                issues.append(ReadIssue(site.source, exc.reason, exc.message))
                continue
            kept.append((key, mult.get(key, 1), spectrum, item, formula))
        # whole only when its sites cover every absorber and none was lost to a label or read
        complete = covered == n_abs and n_abs > 0 and len(kept) == len(material.sites)
        rows.extend((key, m, complete, *rest) for key, m, *rest in kept)
    if not rows:
        raise DatasetError(
            f"no usable labelled {element} sites in {path}: {Counter(i.reason for i in issues)}"
        )
    edges = sorted({str(row[3].edge) for row in rows})
    if len(edges) != 1:  # one bundle is for one edge: K and L3 runs do not mix
        raise DatasetError(f"{path} mixes {element} edges {edges}: build one dataset per edge")
    ds = _assemble(element, edges[0], str(path), fingerprint, rows, issues)
    ds.citation = omnixas_citation(element) if tree.omnixas else ""
    return ds


def build_mp_dataset(
    path: str | Path, element: str, n_jobs: int = 2, progress: bool = True
) -> Dataset:
    """Label Materials Project XAS documents (as saved by ``xasflow dataset fetch-mp``).

    A document with an absorbing site index is labelled at that site; a site-averaged
    document gets the multiplicity-weighted average of all its absorbing sites' labels.
    """
    from xasflow.adapters.mp import read_mp_xas_json

    path = Path(path)
    element = element.strip().capitalize()
    records, issues = read_mp_xas_json(path, element=element)
    if not records:
        raise DatasetError(f"no {element} K-edge XANES documents in {path}")
    jobs: list[tuple[str, str, tuple[int, ...]]] = []
    wanted: dict[str, tuple[int, ...]] = {}
    formulas: dict[str, str] = {}
    for rec in records:
        try:
            poscar, formulas[rec.spectrum_id] = S.structure_poscar(rec.structure)
        except Exception as exc:
            issues.append(
                ReadIssue(rec.spectrum_id, "bad_structure", f"{type(exc).__name__}: {exc}")
            )
            continue
        sites = (
            (rec.absorbing_index,)
            if rec.absorbing_index is not None
            else S.element_sites(rec.structure, element)
        )
        key = rec.spectrum_id
        wanted[key] = sites
        jobs.append((key, poscar, sites))
    labels, mult = _cached_labels(fingerprint_path(path), jobs, n_jobs, progress)
    rows: list[tuple] = []
    by_id = {r.spectrum_id: r for r in records}
    for key, sites in wanted.items():
        rec = by_id[key]
        items = [labels.get((key, s)) for s in sites]
        bad = [x for x in items if not isinstance(x, L.SiteLabels)]
        if bad:
            first = bad[0]
            issues.append(
                ReadIssue(key, getattr(first, "reason", "unlabelled"), getattr(first, "detail", ""))
            )
            continue
        weights = [mult.get((key, s), 1) for s in sites]
        good = [x for x in items if isinstance(x, L.SiteLabels)]  # all of them (bad is empty)
        lab = good[0] if len(good) == 1 else LA.average_labels(good, weights)
        try:
            spectrum = rec.to_spectrum()
        except SpectrumError as exc:
            issues.append(ReadIssue(key, exc.reason, exc.message))
            continue
        site = sites[0] if len(sites) == 1 else -1
        rows.append(
            ((rec.material_id, site), int(sum(weights)), True, spectrum, lab, formulas[key])
        )
    if not rows:
        raise DatasetError(
            f"no usable labelled {element} spectra in {path}: {Counter(i.reason for i in issues)}"
        )
    return _assemble(element, "K", str(path), fingerprint_path(path), rows, issues)


def build_reference_dataset(table: str | Path, element: str | None = None) -> Dataset:
    """Measured reference spectra with labels from a small CSV table, for validation.

    The table, its columns and which rows are used: :mod:`xasflow.training.reference_table`.
    ``element``: the dataset's element (None: the first usable row's); rows of another
    element or edge, and rows that cannot be read, are the dataset's issues. DatasetError
    when the table cannot be read or holds no usable row.
    """
    table = Path(table)
    try:
        found, rows, issues = reference_rows(table, element)
    except ReferenceTableError as exc:
        raise DatasetError(str(exc)) from None
    if not rows or found is None:
        what = f"{element.strip().capitalize()} " if element else ""
        why = "; ".join(f"{i.item}: {i.reason}: {i.detail}" for i in issues) or "it is empty"
        raise DatasetError(f"{table}: no usable {what}reference rows: {why}")
    ds = _assemble(found, EDGE, str(table), fingerprint_path(table), list(rows), issues)
    ds.measured = True
    return ds


def load_dataset(path: str | Path, element: str, n_jobs: int = 2, progress: bool = True) -> Dataset:
    """A dataset from any supported source, chosen by what ``path`` is.

    ``.json``: Materials Project XAS documents; ``.csv``: a labelled reference table (its
    rows of ``element`` only); a directory or ``.tar.gz``: a FEFF run tree. Suffixes in any
    case (``REFS.CSV``).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no data at {path}")
    if path.suffix.lower() == ".json":
        return build_mp_dataset(path, element, n_jobs=n_jobs, progress=progress)
    if is_reference_table(path):  # REFS.CSV too
        return build_reference_dataset(path, element)
    return build_feff_dataset(path, element, n_jobs=n_jobs, progress=progress)


def _assemble(
    element: str,
    edge: str,
    source: str,
    fingerprint: str,
    rows: list[tuple],
    issues: list[ReadIssue],
) -> Dataset:
    """Stack per-site rows ``(key, multiplicity, complete, spectrum, SiteLabels, formula)`` into
    a Dataset."""
    lab = [r[4] for r in rows]
    return Dataset(
        element=element,
        edge=edge,
        source=source,
        fingerprint=fingerprint,
        material_id=np.array([r[0][0] for r in rows]),
        site_index=np.array([r[0][1] for r in rows], dtype=np.int64),
        multiplicity=np.array([r[1] for r in rows], dtype=np.int64),
        complete=np.array([r[2] for r in rows], dtype=bool),
        spectra=[r[3] for r in rows],
        cn_vector=np.vstack([x.cn_vector for x in lab]),
        motif_vector=np.vstack([x.motif_vector for x in lab]),
        distance=np.array([x.mean_nn_distance for x in lab]),
        valence=np.array([np.nan if x.oxidation_state is None else x.oxidation_state for x in lab]),
        bvs=np.array([np.nan if x.bvs is None else x.bvs for x in lab]),
        formula=np.array([r[5] for r in rows], dtype=str),
        issues=issues,
    )


@dataclass
class Gridded:
    """A dataset's spectra on a model grid: ``y`` rows for ``rows`` of the dataset."""

    y: np.ndarray
    e0: np.ndarray
    rows: np.ndarray
    issues: list[ReadIssue]
    #: per row of ``y``, its grids on the edge's rival rises (``prep.e0_rivals``); empty
    #: list: none kept (a bundle without ``e0_rivals``)
    alternates: list[tuple[np.ndarray, ...]] = field(default_factory=list)


def grid_dataset(ds: Dataset, prep: PrepParams) -> Gridded:
    """Prepare every spectrum with ``prep``; spectra that fail are reported, not fatal."""
    ys, e0s, rows, issues, alternates = [], [], [], [], []
    for i, spectrum in enumerate(ds.spectra):
        try:
            p = prepare(spectrum, prep)
        except SpectrumError as exc:
            issues.append(
                ReadIssue(f"{ds.material_id[i]}/{ds.site_index[i]:03d}", exc.reason, exc.message)
            )
            continue
        ys.append(p.y)
        e0s.append(p.e0)
        rows.append(i)
        alternates.append(p.alternates)
    y = np.vstack(ys) if ys else np.zeros((0, prep.n_points))
    kept = alternates if prep.e0_rivals is not None else []
    return Gridded(y, np.array(e0s), np.array(rows, dtype=np.int64), issues, kept)


def material_average(ds: Dataset, g: Gridded) -> tuple[np.ndarray, Dataset]:
    """Site-averaged spectra and labels per material (weights: multiplicities).

    Only complete materials with every row of ``ds`` among ``g.rows`` are averaged (a site the
    preparation refused leaves a part), since an experiment measures every site. Returns the
    averaged grid rows and a per-material Dataset (``spectra``: the first site's, provenance).
    The sites are averaged on the model grid, each relative to its own E0, not summed on
    absolute energy as a measurement is: FEFF's absolute energies scatter by several eV
    between runs (site E0s of one material differ by a median 1.65 eV on the Cu test split),
    and summing on them changed 35 of 394 test materials' CN answers (accuracy 0.777 against
    0.784), so this figure reads FEFF's edge-aligned sites, not an experiment's blend.
    """
    sub = ds.subset(g.rows)
    sites = Counter(ds.material_id.tolist())
    out_y, rows = [], []
    for mid in np.unique(sub.material_id):
        idx = np.flatnonzero(sub.material_id == mid)
        if not sub.complete[idx].all() or len(idx) != sites[mid]:
            continue
        w = sub.multiplicity[idx].astype(float)
        avg = LA.average_labels(
            [
                L.SiteLabels(
                    cn_vector=sub.cn_vector[i],
                    motif_vector=sub.motif_vector[i],
                    mean_nn_distance=sub.distance[i],
                    oxidation_state=None if np.isnan(sub.valence[i]) else int(sub.valence[i]),
                    bvs=None if np.isnan(sub.bvs[i]) else float(sub.bvs[i]),
                )
                for i in idx
            ],
            w,
        )
        out_y.append(np.average(g.y[idx], axis=0, weights=w))
        rows.append(
            ((str(mid), -1), int(w.sum()), True, sub.spectra[idx[0]], avg, sub.formula[idx[0]])
        )
    if not rows:
        return np.zeros((0, g.y.shape[1])), sub.subset(np.zeros(0, dtype=int))
    return np.vstack(out_y), _assemble(ds.element, ds.edge, ds.source, ds.fingerprint, rows, [])
