"""A spectrum seen on more than one grid: its rows of graph input, and their outputs joined.

With ``prep.e0_rivals`` a prepared spectrum carries, beside its grid on E0, the grids on the
rival rises of its edge (:mod:`xasflow.spectra.e0_rivals`). Every view is a row of the
graphs' input; the task outputs of a spectrum's rows are averaged, as the ensemble's members
are (before calibration, so temperature and conformal sets apply to the average they were
fitted on), and its out-of-domain score is its E0 row's: whether a shape is known does not
depend on where its grid starts. One place for the daemon, ``xasflow predict`` and training's
evaluation, so they serve the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xasflow.models.bundle import Manifest
from xasflow.spectra import Prepared

Raw = dict[str, dict[str, np.ndarray]]


def view_rows(prepared: Sequence[Prepared]) -> list[np.ndarray]:
    """Each spectrum's grid rows in order: its E0 grid, then its alternates."""
    if not any(p.alternates for p in prepared):
        return [p.y for p in prepared]
    return [row for p in prepared for row in (p.y, *p.alternates)]


def stack_views(
    rows: np.ndarray | Sequence[np.ndarray], alternates: Sequence[Sequence[np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Gridded rows and each one's alternates as one matrix of view rows (each row, then its
    alternates), and the rows per spectrum (:func:`view_counts`)."""
    views = [v for row, alts in zip(rows, alternates, strict=True) for v in (row, *alts)]
    return np.vstack(views), view_counts(alternates)


def view_counts(alternates: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Rows per spectrum (1 + its alternates)."""
    return np.fromiter((1 + len(a) for a in alternates), dtype=np.intp, count=len(alternates))


def join_views(manifest: Manifest, raw: Raw, counts: np.ndarray) -> Raw:
    """``raw`` (the graphs' outputs on every view row) with one row per spectrum: task outputs
    averaged over its ``counts`` rows, the out-of-domain graph's score from the first (E0).

    Nothing is copied when every spectrum has one row."""
    total = int(counts.sum())
    if total == counts.size:
        return raw
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    first = {(manifest.ood.file, manifest.ood.output)} if manifest.ood is not None else set()
    out: Raw = {}
    for file, outputs in raw.items():
        out[file] = {}
        for name, value in outputs.items():
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != total:
                raise ValueError(f"{file}:{name} has {value.shape[:1]} rows for {total} view rows")
            if (file, name) in first:
                out[file][name] = value[starts]
            else:
                sums = np.add.reduceat(value.astype(np.float64), starts, axis=0)
                out[file][name] = sums / counts.reshape(-1, *([1] * (value.ndim - 1)))
    return out
