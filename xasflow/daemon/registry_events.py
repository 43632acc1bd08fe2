"""What the model registry reports and how it watches: events, refusals, fingerprints, and
handing a released predictor's memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from xasflow.models.predictor import Predictor

__all__ = [
    "Fingerprint",
    "Rank",
    "Refusal",
    "RegistryEvent",
    "ServingEntry",
    "Standby",
    "fingerprint",
    "release_memory",
    "swap_event",
]

EventKind = Literal["loaded", "swapped", "rolled_back", "refused", "removed", "shadowed", "error"]
Fingerprint = tuple[tuple[str, int, int, int], ...]
Rank = tuple[str, str]  # (manifest created, bundle_id): the larger serves


@dataclass(frozen=True)
class RegistryEvent:
    """Something a scan did: a bundle loaded, swapped in (``rolled_back``: an older one put
    in place of the one served), refused, removed or shadowed."""

    kind: EventKind
    directory: str
    element: str | None = None
    edge: str | None = None
    bundle_id: str | None = None
    previous: str | None = None  # bundle id replaced (swapped) or unloaded (removed)
    message: str = ""
    time: float = field(default_factory=time.time)
    reason: str | None = None  # refusal reason code (see xasflow.models.integrity.REASONS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (for logs, health and the dashboard)."""
        return asdict(self)


@dataclass(frozen=True)
class Refusal:
    """Why a bundle directory is refused: a reason code and the full message."""

    reason: str
    message: str
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ServingEntry:
    """A loaded bundle in service (the registry's mapping holds these)."""

    predictor: Predictor
    directory: str
    fingerprint: Fingerprint
    loaded_at: float
    digest: str = ""
    rank: Rank = ("", "")

    def row(self, element: str, edge: str) -> dict[str, Any]:
        """This entry as ``/health`` and the dashboard list it: ids, metrics per task, load
        time."""
        m = self.predictor.manifest
        return {
            "bundle_id": m.bundle_id,
            "element": element,
            "edge": edge,
            "directory": self.directory,
            "created": m.created,
            "code_version": m.code_version,
            "loaded_at": self.loaded_at,
            "manifest_sha256": self.digest,
            "tasks": sorted(m.tasks),
            "metrics": {name: dict(task.metrics) for name, task in m.tasks.items()},
        }


@dataclass(frozen=True)
class Standby:
    """A verified bundle outranked by another for the same element/edge (not loaded)."""

    key: tuple[str, str]
    rank: Rank


def swap_event(current: ServingEntry, new: ServingEntry, key: tuple[str, str]) -> RegistryEvent:
    """The event of ``new`` replacing ``current`` for ``key``: ``swapped``, or ``rolled_back``
    when ``new``'s manifest was created earlier (bundle ids do not order in time). Only a
    bundle put in place of the one served, in its own directory, can be: an older one
    elsewhere is shadowed instead. A rollback is served, as an operator's would be, but said
    (the registry logs it as a warning)."""
    old, m = current.predictor.manifest, new.predictor.manifest
    where = f"{key[0]} {key[1]}"
    if m.created >= old.created:
        msg = f"{m.bundle_id} replaces {old.bundle_id} for {where}"
        return RegistryEvent("swapped", new.directory, *key, m.bundle_id, old.bundle_id, msg)
    msg = (
        f"{m.bundle_id} (created {m.created}) replaces the newer {old.bundle_id} (created "
        f"{old.created}) in {new.directory} for {where}: an older bundle put back in place "
        f"(a rollback); serving it"
    )
    return RegistryEvent("rolled_back", new.directory, *key, m.bundle_id, old.bundle_id, msg)


def fingerprint(directory: Path) -> Fingerprint:
    """Names, sizes, mtimes and inodes of a directory's entries (symlinks as links, not
    followed): changes on any rewrite, rename or link swap."""
    items = []
    with os.scandir(directory) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                continue
            items.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(items))


def _libc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)``, or None elsewhere."""
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        return None if libc is None else lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return None


#: ``XASFLOW_MALLOC_TRIM=0`` turns trimming off (to measure what it saves: bench/faults.py).
_TRIM = None if os.environ.get("XASFLOW_MALLOC_TRIM") == "0" else _libc_trim()


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: RSS stays doubled
    after a hot swap although the old ONNX sessions are gone)."""
    if _TRIM is not None:
        _TRIM()
