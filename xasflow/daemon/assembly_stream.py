"""How a descriptor of the configured stream resolves into ``_Stream``, its per-descriptor state.

Which data key is the energy (or an energy array in the descriptor's ``configuration``),
which keys are I0/It/Ir/If, fly or step from the energy key's shape, keV scaled to eV, the
measurement mode, and what is missing; the rules are in :mod:`xasflow.daemon.assembly`,
and :mod:`xasflow.daemon.assembly_run` uses the result for every row of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xasflow.daemon.channels import ChannelMap
from xasflow.daemon.outputs import Kind

__all__: list[str] = []  # internal to the assembler

_CHANNELS = ("i0", "it", "ir", "if")


class _Bad(Exception):
    """Internal: a row or document becomes ``Rejected(reason, detail)``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Stream:
    """Per-descriptor state of the configured stream: resolved keys, kind and seq tracking."""

    uid: str
    order: int
    kind: Kind
    energy_key: str | None = None
    energy_scale: float = 1.0
    fixed_energy: np.ndarray | None = None
    keys: dict[str, str] = field(default_factory=dict)  # logical channel -> data key
    required: tuple[str, ...] = ()
    mode: str = ""
    error: _Bad | None = None
    first_ok: tuple[int, ...] = (1,)  # acceptable first seq_nums
    base: int = 1  # the seq_num this descriptor counts from
    expect: int | None = None
    seen: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)  # seq_nums the input queue dropped


def _vector(value: Any) -> np.ndarray:
    """A 1-D float64 view of an event value (no copy for float64 arrays)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {arr.shape}")
    return arr


def _resolve(cmap: ChannelMap, doc: dict, order: int) -> _Stream:
    """The ``_Stream`` of a descriptor, the ``order``-th of its run; a lack is in ``error``."""
    data_keys = doc["data_keys"]
    st = _Stream(uid=doc["uid"], order=order, kind="unknown")
    ekey = cmap.first(cmap.energy, data_keys)
    if ekey is None:
        st.fixed_energy = _config_energy(cmap, doc.get("configuration"))
    for ch in _CHANNELS:
        key = cmap.first(cmap.candidates(ch), data_keys)
        if key is not None:
            st.keys[ch] = key
    probe = ekey or st.keys.get("i0") or next(iter(st.keys.values()), None)
    if st.fixed_energy is not None:
        st.kind = "fly"
    elif probe is not None:
        dk = data_keys[probe]
        shape = dk.get("shape") if isinstance(dk, Mapping) else None
        if isinstance(shape, (list, tuple)):
            st.kind = "step" if len(shape) == 0 else "fly"
        elif isinstance(dk, Mapping) and dk.get("dtype") == "array":
            st.kind = "fly"
        else:
            st.kind = "step"
    st.energy_key = ekey
    if ekey is not None:
        dk = data_keys[ekey]
        units = dk.get("units") if isinstance(dk, Mapping) else None
        if isinstance(units, str) and units.strip().lower() == "kev":
            st.energy_scale = 1000.0
    have = set(st.keys)
    if cmap.mode == "transmission" or (cmap.mode == "auto" and {"i0", "it"} <= have):
        st.mode, st.required = "transmission", ("i0", "it")
    else:
        st.mode, st.required = "fluorescence", ("i0", "if")
    missing = [c for c in st.required if c not in have]
    if ekey is None and st.fixed_energy is None:
        missing.insert(0, "energy")
    if missing:
        wanted = "I0 and It or If" if cmap.mode == "auto" else f"{st.mode} channels"
        st.error = _Bad(
            "missing_channel",
            f"stream {cmap.stream!r} lacks {', '.join(missing)} (needs energy, {wanted}); "
            f"data keys: {sorted(data_keys)}",
        )
    return st


def _config_energy(cmap: ChannelMap, configuration: Any) -> np.ndarray | None:
    """A fly scan's fixed energy array (eV) from a descriptor's ``configuration``, if any."""
    if not isinstance(configuration, Mapping):
        return None
    for obj in configuration.values():
        data = obj.get("data") if isinstance(obj, Mapping) else None
        if not isinstance(data, Mapping):
            continue
        key = cmap.first(cmap.energy, data)
        if key is None:
            continue
        try:
            arr = _vector(data[key])
        except (TypeError, ValueError):
            continue
        if arr.size >= 2:
            scale = 1.0
            dks = obj.get("data_keys")
            if isinstance(dks, Mapping) and isinstance(dks.get(key), Mapping):
                units = dks[key].get("units")
                if isinstance(units, str) and units.strip().lower() == "kev":
                    scale = 1000.0
            return arr * scale if scale != 1.0 else arr
    return None
