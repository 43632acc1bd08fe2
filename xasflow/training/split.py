"""Material-grouped splits that are stable across runs and dataset versions.

A material's side of the split is decided by a hash of its id and a salt, so no material is
on both sides, the same material stays on the same side when the data set grows, and
``xasflow evaluate`` can recover the test split from the bundle's salt alone.
"""

from __future__ import annotations

import hashlib

import numpy as np


def material_fraction(material_ids: np.ndarray, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per row, equal for rows of the same material."""
    cache: dict[str, float] = {}
    out = np.empty(len(material_ids))
    for i, mid in enumerate(material_ids):
        key = str(mid)
        if key not in cache:
            digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
            cache[key] = int.from_bytes(digest[:8], "big") / 2**64
        out[i] = cache[key]
    return out


def split_rows(
    material_ids: np.ndarray, salt: str, test: float = 0.2, val: float = 0.1
) -> dict[str, np.ndarray]:
    """Row indices of ``train``, ``val`` and ``test``; materials never straddle two parts."""
    u = material_fraction(material_ids, salt)
    idx = np.arange(len(material_ids))
    return {
        "test": idx[u < test],
        "val": idx[(u >= test) & (u < test + val)],
        "train": idx[u >= test + val],
    }
