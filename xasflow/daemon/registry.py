"""The model registry: one verified ``Predictor`` per (element, edge), hot-swapped from a directory.

A model directory holds one bundle per subdirectory (``models/cu-k/``, ...). Dot-directories
are ignored: :func:`xasflow.models.bundle.write_bundle` writes ``.cu-k.xxxx`` and renames it
into place, and parks the previous bundle as ``.cu-k.old`` for a moment.

:meth:`ModelRegistry.refresh` scans the directory. A subdirectory whose fingerprint (names,
sizes, mtimes and inodes of its files) changed since the last scan is verified and loaded
completely, i.e. a ``Predictor`` with all ONNX sessions is constructed, and only then put
into service by replacing the whole mapping in one assignment. ``get`` reads that mapping
once, so a caller sees either the old or the new predictor, never a half-loaded one. If the
bundle's files change while it loads (a copy still in progress), the result is discarded
and the next scan tries again.

A bundle that fails verification (``BundleError``) is refused: logged with the message,
counted in ``Counters.model_refused``, reported as a ``refused`` event, and whatever served
that element/edge before keeps serving. It is retried only when its files change.

A bundle directory that disappears is unloaded only after it has been missing for
``remove_after`` consecutive scans, so the brief gap in ``write_bundle``'s two renames never
takes a model out of service. If two directories hold bundles for the same element and
edge, the one with the later manifest ``created`` wins and the other is reported
``shadowed``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xasflow.daemon.counters import Counters
from xasflow.models.bundle import MANIFEST, BundleError, read_manifest
from xasflow.models.predictor import Predictor

__all__ = ["ModelRegistry", "RegistryEvent"]

logger = logging.getLogger(__name__)

EventKind = Literal["loaded", "swapped", "refused", "removed", "shadowed", "error"]
Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class RegistryEvent:
    """Something a scan did: a bundle loaded, swapped in, refused, removed or shadowed."""

    kind: EventKind
    directory: str
    element: str | None = None
    edge: str | None = None
    bundle_id: str | None = None
    previous: str | None = None  # bundle id replaced (swapped) or unloaded (removed)
    message: str = ""
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (for logs, health and the dashboard)."""
        return {
            "kind": self.kind,
            "directory": self.directory,
            "element": self.element,
            "edge": self.edge,
            "bundle_id": self.bundle_id,
            "previous": self.previous,
            "message": self.message,
            "time": self.time,
        }


@dataclass(frozen=True)
class _Entry:
    """A loaded bundle in service."""

    predictor: Predictor
    directory: str
    fingerprint: Fingerprint
    loaded_at: float


def _key(element: str, edge: str) -> tuple[str, str]:
    return element.strip().capitalize(), edge.strip().upper()


def fingerprint(directory: Path) -> Fingerprint:
    """Names, sizes, mtimes and inodes of a directory's files: changes on any rewrite or rename."""
    items = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=True):
                st = entry.stat(follow_symlinks=True)
                items.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(items))


class ModelRegistry:
    """Verified predictors per (element, edge), loaded from and watched in one directory."""

    def __init__(
        self,
        directory: str | Path,
        counters: Counters | None = None,
        *,
        threads: int = 1,
        remove_after: int = 2,
        scan: bool = True,
        loader: Callable[[Path], Predictor] | None = None,
    ) -> None:
        """``scan``: run the first :meth:`refresh` now (its events are in :attr:`events`).

        ``loader`` builds a Predictor from a bundle directory (default ``Predictor(dir,
        threads)``); it must raise ``BundleError`` for a bundle that does not verify.
        """
        if remove_after < 1:
            raise ValueError("remove_after must be >= 1")
        self.directory = Path(directory)
        self.counters = counters if counters is not None else Counters()
        self.threads = threads
        self.remove_after = remove_after
        self._loader = loader or (lambda path: Predictor(path, threads=self.threads))
        self._models: dict[tuple[str, str], _Entry] = {}  # replaced whole, never mutated
        self._seen: dict[str, Fingerprint] = {}  # dir name -> fingerprint last judged
        self._refused: dict[str, str] = {}  # dir name -> message, while it stays refused
        self._missing: dict[str, int] = {}  # dir name of a serving bundle -> scans missing
        self._shadowed: set[str] = set()  # dir names of bundles another directory outranks
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dir_warned = False
        #: The most recent events (bounded), oldest first.
        self.events: deque[RegistryEvent] = deque(maxlen=200)
        if scan:
            self.refresh()

    # ------------------------------------------------------------------ serving side

    def get(self, element: str, edge: str = "K") -> Predictor | None:
        """The predictor serving ``element``/``edge``, or None (lock-free, never partial)."""
        entry = self._models.get(_key(element, edge))
        return None if entry is None else entry.predictor

    def serving(self) -> list[tuple[str, str]]:
        """(element, edge) pairs with a model in service."""
        return sorted(self._models)

    def models(self) -> list[dict[str, Any]]:
        """What is in service, for health and the dashboard: ids, metrics per task, load time."""
        out = []
        for (element, edge), entry in sorted(self._models.items()):
            m = entry.predictor.manifest
            out.append(
                {
                    "bundle_id": m.bundle_id,
                    "element": element,
                    "edge": edge,
                    "directory": entry.directory,
                    "created": m.created,
                    "code_version": m.code_version,
                    "loaded_at": entry.loaded_at,
                    "tasks": sorted(m.tasks),
                    "metrics": {name: dict(task.metrics) for name, task in m.tasks.items()},
                }
            )
        return out

    def refused(self) -> dict[str, str]:
        """Bundle directories currently refused, with the reason."""
        return dict(self._refused)

    # ------------------------------------------------------------------ scanning

    def refresh(self) -> list[RegistryEvent]:
        """Scan the directory once; load, swap, refuse or remove bundles. Returns what happened."""
        with self._refresh_lock:
            events = self._refresh()
        for ev in events:
            self.events.append(ev)
            if ev.kind in ("refused", "error"):
                logger.error("model %s: %s", ev.kind, ev.message)
            elif ev.kind == "shadowed":
                logger.warning("model shadowed: %s", ev.message)
            else:
                logger.info("model %s: %s", ev.kind, ev.message)
        return events

    def _refresh(self) -> list[RegistryEvent]:
        events: list[RegistryEvent] = []
        try:
            names = sorted(
                e.name
                for e in os.scandir(self.directory)
                if e.is_dir() and not e.name.startswith(".")
            )
            self._dir_warned = False
        except OSError as exc:
            if not self._dir_warned:
                self._dir_warned = True
                events.append(
                    RegistryEvent(
                        "error", str(self.directory), message=f"cannot read model directory: {exc}"
                    )
                )
            names = []
        models = dict(self._models)
        changed = False
        present = set(names)
        for name in names:
            path = self.directory / name
            try:
                fp = fingerprint(path)
            except OSError:
                continue  # vanished between listing and looking: next scan
            if self._seen.get(name) == fp:
                continue
            if not any(item[0] == MANIFEST for item in fp):
                continue  # not (yet) a bundle; not judged, so it is looked at again next scan
            ev, entry = self._load(name, path, fp, models)
            if ev is not None:
                events.append(ev)
            if entry is None:
                continue
            key = _key(entry.predictor.manifest.element, entry.predictor.manifest.edge)
            for old_key, old in list(models.items()):
                if old.directory == entry.directory and old_key != key:
                    models.pop(old_key)  # the directory now holds another element/edge
                    self.counters.set_model(*old_key, None)
            previous = models.get(key)
            if previous is not None and previous.directory != entry.directory:
                self._shadowed.add(Path(previous.directory).name)  # outranked, may come back
            models[key] = entry
            self.counters.set_model(*key, entry.predictor.bundle_id)
            changed = True
        # directories of serving bundles that went away
        for key, entry in list(models.items()):
            name = Path(entry.directory).name
            if name in present:
                self._missing.pop(name, None)
                continue
            self._missing[name] = self._missing.get(name, 0) + 1
            if self._missing[name] < self.remove_after:
                continue
            models.pop(key)
            self._missing.pop(name, None)
            self._seen.pop(name, None)
            self.counters.set_model(*key, None)
            for other in self._shadowed:  # let a shadowed bundle take over on the next scan
                self._seen.pop(other, None)
            self._shadowed.clear()
            events.append(
                RegistryEvent(
                    "removed",
                    entry.directory,
                    *key,
                    previous=entry.predictor.bundle_id,
                    message=f"{entry.directory} is gone; {key[0]} {key[1]} has no model now",
                )
            )
            changed = True
        for name in list(self._seen):
            if name not in present:
                self._seen.pop(name, None)
                self._refused.pop(name, None)
                self._shadowed.discard(name)
        if changed:
            self._models = models  # the one assignment that puts new predictors in service
        return events

    def _load(
        self,
        name: str,
        path: Path,
        fp: Fingerprint,
        models: dict[tuple[str, str], _Entry],
    ) -> tuple[RegistryEvent | None, _Entry | None]:
        """Verify and fully construct the predictor of one changed bundle directory."""
        try:
            predictor = self._loader(path)
        except BundleError as exc:
            return self._refuse(name, path, fp, str(exc)), None
        except Exception as exc:  # onnxruntime cannot build a session, unreadable file, ...
            return self._refuse(name, path, fp, f"{path}: {type(exc).__name__}: {exc}"), None
        try:
            after = fingerprint(path)
        except OSError:
            after = ()
        if after != fp:
            return None, None  # changed while loading (a copy in progress): next scan
        self._seen[name] = fp
        self._refused.pop(name, None)
        self._shadowed.discard(name)
        m = predictor.manifest
        key = _key(m.element, m.edge)
        current = models.get(key)
        entry = _Entry(predictor, str(path), fp, time.time())
        if current is None:
            return (
                RegistryEvent(
                    "loaded",
                    str(path),
                    *key,
                    bundle_id=m.bundle_id,
                    message=f"{m.bundle_id} serves {key[0]} {key[1]} (from {path})",
                ),
                entry,
            )
        if current.directory != str(path):
            cur = current.predictor.manifest
            if (m.created, m.bundle_id) <= (cur.created, cur.bundle_id):
                msg = (
                    f"{path} ({m.bundle_id}) is older than {current.directory} "
                    f"({cur.bundle_id}) for {key[0]} {key[1]}; not used"
                )
                self._shadowed.add(name)
                return RegistryEvent("shadowed", str(path), *key, m.bundle_id, message=msg), None
        if current.predictor.manifest == m and current.directory == str(path):
            return None, None  # same content under a new fingerprint (touched, re-copied)
        self.counters.model_swapped()
        return (
            RegistryEvent(
                "swapped",
                str(path),
                *key,
                bundle_id=m.bundle_id,
                previous=current.predictor.bundle_id,
                message=(
                    f"{m.bundle_id} replaces {current.predictor.bundle_id} for {key[0]} {key[1]}"
                ),
            ),
            entry,
        )

    def _refuse(self, name: str, path: Path, fp: Fingerprint, message: str) -> RegistryEvent:
        self._seen[name] = fp
        self._refused[name] = message
        self.counters.model_refusal()
        element = edge = None
        try:
            m = read_manifest(path)
            element, edge = _key(m.element, m.edge)
        except BundleError:
            pass
        kept = self.get(element, edge) if element and edge else None
        suffix = f"; still serving {kept.bundle_id}" if kept is not None else ""
        return RegistryEvent(
            "refused", str(path), element, edge, message=f"refused bundle: {message}{suffix}"
        )

    # ------------------------------------------------------------------ watching

    def start_watching(self, interval: float = 1.0) -> None:
        """Poll with :meth:`refresh` every ``interval`` seconds in a daemon thread."""
        if interval <= 0:
            raise ValueError("interval must be > 0")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(interval,), name="xasflow-model-watch", daemon=True
        )
        self._thread.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception:  # a bug must not end the watcher: log and keep polling
                logger.exception("model registry refresh failed")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the watcher thread (if any) and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    @property
    def watching(self) -> bool:
        """Whether the watcher thread is running."""
        return self._thread is not None and self._thread.is_alive()
