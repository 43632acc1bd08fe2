"""Which data keys of a raw run are energy and which detector channel: one table of defaults.

``CHANNEL_DEFAULTS`` is the single list of the key names the daemon recognises by default
(first present wins); the configuration (:class:`xasflow.daemon.config.ChannelsConfig`) and
the assembler's :class:`ChannelMap` both take their defaults from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CHANNEL_DEFAULTS", "ChannelMap"]

#: Logical channel -> data key names tried in order (exact, case-sensitive).
CHANNEL_DEFAULTS: dict[str, tuple[str, ...]] = {
    "energy": (
        "energy",
        "mono_energy",
        "dcm_energy",
        "energy_readback",
        "mono_energy_readback",
        "dcm_energy_readback",
        "Energy",
    ),
    "i0": ("I0", "i0", "I0_current", "i0_current", "ic0", "IC0"),
    "it": ("It", "it", "itrans", "I1", "i1", "ic1", "IC1"),
    "ir": ("Ir", "ir", "iref", "irefer", "I2", "i2", "ic2", "IC2"),
    "if": ("If", "if", "ifluor", "fluor", "fluorescence", "pips", "PIPS"),
}


@dataclass(frozen=True)
class ChannelMap:
    """Which data keys mean energy and which detector channel; first name present wins.

    Names match exactly (case-sensitive). ``mode`` "auto" picks transmission when I0 and It
    are present, else fluorescence when I0 and If are; "transmission"/"fluorescence" force it.
    """

    energy: tuple[str, ...] = CHANNEL_DEFAULTS["energy"]
    i0: tuple[str, ...] = CHANNEL_DEFAULTS["i0"]
    it: tuple[str, ...] = CHANNEL_DEFAULTS["it"]
    ir: tuple[str, ...] = CHANNEL_DEFAULTS["ir"]
    if_: tuple[str, ...] = CHANNEL_DEFAULTS["if"]
    mode: str = "auto"
    stream: str = "primary"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "transmission", "fluorescence"):
            raise ValueError(f"mode must be auto, transmission or fluorescence, not {self.mode!r}")
        for name in ("energy", "i0", "it", "ir", "if_"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"ChannelMap.{name} must be a tuple of key names")
            object.__setattr__(self, name, tuple(value))

    def candidates(self, channel: str) -> tuple[str, ...]:
        """Key names for a logical channel: "energy", "i0", "it", "ir" or "if"."""
        return self.if_ if channel == "if" else getattr(self, channel)

    @staticmethod
    def first(names: tuple[str, ...], keys: Mapping[str, Any]) -> str | None:
        """The first of ``names`` present in ``keys``, or None."""
        for name in names:
            if name in keys:
                return name
        return None
