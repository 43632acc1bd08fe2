"""The on-disk label cache: site labels as plain arrays in a compressed .npz (no pickle).

Versioned by :data:`~xasflow.training.labels.LABELS_SCHEMA` and checked against the motif vocabulary, so a cache
written by other label code is refused rather than misread; keyed on the versions of the
packages that compute the labels (:func:`label_dependencies`), so labels of another pymatgen
are computed again rather than reused. A cache that cannot be read
(an empty, truncated or corrupted file) is warned about and rebuilt, never fatal; failures
of the run rather than of the structure (:data:`TRANSIENT_REASONS`) are never cached, so
the next build labels those sites again; every writer writes its own temporary file and
renames it into place, so builds of one tree at once neither crash nor read half a file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from xasflow.training.labels import (
    CN_MAX,
    LABELS_SCHEMA,
    MOTIFS,
    LabelFailure,
    LabelResult,
    SiteLabels,
    environment_label,
)

__all__ = [
    "LABELS_SCHEMA",
    "LABEL_PACKAGES",
    "TRANSIENT_REASONS",
    "label_dependencies",
    "labels_from_arrays",
    "labels_to_arrays",
    "load_labels",
    "read_cache",
    "save_labels",
    "write_cache",
]

#: Packages whose version the cached labels depend on: pymatgen (CrystalNN, the order
#: parameters, BVAnalyzer), scipy (the Voronoi tessellation under CrystalNN) and spglib (the
#: site multiplicities cached beside the labels).
LABEL_PACKAGES = ("pymatgen", "scipy", "spglib")


def label_dependencies() -> dict[str, str]:
    """The installed version of each of :data:`LABEL_PACKAGES` ("absent" when not installed):
    what, with the input and :data:`LABELS_SCHEMA`, a cache of labels is keyed on."""
    versions = {}
    for package in LABEL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


#: Failure reasons of the run, not of the structure (a dask worker killed or lost): not cached.
TRANSIENT_REASONS = frozenset({"worker_lost"})

#: Labels and multiplicities by (material_id, site_index), as a cache holds them.
Cached = tuple[dict[tuple[str, int], LabelResult], dict[tuple[str, int], int]]

#: What reading a damaged .npz raises: EOFError (empty), BadZipFile (truncated, a bad CRC),
#: zlib.error (a corrupted stream), KeyError / ValueError (an array missing or malformed).
_UNREADABLE = (OSError, EOFError, KeyError, ValueError, IndexError, zipfile.BadZipFile, zlib.error)


def labels_to_arrays(labels: Mapping[tuple[str, int], LabelResult]) -> dict[str, np.ndarray]:
    """Flatten labels into plain arrays for an .npz cache (no pickle), one row per site.

    Rows are sorted by (material_id, site_index). Missing values: NaN in float arrays (the
    oxidation state is stored as float so that NaN can mark "none"); ``ok`` marks real labels.
    """
    keys = sorted(labels)
    n = len(keys)
    cn = np.full((n, CN_MAX), np.nan)
    motif = np.full((n, len(MOTIFS)), np.nan)
    distance = np.full(n, np.nan)
    oxidation = np.full(n, np.nan)
    bvs = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    notes = [""] * n
    reasons = [""] * n
    details = [""] * n
    for row, key in enumerate(keys):
        item = labels[key]
        if isinstance(item, SiteLabels):
            ok[row] = True
            cn[row] = item.cn_vector
            motif[row] = item.motif_vector
            distance[row] = item.mean_nn_distance
            if item.oxidation_state is not None:
                oxidation[row] = item.oxidation_state
            if item.bvs is not None:
                bvs[row] = item.bvs
            notes[row] = "\n".join(item.notes)
        else:
            reasons[row] = item.reason
            details[row] = item.detail
    return {
        "schema": np.array(LABELS_SCHEMA, dtype=np.int64),
        "motifs": np.array([environment_label(i) for i in range(len(MOTIFS))], dtype=str),
        "material_id": np.array([k[0] for k in keys], dtype=str),
        "site_index": np.array([k[1] for k in keys], dtype=np.int64),
        "ok": ok,
        "cn_vector": cn,
        "motif_vector": motif,
        "mean_nn_distance": distance,
        "oxidation_state": oxidation,
        "bvs": bvs,
        "notes": np.array(notes, dtype=str),
        "failure_reason": np.array(reasons, dtype=str),
        "failure_detail": np.array(details, dtype=str),
    }


def labels_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[tuple[str, int], LabelResult]:
    """Inverse of ``labels_to_arrays``; refuses arrays written with another schema or vocabulary."""
    schema = int(np.asarray(arrays["schema"]))
    if schema != LABELS_SCHEMA:
        raise ValueError(f"label arrays have schema {schema}, this code reads {LABELS_SCHEMA}")
    vocab = [str(m) for m in np.asarray(arrays["motifs"]).reshape(-1)]
    if vocab != [environment_label(i) for i in range(len(MOTIFS))]:
        raise ValueError("label arrays were written with a different MOTIFS vocabulary")
    out: dict[tuple[str, int], LabelResult] = {}
    mids = np.asarray(arrays["material_id"]).reshape(-1)
    sites = np.asarray(arrays["site_index"]).reshape(-1)
    ok = np.asarray(arrays["ok"]).reshape(-1)
    cn = np.asarray(arrays["cn_vector"]).reshape(-1, CN_MAX)
    motif = np.asarray(arrays["motif_vector"]).reshape(-1, len(MOTIFS))
    distance = np.asarray(arrays["mean_nn_distance"]).reshape(-1)
    oxidation = np.asarray(arrays["oxidation_state"]).reshape(-1)
    bvs = np.asarray(arrays["bvs"]).reshape(-1)
    notes = np.asarray(arrays["notes"]).reshape(-1)
    reasons = np.asarray(arrays["failure_reason"]).reshape(-1)
    details = np.asarray(arrays["failure_detail"]).reshape(-1)
    for row in range(mids.size):
        key = (str(mids[row]), int(sites[row]))
        if ok[row]:
            note = str(notes[row])
            out[key] = SiteLabels(
                cn_vector=cn[row],
                motif_vector=motif[row],
                mean_nn_distance=float(distance[row]),
                oxidation_state=None if np.isnan(oxidation[row]) else int(oxidation[row]),
                bvs=None if np.isnan(bvs[row]) else float(bvs[row]),
                notes=tuple(note.split("\n")) if note else (),
            )
        else:
            out[key] = LabelFailure(key[0], key[1], str(reasons[row]), str(details[row]))
    return out


def save_labels(path: str | Path, labels: Mapping[tuple[str, int], LabelResult]) -> Path:
    """Write labels to a compressed .npz (plain arrays, loadable without pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez_compressed(fh, **labels_to_arrays(labels))  # type: ignore[arg-type]
    return path


def load_labels(path: str | Path) -> dict[tuple[str, int], LabelResult]:
    """Read labels written by ``save_labels``."""
    with np.load(Path(path), allow_pickle=False) as data:
        return labels_from_arrays({k: data[k] for k in data.files})


def read_cache(path: Path) -> Cached | None:
    """The labels and multiplicities cached at ``path``; None when there is no file, or a file
    that cannot be used (other label code or package versions, or damaged: warned, then
    rebuilt by the caller)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        written = [str(v) for v in np.asarray(arrays["dependencies"]).reshape(-1)]
        if written != _dependency_strings():
            raise ValueError(
                f"labels computed with {written}, this build has {_dependency_strings()}"
            )
        labels = labels_from_arrays(arrays)
        mult = {
            (str(m), int(s)): int(k)
            for m, s, k in zip(
                arrays["material_id"], arrays["site_index"], arrays["multiplicity"], strict=True
            )
        }
    except _UNREADABLE as exc:
        warnings.warn(
            f"label cache {path} cannot be used ({type(exc).__name__}: {exc}); "
            "labelling again and rewriting it",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return labels, mult


def _dependency_strings() -> list[str]:
    """:func:`label_dependencies` as ``package=version`` strings, as a cache file records them."""
    return [f"{k}={v}" for k, v in label_dependencies().items()]


def write_cache(
    path: Path,
    labels: Mapping[tuple[str, int], LabelResult],
    mult: Mapping[tuple[str, int], int],
) -> None:
    """Cache ``labels`` and ``mult`` at ``path``, less the :data:`TRANSIENT_REASONS` failures.

    Written to a temporary file of this writer's own in the same folder, then renamed into
    place (atomic): a reader sees the old file or the new one, and two builds of one tree at
    once both finish (the last rename wins; both files are whole).
    """
    kept = {
        key: item
        for key, item in labels.items()
        if not (isinstance(item, LabelFailure) and item.reason in TRANSIENT_REASONS)
    }
    arrays = labels_to_arrays(kept)
    arrays["dependencies"] = np.array(_dependency_strings(), dtype=str)
    arrays["multiplicity"] = np.array(
        [
            mult[(str(m), int(s))]
            for m, s in zip(arrays["material_id"], arrays["site_index"], strict=True)
        ],
        dtype=np.int64,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep a shared cache from its other users
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
