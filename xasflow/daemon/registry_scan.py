"""One model directory judged, scan by scan, for :class:`~xasflow.daemon.registry.ModelRegistry`:
which bundle directories changed, verified and loaded or refused, which one serves each
element/edge and which wait on standby; the state kept between scans. The registry puts the
mapping a scan returns in service in one assignment.

A subdirectory whose fingerprint (names, sizes, mtimes and inodes of its entries, symlinks as
links) changed since the last scan is verified and loaded. If the bundle's files change while
it loads (a copy still in progress), the result is discarded and the next scan tries again.

A bundle that fails verification is refused (counted per reason, a ``refused`` event) and
whatever served that element/edge before keeps serving. It is retried only when its files
change. The scanner remembers the manifest digest of every ``bundle_id`` it verified; a
manifest that differs under a known ``bundle_id`` is refused (``bundle_id_reused``). That
memory lives as long as the process: after a restart only the digest file and, where keys are
configured, the signature protect a manifest.

A bundle directory that disappears is unloaded only after it has been missing for
``remove_after`` consecutive scans, so the brief gap in ``write_bundle``'s two renames never
takes a model out of service. If two directories hold bundles for the same element and
edge, the one with the later manifest ``created`` wins and the other is ``shadowed``: kept
verified on standby (not loaded, to save memory). When the serving bundle is removed, the
best standby is verified and loaded in the same scan, before the mapping is replaced, so
the element never goes without a model. An older bundle (earlier ``created``) put in place
of the one served, in its directory, is served, but reported: a ``rolled_back`` event, a
warning and ``status()["rollbacks"]`` (this process only: no memory survives a restart).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xasflow.daemon.counters import Counters
from xasflow.daemon.registry_events import (
    Fingerprint,
    Rank,
    Refusal,
    RegistryEvent,
    ServingEntry,
    Standby,
    fingerprint,
    swap_event,
)
from xasflow.models.bundle import MANIFEST, BundleError, read_manifest
from xasflow.models.predictor import Predictor

__all__ = ["ModelScanner", "model_key"]


def model_key(element: str, edge: str) -> tuple[str, str]:
    """The registry's key of an element and edge: "cu", " k" -> ("Cu", "K")."""
    return element.strip().capitalize(), edge.strip().upper()


class ModelScanner:
    """The judgement of one model directory's bundles, kept between scans (see the module)."""

    def __init__(
        self,
        directory: Path,
        counters: Counters,
        remove_after: int,
        verify: Callable[[Path], Any],
        loader: Callable[[Path], Predictor],
        released: threading.Event,
    ) -> None:
        """``verify`` checks a bundle directory (:func:`~xasflow.models.bundle.inspect_bundle`
        with the registry's settings), ``loader`` builds its Predictor; ``released`` is set
        when a predictor loaded here is freed (the registry trims the heap then)."""
        self.directory = directory
        self.counters = counters
        self.remove_after = remove_after
        self._verify = verify
        self._loader = loader
        self._released = released
        self._serving: dict[tuple[str, str], ServingEntry] = {}  # in service during a scan
        self._seen: dict[str, Fingerprint] = {}  # dir name -> fingerprint last judged
        self.refused: dict[str, Refusal] = {}  # dir name -> why, while it stays refused
        self._missing: dict[str, int] = {}  # dir name of a serving bundle -> scans missing
        self.standby: dict[str, Standby] = {}  # dir names of verified, outranked bundles
        self._digests: dict[str, str] = {}  # bundle_id -> manifest sha256, life of process
        self.refusal_counts: dict[str, int] = {}
        self.rollbacks = 0  # older bundles put in place of the one served (served, said)
        self._dir_warned = False

    def _list(self, events: list[RegistryEvent]) -> list[str]:
        try:
            names = sorted(
                e.name
                for e in os.scandir(self.directory)
                if e.is_dir() and not e.name.startswith(".")
            )
        except OSError as exc:
            if not self._dir_warned:
                self._dir_warned = True
                msg = f"cannot read model directory: {exc}"
                events.append(RegistryEvent("error", str(self.directory), message=msg))
            return []
        self._dir_warned = False
        return names

    def scan(
        self, serving: dict[tuple[str, str], ServingEntry]
    ) -> tuple[dict[tuple[str, str], ServingEntry], list[RegistryEvent]]:
        """Scan the directory once against ``serving`` (the mapping in service, not changed
        here): (the mapping to serve from now on, what happened)."""
        self._serving = serving  # a refusal names what still serves
        try:
            return self._scan(serving)
        finally:
            self._serving = {}  # held no longer than the scan: a replaced predictor is freed

    def _scan(
        self, serving: dict[tuple[str, str], ServingEntry]
    ) -> tuple[dict[tuple[str, str], ServingEntry], list[RegistryEvent]]:
        events: list[RegistryEvent] = []
        names = self._list(events)
        models = dict(serving)
        present = set(names)
        for name in names:
            path = self.directory / name
            try:
                fp = fingerprint(path)
            except OSError:
                continue  # vanished between listing and looking: next scan
            if self._seen.get(name) == fp:
                continue
            if not any(item[0] == MANIFEST for item in fp):  # not (yet) a bundle: judged
                present.discard(name)  # again next scan; one serving counts as gone meanwhile
                continue
            entry = self._judge(name, path, fp, models, events)
            if entry is not None:
                self._serve(entry, models, present, events)
        # serving directories gone, without a manifest, or refilled with a bundle kept on
        # standby (outranked): the best standby takes over now
        for key, entry in list(models.items()):
            name = Path(entry.directory).name
            if name in present and name not in self.standby:
                self._missing.pop(name, None)
                continue
            self._missing[name] = self._missing.get(name, 0) + 1
            if self._missing[name] < self.remove_after:
                continue
            models.pop(key)
            self._missing.pop(name, None)
            self._seen.pop(name, None)
            after: list[RegistryEvent] = []
            successor = self._takeover(key, models, present, after)
            tail = f"{successor} takes over" if successor else "has no model now"
            events.append(
                RegistryEvent(
                    "removed",
                    entry.directory,
                    *key,
                    previous=entry.predictor.bundle_id,
                    message=f"{entry.directory} is gone (or holds no manifest); {key[0]} {key[1]} {tail}",
                )
            )
            events.extend(after)
        for name in list(self._seen):
            if name not in present:
                self._seen.pop(name, None)
                self.refused.pop(name, None)
        for name in list(self.standby):
            if name not in present:
                self.standby.pop(name)
        return models, events

    def _judge(
        self,
        name: str,
        path: Path,
        fp: Fingerprint,
        models: dict[tuple[str, str], ServingEntry],
        events: list[RegistryEvent],
    ) -> ServingEntry | None:
        """Verify one changed bundle directory; load it if it should serve. The entry or None."""
        try:
            verified = self._verify(path)
        except BundleError as exc:
            events.append(self._refuse(name, path, fp, exc.reason, str(exc)))
            return None
        except Exception as exc:  # a defect nobody foresaw is still a counted refusal
            msg = f"{path}: {type(exc).__name__}: {exc}"
            events.append(self._refuse(name, path, fp, "invalid", msg))
            return None
        m = verified.manifest
        known = self._digests.get(m.bundle_id)
        if known is not None and known != verified.digest:
            msg = (
                f"{path}: its manifest differs from the one verified earlier under bundle_id "
                f"{m.bundle_id!r} (sha256 {known[:12]}…, now {verified.digest[:12]}…); a changed "
                f"bundle needs a new bundle_id"
            )
            events.append(self._refuse(name, path, fp, "bundle_id_reused", msg))
            return None
        key = model_key(m.element, m.edge)
        rank: Rank = (m.created, m.bundle_id)
        current = models.get(key)
        if current is not None and current.directory != str(path) and rank <= current.rank:
            cur = current.predictor.manifest
            msg = (
                f"{path} ({m.bundle_id}) is older than {current.directory} "
                f"({cur.bundle_id}) for {key[0]} {key[1]}; kept on standby"
            )
            self._accept(name, fp, m.bundle_id, verified.digest)
            self.standby[name] = Standby(key, rank)
            events.append(RegistryEvent("shadowed", str(path), *key, m.bundle_id, message=msg))
            return None
        same_dir = current is not None and current.directory == str(path)
        if same_dir and current.digest == verified.digest:  # type: ignore[union-attr]
            self._accept(name, fp, m.bundle_id, verified.digest)
            return None  # same content under a new fingerprint (touched, re-copied)
        try:
            predictor = self._loader(path)
        except BundleError as exc:
            events.append(self._refuse(name, path, fp, exc.reason, str(exc)))
            return None
        except Exception as exc:  # onnxruntime cannot build a session, unreadable file, ...
            msg = f"{path}: {type(exc).__name__}: {exc}"
            events.append(self._refuse(name, path, fp, "load_error", msg))
            return None
        try:
            after = fingerprint(path)
        except OSError:
            after = ()
        if after != fp or predictor.manifest != m:
            return None  # changed while loading (a copy in progress): next scan
        self._accept(name, fp, m.bundle_id, verified.digest)
        # set as the predictor dies, before its sessions are freed: refresh() trims afterwards
        weakref.finalize(predictor, self._released.set).atexit = False
        entry = ServingEntry(predictor, str(path), fp, time.time(), verified.digest, rank)
        if current is None:
            msg = f"{m.bundle_id} serves {key[0]} {key[1]} (from {path})"
            events.append(RegistryEvent("loaded", str(path), *key, m.bundle_id, message=msg))
            return entry
        self.counters.model_swapped()
        events.append(swap_event(current, entry, key))
        self.rollbacks += events[-1].kind == "rolled_back"
        return entry

    def _accept(self, name: str, fp: Fingerprint, bundle_id: str, digest: str) -> None:
        """Record a verified bundle directory as judged."""
        self._seen[name] = fp
        self.refused.pop(name, None)
        self.standby.pop(name, None)
        self._digests.setdefault(bundle_id, digest)

    def _serve(
        self,
        entry: ServingEntry,
        models: dict[tuple[str, str], ServingEntry],
        present: set[str],
        events: list[RegistryEvent],
    ) -> None:
        """Put a loaded entry into ``models``; what it displaces goes to standby."""
        m = entry.predictor.manifest
        key = model_key(m.element, m.edge)
        for old_key, old in list(models.items()):
            if old.directory == entry.directory and old_key != key:
                models.pop(old_key)  # the directory now holds another element/edge
                self._takeover(old_key, models, present, events)
        previous = models.get(key)
        if previous is not None and previous.directory != entry.directory:
            self.standby[Path(previous.directory).name] = Standby(key, previous.rank)
        models[key] = entry

    def _takeover(
        self,
        key: tuple[str, str],
        models: dict[tuple[str, str], ServingEntry],
        present: set[str],
        events: list[RegistryEvent],
    ) -> str | None:
        """Load the best standby bundle for ``key`` into ``models`` now; its bundle id or None."""
        candidates = sorted(
            ((s.rank, name) for name, s in self.standby.items() if s.key == key),
            reverse=True,
        )
        for _rank, name in candidates:
            self.standby.pop(name, None)
            self._seen.pop(name, None)  # judged again now, or at the next scan if it fails
            if name not in present:
                continue
            path = self.directory / name
            try:
                fp = fingerprint(path)
            except OSError:
                continue
            entry = self._judge(name, path, fp, models, events)
            if entry is not None:
                self._serve(entry, models, present, events)
                return entry.predictor.bundle_id
        return None

    def _refuse(
        self, name: str, path: Path, fp: Fingerprint, reason: str, message: str
    ) -> RegistryEvent:
        self._seen[name] = fp
        self.refused[name] = Refusal(reason, message)
        self.standby.pop(name, None)
        self.refusal_counts[reason] = self.refusal_counts.get(reason, 0) + 1
        self.counters.model_refusal(reason)
        element = edge = None
        try:
            m = read_manifest(path)
            element, edge = model_key(m.element, m.edge)
        except Exception:  # only to name what is still served: never to stop the scan
            pass
        kept = self._serving.get(model_key(element, edge)) if element and edge else None
        suffix = f"; still serving {kept.predictor.bundle_id}" if kept is not None else ""
        return RegistryEvent(
            "refused",
            str(path),
            element,
            edge,
            message=f"refused bundle ({reason}): {message}{suffix}",
            reason=reason,
        )
