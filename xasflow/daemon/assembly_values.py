"""What a run's documents carry, read defensively for assembly: the element and edge its start
document names, a step event's scalar value, and the points and channels a spectrum keeps once
non-finite values go. The rules are in :mod:`xasflow.daemon.assembly`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from xasflow.daemon.assembly_stream import _Bad

__all__: list[str] = []  # internal to the assembler


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _element_edge(start: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Element symbol and edge from a start document (the rules: assembly's docstring)."""
    # only text counts (an array's truth value would raise): the first one found wins
    element, edge = _text(start.get("element")), _text(start.get("edge"))
    xdi = start.get("XDI")
    if isinstance(xdi, Mapping):
        nested = xdi.get("Element")
        if isinstance(nested, Mapping):
            element = element or _text(nested.get("symbol"))
            edge = edge or _text(nested.get("edge"))
        element = element or _text(xdi.get("Element.symbol"))
        edge = edge or _text(xdi.get("Element.edge"))
    sample = start.get("sample")
    if isinstance(sample, Mapping):
        element = element or _text(sample.get("element"))
        edge = edge or _text(sample.get("edge"))
    if isinstance(edge, str) and not element:
        parts = edge.replace("-", " ").replace("_", " ").split()
        if len(parts) == 2:
            element, edge = parts
    sym = element.strip().capitalize() if isinstance(element, str) else None
    if sym is not None and not (1 <= len(sym) <= 2 and sym.isalpha()):
        sym = None
    edg = edge.strip().upper() if isinstance(edge, str) and edge.strip() else None
    if edg is not None and not (edg.isalnum() and len(edg) <= 3):
        edg = None
    return sym, edg


def _scalar(value: Any) -> float:
    """A float from a step-scan event value; arrays and non-numbers raise."""
    if isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"expected a scalar, got {type(value).__name__}")
    return float(value)


def _finite(
    energy: np.ndarray, channels: dict[str, np.ndarray], required: tuple[str, ...]
) -> tuple[np.ndarray | None, dict[str, np.ndarray], list[str]]:
    """Points to keep (None: all) and channels to keep, given non-finite values.

    A point goes if its energy or a required channel is not finite; an optional channel
    goes if it is not finite at a kept point. Raises ``nan_data`` if no point is left.
    """
    # Fast screen: a sum is finite iff every term is (short of overflow, which the exact
    # path below then sorts out); cheaper than isfinite(...).all() on each array.
    if math.isfinite(energy.sum()) and all(math.isfinite(a.sum()) for a in channels.values()):
        return None, channels, []
    mask = np.isfinite(energy)
    for ch in required:
        mask &= np.isfinite(channels[ch])
    if not mask.any():
        raise _Bad("nan_data", f"no point has finite energy and {'/'.join(required)}")
    flags = [] if mask.all() else ["nonfinite_dropped"]
    good = {ch: a for ch, a in channels.items() if ch in required or np.isfinite(a[mask]).all()}
    if len(good) < len(channels):
        flags.append("channel_dropped")
    return (None if mask.all() else mask), good, flags
