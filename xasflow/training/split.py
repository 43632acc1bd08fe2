"""Grouped splits that are stable across runs and dataset versions.

A group's side of the split is decided by a hash of its key and a salt, so no group is on
both sides, the same group stays on the same side when the data set grows, and ``xasflow
evaluate`` can recover the test split from the bundle's salt alone. The group is the
material's reduced formula (``by="formula"``): grouping by material id alone put duplicate
Materials Project entries of one structure on both sides (57 StructureMatcher-identical
groups in the shared Cu set), which scored them as unseen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from xasflow.training.dataset import Dataset

SplitBy = Literal["material", "formula"]


def group_fraction(keys: np.ndarray, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per row, equal for rows of the same key."""
    cache: dict[str, float] = {}
    out = np.empty(len(keys))
    for i, k in enumerate(keys):
        key = str(k)
        if key not in cache:
            digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
            cache[key] = int.from_bytes(digest[:8], "big") / 2**64
        out[i] = cache[key]
    return out


def split_rows(
    keys: np.ndarray, salt: str, test: float = 0.2, val: float = 0.1
) -> dict[str, np.ndarray]:
    """Row indices of ``train``, ``val`` and ``test``; keys never straddle two parts."""
    u = group_fraction(keys, salt)
    idx = np.arange(len(keys))
    return {
        "test": idx[u < test],
        "val": idx[(u >= test) & (u < test + val)],
        "train": idx[u >= test + val],
    }


def group_key(formula: str, material_id: str) -> str:
    """A row's formula group (its material alone where the formula is unknown)."""
    return f"formula:{formula}" if formula else f"id:{material_id}"


def split_keys(ds: Dataset, by: SplitBy) -> np.ndarray:
    """The group key per row: the material id, or its reduced formula (the id where the
    formula is unknown, so such a material still never straddles)."""
    if by == "material":
        return ds.material_id
    if by == "formula":
        return np.array([group_key(f, m) for f, m in zip(ds.formula, ds.material_id, strict=True)])
    raise ValueError(f"unknown split grouping {by!r}: 'material' or 'formula'")


def split_dataset(
    ds: Dataset, salt: str, test: float = 0.2, val: float = 0.1, by: SplitBy = "formula"
) -> dict[str, np.ndarray]:
    """:func:`split_rows` over ``ds`` grouped by ``by``."""
    return split_rows(split_keys(ds, by), salt, test, val)


def bundle_split(ds: Dataset, training: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The split a bundle trained with (its manifest's ``training``); bundles from before
    ``split_by`` was recorded split by material."""
    return split_dataset(
        ds,
        training.get("split_salt") or "",
        training.get("test_fraction", 0.2),
        training.get("val_fraction", 0.1),
        training.get("split_by", "material"),
    )
