"""The model registry: one verified ``Predictor`` per (element, edge), hot-swapped from a directory.

A model directory holds one bundle per subdirectory (``models/cu-k/``, ...). Dot-directories
are ignored: :func:`xasflow.models.bundle_write.write_bundle` writes ``.cu-k.xxxx`` and renames it
into place, and parks the previous bundle as ``.cu-k.old`` for a moment.

:meth:`ModelRegistry.refresh` scans the directory. A subdirectory whose fingerprint (names,
sizes, mtimes and inodes of its entries, symlinks as links) changed since the last scan is
verified (:func:`xasflow.models.bundle.inspect_bundle`: manifest digest, optional Ed25519
signature against ``trusted_keys``, no symlinks, hard links or paths outside the models
directory, every file's hash) and loaded completely, i.e. a ``Predictor`` with all ONNX
sessions is constructed, and only then put into service by replacing the whole mapping in
one assignment. ``get`` reads that mapping once, so a caller sees either the old or the new
predictor, never a half-loaded one. If the bundle's files change while it loads (a copy
still in progress), the result is discarded and the next scan tries again.

A bundle that fails verification is refused: logged with its reason code and message,
counted per reason in ``Counters.model_refused`` (``xasflow_model_refused_total{reason}``)
and :meth:`ModelRegistry.refusal_counts`, listed by :meth:`ModelRegistry.refused`
(read by ``/health``), reported as a ``refused`` event, and whatever served that
element/edge before keeps serving (a predictor in memory was verified when it was loaded).
It is retried only when its files change. The registry remembers the manifest digest of
every ``bundle_id`` it verified; a manifest that differs under a known ``bundle_id`` is
refused (``bundle_id_reused``). That memory lives as long as the process: after a restart
only the digest file and, where keys are configured, the signature protect a manifest.

A bundle directory that disappears is unloaded only after it has been missing for
``remove_after`` consecutive scans, so the brief gap in ``write_bundle``'s two renames never
takes a model out of service. If two directories hold bundles for the same element and
edge, the one with the later manifest ``created`` wins and the other is ``shadowed``: kept
verified on standby (not loaded, to save memory). When the serving bundle is removed, the
best standby is verified and loaded in the same scan, before the mapping is replaced, so
the element never goes without a model. An older bundle (earlier ``created``) put in place
of the one served, in its directory, is served, but reported: a ``rolled_back`` event, a
warning and ``status()["rollbacks"]`` (this process only: no memory survives a restart).
A replaced predictor's memory is handed back to the operating system (``malloc_trim``)
once its last user drops it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
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
    release_memory,
    swap_event,
)
from xasflow.models.bundle import MANIFEST, BundleError, inspect_bundle, read_manifest
from xasflow.models.integrity import MAX_GRAPH_BYTES, public_key_pem
from xasflow.models.predictor import Predictor

__all__ = ["ModelRegistry", "Refusal", "RegistryEvent", "fingerprint"]

logger = logging.getLogger(__name__)


def _key(element: str, edge: str) -> tuple[str, str]:
    return element.strip().capitalize(), edge.strip().upper()


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
        require_digest: bool = True,
        trusted_keys: Sequence[str | bytes | Path] = (),
        require_signature: bool = False,
        min_edge_snr: float | None = None,
        max_graph_bytes: int = MAX_GRAPH_BYTES,
    ) -> None:
        """``scan``: run the first :meth:`refresh` now (its events are in :attr:`events`).
        ``min_edge_snr``: the operator's limit for every bundle loaded (None: each its own).
        ``max_graph_bytes``: a bundle listing a larger file is refused ``too_large`` unread.

        ``loader`` builds a Predictor from a bundle directory (default ``Predictor(dir,
        threads)``); it must raise ``BundleError`` for a bundle that does not verify.
        ``require_digest``, ``trusted_keys`` (Ed25519 public keys, PEM text or file paths) and
        ``require_signature`` are passed to :func:`~xasflow.models.bundle.inspect_bundle`;
        the keys are read once, here (a key file changed later counts after a restart), and
        one that does not load as an Ed25519 public key raises ValueError here.
        """
        if remove_after < 1:
            raise ValueError("remove_after must be >= 1")
        self.directory = Path(directory)
        self.counters = counters if counters is not None else Counters()
        self.threads = threads
        self.remove_after = remove_after
        self.require_digest = require_digest
        self.max_graph_bytes = max_graph_bytes
        self.trusted_keys = tuple(public_key_pem(k) for k in trusted_keys)  # bytes, read now
        self.require_signature = require_signature
        self._loader = loader or (
            lambda path: Predictor(
                path,
                threads=self.threads,
                min_edge_snr=min_edge_snr,
                require_digest=self.require_digest,
                max_graph_bytes=max_graph_bytes,
            )
        )
        self._models: dict[tuple[str, str], ServingEntry] = {}  # replaced whole, never mutated
        self._seen: dict[str, Fingerprint] = {}  # dir name -> fingerprint last judged
        self._refused: dict[str, Refusal] = {}  # dir name -> why, while it stays refused
        self._missing: dict[str, int] = {}  # dir name of a serving bundle -> scans missing
        self._standby: dict[str, Standby] = {}  # dir names of verified, outranked bundles
        self._digests: dict[str, str] = {}  # bundle_id -> manifest sha256, life of process
        self._refusal_counts: dict[str, int] = {}
        self._rollbacks = 0  # older bundles put in place of the one served (served, said)
        self._refresh_lock = threading.Lock()
        self._released = threading.Event()  # a predictor was freed: trim at the next refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dir_warned = False
        self._on_serving: Callable[[bool], None] | None = None
        self._serving_said = False
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
        return [entry.row(*key) for key, entry in sorted(self._models.items())]

    def refused(self) -> dict[str, str]:
        """Bundle directories currently refused, with ``"reason: message"``."""
        return {name: f"{r.reason}: {r.message}" for name, r in self._refused.items()}

    def refusals(self) -> dict[str, Refusal]:
        """Bundle directories currently refused, with their :class:`Refusal`."""
        return dict(self._refused)

    def refusal_counts(self) -> dict[str, int]:
        """Refusals since start, by reason code (each judgement of a changed bundle counts once)."""
        return dict(sorted(self._refusal_counts.items()))

    def standby(self) -> dict[str, str]:
        """Verified bundle directories outranked by another (dir name -> bundle id's key)."""
        return {name: f"{s.key[0]}-{s.key[1]} {s.rank[1]}" for name, s in self._standby.items()}

    def status(self) -> dict[str, Any]:
        """Everything health needs in one JSON-ready dict: serving, standby and refusals."""
        return {
            "serving": self.models(),
            "standby": self.standby(),
            "refused": {
                name: {"reason": r.reason, "message": r.message, "time": r.time}
                for name, r in self._refused.items()
            },
            "refusals_by_reason": self.refusal_counts(),
            "rollbacks": self._rollbacks,
            "require_digest": self.require_digest,
            "require_signature": self.require_signature,
            "trusted_keys": len(self.trusted_keys),
            "max_graph_bytes": self.max_graph_bytes,
        }

    # ------------------------------------------------------------------ scanning

    def refresh(self) -> list[RegistryEvent]:
        """Scan the directory once; load, swap, refuse or remove bundles. Returns what happened."""
        with self._refresh_lock:
            events = self._refresh()
            if self._released.is_set():  # a replaced predictor and its sessions are gone now
                self._released.clear()
                release_memory()
        serving, notify = bool(self._models), self._on_serving
        if notify is not None and serving != self._serving_said:
            self._serving_said = serving
            notify(serving)
        for ev in events:
            self.events.append(ev)
            if ev.kind in ("refused", "error"):
                logger.error("model %s: %s", ev.kind, ev.message)
            elif ev.kind in ("shadowed", "rolled_back"):
                logger.warning("model %s: %s", ev.kind, ev.message)
            else:
                logger.info("model %s: %s", ev.kind, ev.message)
        return events

    def on_serving(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(serving)`` now and whenever the registry starts or stops serving
        any bundle (a hot swap that removes the last one, or brings one back)."""
        self._serving_said = bool(self._models)
        self._on_serving = callback
        callback(self._serving_said)

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

    def _refresh(self) -> list[RegistryEvent]:
        events: list[RegistryEvent] = []
        names = self._list(events)
        models = dict(self._models)
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
            if name in present and name not in self._standby:
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
                self._refused.pop(name, None)
        for name in list(self._standby):
            if name not in present:
                self._standby.pop(name)
        if models != self._models:
            for key in self._models.keys() - models.keys():
                self.counters.set_model(*key, None)
            for key, entry in models.items():
                self.counters.set_model(*key, entry.predictor.bundle_id)
            self._models = models  # the one assignment that puts new predictors in service
        return events

    def _verify(self, path: Path) -> Any:
        return inspect_bundle(
            path,
            root=self.directory,
            require_digest=self.require_digest,
            trusted_keys=self.trusted_keys,
            require_signature=self.require_signature,
            max_graph_bytes=self.max_graph_bytes,
        )

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
        key = _key(m.element, m.edge)
        rank: Rank = (m.created, m.bundle_id)
        current = models.get(key)
        if current is not None and current.directory != str(path) and rank <= current.rank:
            cur = current.predictor.manifest
            msg = (
                f"{path} ({m.bundle_id}) is older than {current.directory} "
                f"({cur.bundle_id}) for {key[0]} {key[1]}; kept on standby"
            )
            self._accept(name, fp, m.bundle_id, verified.digest)
            self._standby[name] = Standby(key, rank)
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
        self._rollbacks += events[-1].kind == "rolled_back"
        return entry

    def _accept(self, name: str, fp: Fingerprint, bundle_id: str, digest: str) -> None:
        """Record a verified bundle directory as judged."""
        self._seen[name] = fp
        self._refused.pop(name, None)
        self._standby.pop(name, None)
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
        key = _key(m.element, m.edge)
        for old_key, old in list(models.items()):
            if old.directory == entry.directory and old_key != key:
                models.pop(old_key)  # the directory now holds another element/edge
                self._takeover(old_key, models, present, events)
        previous = models.get(key)
        if previous is not None and previous.directory != entry.directory:
            self._standby[Path(previous.directory).name] = Standby(key, previous.rank)
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
            ((s.rank, name) for name, s in self._standby.items() if s.key == key),
            reverse=True,
        )
        for _rank, name in candidates:
            self._standby.pop(name, None)
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
        self._refused[name] = Refusal(reason, message)
        self._standby.pop(name, None)
        self._refusal_counts[reason] = self._refusal_counts.get(reason, 0) + 1
        self.counters.model_refusal(reason)
        element = edge = None
        try:
            m = read_manifest(path)
            element, edge = _key(m.element, m.edge)
        except Exception:  # only to name what is still served: never to stop the scan
            pass
        kept = self.get(element, edge) if element and edge else None
        suffix = f"; still serving {kept.bundle_id}" if kept is not None else ""
        return RegistryEvent(
            "refused",
            str(path),
            element,
            edge,
            message=f"refused bundle ({reason}): {message}{suffix}",
            reason=reason,
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
