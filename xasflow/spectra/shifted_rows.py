"""Index arithmetic on a page whose rows are one energy axis shifted per row (the batched
fits' rows): how many points lie at or below a value (or strictly below it), the nearest
point, a row range's columns as a mask; each found on the first row at once and checked against the row's own.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["Pick", "below", "columns", "count_le", "count_lt", "nearest", "pick", "rowsum"]

Pick = slice | np.ndarray  # all rows (a view) or some (a copy)


def pick(mask: np.ndarray) -> Pick:
    """The rows ``mask`` selects: a slice (a view, no copy) when it selects them all."""
    return slice(None) if mask.all() else np.flatnonzero(mask)


def below(value: np.ndarray) -> np.ndarray:
    """The float just below ``value``: ``x < value`` is ``x <= below(value)``."""
    return np.nextafter(value, -np.inf)


def count_le(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``counts[i, q]``: how many of ``rows[i]`` (sorted) are ``<= values[i, q]``
    (``np.searchsorted(..., side="right")``, row by row; see :func:`_count`)."""
    return _count(rows, values, "right")


def count_lt(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``counts[i, q]``: how many of ``rows[i]`` (sorted) are ``< values[i, q]``, strictly
    (``np.searchsorted(..., side="left")``, row by row; see :func:`_count`)."""
    return _count(rows, values, "left")


def _count(rows: np.ndarray, values: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
    """:func:`count_le` (``side="right"``) or :func:`count_lt` (``"left"``). The rows are
    one axis shifted (up to rounding): one ``searchsorted`` on row 0, then each count is
    checked against its own row's neighbours and recounted there if rounding moved it."""
    k, m = rows.shape
    off = rows[:, :1] - rows[0, 0]
    c = np.searchsorted(rows[0], (values - off).ravel(), side=side).reshape(values.shape)
    r = np.arange(k)[:, None]
    before, after = rows[r, np.maximum(c - 1, 0)], rows[r, np.minimum(c, m - 1)]
    if side == "right":
        good = ((c == 0) | (before <= values)) & ((c == m) | (after > values))
    else:
        good = ((c == 0) | (before < values)) & ((c == m) | (after >= values))
    if not good.all():
        i, q = np.nonzero(~good)
        v = values[i, q][:, None]
        c[i, q] = np.count_nonzero(rows[i] <= v if side == "right" else rows[i] < v, axis=1)
    return c


def nearest(rel: np.ndarray, value: np.ndarray, under: np.ndarray) -> np.ndarray:
    """``norm._index_nearest`` per row, from ``under`` = how many points lie below ``value``."""
    m = rel.shape[1]
    ic = np.minimum(np.maximum(under, 1), m - 1)  # (np.clip costs more per call)
    rows = np.arange(rel.shape[0])
    near = np.where(rel[rows, ic] - value < value - rel[rows, ic - 1], ic, ic - 1)
    return np.where(under <= 0, 0, np.where(under >= m, m - 1, near))


def columns(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, np.ndarray]:
    """(the columns ``min(lo)..max(hi)``, each row's ``[lo, hi)`` on them as 0/1)."""
    a, b = int(lo.min()), int(hi.max())
    cols = np.arange(a, b)
    return slice(a, b), ((cols >= lo[:, None]) & (cols < hi[:, None])).astype(np.float64)


def rowsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's dot product of ``a`` and ``b`` (same shape)."""
    return np.einsum("ij,ij->i", a, b)
