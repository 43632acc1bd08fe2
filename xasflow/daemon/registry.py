"""The model registry: one verified ``Predictor`` per (element, edge), hot-swapped from a directory.

A model directory holds one bundle per subdirectory (``models/cu-k/``, ...). Dot-directories
are ignored: :func:`xasflow.models.bundle_write.write_bundle` writes ``.cu-k.xxxx`` and renames it
into place, and parks the previous bundle as ``.cu-k.old`` for a moment.

:meth:`ModelRegistry.refresh` scans the directory (what is judged between scans, and how, is
:class:`~xasflow.daemon.registry_scan.ModelScanner`'s). A changed subdirectory is verified
(:func:`xasflow.models.bundle.inspect_bundle`: manifest digest, optional Ed25519
signature against ``trusted_keys``, no symlinks, hard links or paths outside the models
directory, every file's hash) and loaded completely, i.e. a ``Predictor`` with all ONNX
sessions is constructed, and only then put into service by replacing the whole mapping in
one assignment. ``get`` reads that mapping once, so a caller sees either the old or the new
predictor, never a half-loaded one.

A bundle that fails verification is refused: logged with its reason code and message,
counted per reason in ``Counters.model_refused`` (``xasflow_model_refused_total{reason}``)
and :meth:`ModelRegistry.refusal_counts`, listed by :meth:`ModelRegistry.refused`
(read by ``/health``), reported as a ``refused`` event, and whatever served that
element/edge before keeps serving (a predictor in memory was verified when it was loaded).
Bundles outranked for their element/edge wait on standby (:meth:`ModelRegistry.standby`);
an older bundle put in place of the one served is reported (``status()["rollbacks"]``, this
process only: no memory survives a restart).
A replaced predictor's memory is handed back to the operating system (``malloc_trim``)
once its last user drops it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xasflow.daemon.counters import Counters
from xasflow.daemon.registry_events import (
    Refusal,
    RegistryEvent,
    ServingEntry,
    fingerprint,
    release_memory,
)
from xasflow.daemon.registry_scan import ModelScanner, model_key
from xasflow.models.bundle import inspect_bundle
from xasflow.models.integrity import MAX_GRAPH_BYTES, public_key_pem
from xasflow.models.predictor import Predictor

__all__ = ["ModelRegistry", "Refusal", "RegistryEvent", "fingerprint"]

logger = logging.getLogger(__name__)


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
        self._refresh_lock = threading.Lock()
        self._released = threading.Event()  # a predictor was freed: trim at the next refresh
        self._scanner = ModelScanner(
            self.directory, self.counters, remove_after, self._verify, self._loader, self._released
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_serving: Callable[[bool], None] | None = None
        self._serving_said = False
        #: The most recent events (bounded), oldest first.
        self.events: deque[RegistryEvent] = deque(maxlen=200)
        if scan:
            self.refresh()

    # ------------------------------------------------------------------ serving side

    def get(self, element: str, edge: str = "K") -> Predictor | None:
        """The predictor serving ``element``/``edge``, or None (lock-free, never partial)."""
        entry = self._models.get(model_key(element, edge))
        return None if entry is None else entry.predictor

    def serving(self) -> list[tuple[str, str]]:
        """(element, edge) pairs with a model in service."""
        return sorted(self._models)

    def models(self) -> list[dict[str, Any]]:
        """What is in service, for health and the dashboard: ids, metrics per task, load time."""
        return [entry.row(*key) for key, entry in sorted(self._models.items())]

    def refused(self) -> dict[str, str]:
        """Bundle directories currently refused, with ``"reason: message"``."""
        return {name: f"{r.reason}: {r.message}" for name, r in self._scanner.refused.items()}

    def refusals(self) -> dict[str, Refusal]:
        """Bundle directories currently refused, with their :class:`Refusal`."""
        return dict(self._scanner.refused)

    def refusal_counts(self) -> dict[str, int]:
        """Refusals since start, by reason code (each judgement of a changed bundle counts once)."""
        return dict(sorted(self._scanner.refusal_counts.items()))

    def standby(self) -> dict[str, str]:
        """Verified bundle directories outranked by another (dir name -> bundle id's key)."""
        return {
            name: f"{s.key[0]}-{s.key[1]} {s.rank[1]}" for name, s in self._scanner.standby.items()
        }

    def status(self) -> dict[str, Any]:
        """Everything health needs in one JSON-ready dict: serving, standby and refusals."""
        return {
            "serving": self.models(),
            "standby": self.standby(),
            "refused": {
                name: {"reason": r.reason, "message": r.message, "time": r.time}
                for name, r in self._scanner.refused.items()
            },
            "refusals_by_reason": self.refusal_counts(),
            "rollbacks": self._scanner.rollbacks,
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

    def _refresh(self) -> list[RegistryEvent]:
        models, events = self._scanner.scan(self._models)
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
