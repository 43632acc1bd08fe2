"""Where a network ensemble trains: the CPU by default, a GPU when asked for and present.

Nothing served depends on it: the fitted modules come back to the CPU and export the same way.
"""

from __future__ import annotations

import torch

__all__ = ["device_name", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device to train on: ``cpu``, ``cuda``/``cuda:N``, or ``auto`` (the GPU when
    torch sees one, else the CPU). Asking for a GPU that is not there is an error, not a
    silent fall-back to a slower run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown training device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training device {name!r} asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"training device must be cpu, cuda[:N] or auto, got {name!r}")
    return device


def device_name(device: torch.device) -> str:
    """What trained a member, for its record: ``cpu`` or ``cuda:0 (GPU model)``."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
