"""The read-only view of a daemon that HTTP and the dashboard get.

:class:`DaemonStatus` reads the :class:`~xasflow.daemon.parts.Parts` the composition root
(:mod:`xasflow.daemon.service`) built and satisfies
:class:`~xasflow.daemon.view.DaemonView`: counters, adapter statistics, limits and ``/health``.
It starts and stops nothing, and every member is safe to call from any thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from xasflow import __version__
from xasflow.daemon.bus import output_address
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.health import feedback_health, input_health, limits_health
from xasflow.daemon.parts import Parts
from xasflow.daemon.view import StatsReading

__all__ = ["DaemonStatus"]


class DaemonStatus:
    """The :class:`~xasflow.daemon.view.DaemonView` of one daemon's :class:`Parts`."""

    def __init__(self, config: DaemonConfig, counters: Counters, parts: Parts) -> None:
        self.config = config
        self.counters = counters
        self.parts = parts
        self.ready = False  # set by the daemon between a successful start and its stop
        self._started_at: float | None = None
        self._lock = threading.Lock()
        self._acknowledged = 0  # result rows whose store transaction committed

    def started(self) -> None:
        """Start the uptime clock (the daemon's ``start()``)."""
        self._started_at = time.monotonic()

    def row_acknowledged(self) -> None:
        """One result row is durable in the store (called from its writer thread)."""
        with self._lock:
            self._acknowledged += 1

    @property
    def uptime(self) -> float:
        """Seconds since ``start()`` (0 before)."""
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    @property
    def open_runs(self) -> int:
        """Raw runs being assembled."""
        assembler = self.parts.assembler
        return assembler.open_runs if assembler is not None else 0

    @property
    def internal_errors(self) -> int:
        """Unexpected errors (bugs): documents and batches the processing loop dropped, runs
        whose start or stop the pipeline failed on (by kind: ``counters.internal_errors``)."""
        return sum(self.counters.internal_errors.values())  # its keys are fixed at start

    def last_turn_age(self) -> float | None:
        """Seconds since the processing loop's last pass (None before it is built). An idle
        loop passes every 50 ms: a large age means one document or batch holds the thread."""
        processor = self.parts.processor
        return None if processor is None else processor.turn_age()

    def last_document_age(self) -> float | None:
        """Seconds since the input last decoded a document (None before its first)."""
        at = getattr(self.parts.source, "last_document_at", None)
        return None if at is None else time.monotonic() - at

    @property
    def echo_dropped(self) -> int:
        """Own analysis messages dropped at the input (empty input prefix)."""
        return self.input_stats().get("ignored", 0)

    def models(self) -> list[dict[str, Any]]:
        """Bundles in service (see ``ModelRegistry.models``)."""
        registry = self.parts.registry
        return registry.models() if registry is not None else []

    def models_refused_now(self) -> dict[str, str]:
        """Bundle directories refused now (``ModelRegistry.refusals``), with their reason."""
        registry = self.parts.registry
        refusals = registry.refusals() if registry is not None else {}
        return {name: r.reason for name, r in sorted(refusals.items())}

    def input_stats(self) -> dict[str, int]:
        """The input's counters and queue depth."""
        source = self.parts.source
        return source.stats() if source is not None else {}

    @property
    def output_address(self) -> str | None:
        """Where analysis documents go (a 0MQ address or ``kafka://servers/topic``)."""
        return output_address(self.config, self.parts.publisher)

    def output_stats(self) -> dict[str, int]:
        """The publisher's counters (and the commit gate's, with ``output.after_store``;
        without it, the documents it refused: ``publish_errors``)."""
        publisher, gate = self.parts.publisher, self.parts.gate
        stats = publisher.stats() if publisher is not None else {}
        if gate is not None:
            stats.update({f"after_store.{k}": v for k, v in gate.stats().items()})
        if self.parts.publish_sink is not None:  # no gate: the loop hands it documents
            stats["publish_errors"] = self.parts.publish_sink.errors
        return stats

    def store_stats(self) -> dict[str, int]:
        """The analysis store's counters (empty when storage is off)."""
        store, writer = self.parts.store, self.parts.writer
        if store is None:
            return {}
        stats = store.stats()
        if writer is not None:
            stats["unstored"] = writer.unstored
            stats["lost"] = writer.lost
        with self._lock:
            stats["acknowledged"] = self._acknowledged
        return stats

    def sync_stats(self) -> None:
        """Fold the input's decode errors into the counters and refresh the gauges."""
        self.read_stats()

    def read_stats(self) -> StatsReading:
        """Read the input's and the store's stats once (the store's count the journal's
        rows), refresh the counters and gauges from them and return them for the caller's
        report: one read per ``/health``, ``/metrics`` or processing tick."""
        reading = StatsReading(self.input_stats(), self.store_stats())
        self._sync(*reading)
        return reading

    def _sync(self, src: dict[str, int], store: dict[str, int]) -> None:
        """:meth:`sync_stats` from stats already read."""
        prefix = "decode_errors."
        self.counters.sync_decode_errors(
            {k.removeprefix(prefix): v for k, v in src.items() if k.startswith(prefix)}
        )
        # events (an event page's rows), not documents: xasflow.adapters.input_drops
        self.counters.sync_lost("overflow", src.get("dropped_overflow_events", 0))
        self.counters.sync_lost("on_close", src.get("dropped_on_close_events", 0))  # 0MQ's
        self.counters.set_gauge("queue_depth", src.get("queue_depth", 0))
        source = self.parts.source
        if self.config.input.kind == "kafka" and source is not None:
            self.counters.sync_kafka(src, source.lag(), held=source.commit_hold() is not None)
        self.counters.set_gauge("open_runs", self.open_runs)
        assembler = self.parts.assembler  # its forgotten drop rows: a loss's cause unknown
        if assembler is not None:
            self.counters.sync_drop_records_forgotten(assembler.early_drops_forgotten)
        if self.parts.submitter is not None:  # its plans by outcome, lost ones included
            submitter = self.parts.submitter
            self.counters.sync_queueserver(submitter.stats, submitter.deferred_errors)
        if store:
            self.counters.set_gauge("store_queued", store.get("queued", 0))
        for name, limit in self._limits(src, store).items():  # each limit's size and fill
            self.counters.set_gauge("limit", limit["max"], limit=name)
            used = limit.get("open", limit.get("depth", 0))
            self.counters.set_gauge("limit_used", used, limit=name)

    def limits(self) -> dict[str, dict[str, Any]]:
        """Operator limits (config), how full each is and what each refused or dropped."""
        return self._limits(self.input_stats(), self.store_stats())

    def _limits(self, src: dict[str, int], store: dict[str, int]) -> dict[str, dict[str, Any]]:
        """:meth:`limits` from stats already read (the store's count the journal's rows)."""
        sse = getattr(getattr(self.parts.app, "state", None), "sse_limit", None)
        return limits_health(self.config, src, store, sse)

    def health(self) -> dict[str, Any]:
        """Readiness, uptime, counters, models and adapter state, JSON-ready."""
        src, store = self.read_stats()
        parts, config = self.parts, self.config
        registry = parts.registry
        counters = self.counters.snapshot()
        return {
            "ready": self.ready,
            # ready and a bundle loaded: what /readyz answers (ready alone means started; a
            # daemon whose bundles were all refused runs on, rejecting every spectrum no_model)
            "serving": self.ready and bool(counters["models"]),
            "version": __version__,
            "uptime_s": round(self.uptime, 3),
            "queue_depth": src.get("queue_depth", 0),
            "open_runs": self.open_runs,
            # a stall: documents queued (or a run open) while the loop's last pass gets old;
            # a silent input: a run open while its last document gets old (run_timeout_s)
            "last_turn_age_s": _rounded(self.last_turn_age()),
            "last_document_age_s": _rounded(self.last_document_age()),
            "counters": counters,
            # raw events that never reached the analysis, by cause (also in /metrics)
            "events_lost": {"total": counters["events_lost_total"], **counters["events_lost"]},
            "out_of_domain": counters["out_of_domain"],
            "models": self.models(),
            "models_refused": registry.refused() if registry is not None else {},
            # serving, standby, refusals by reason and the integrity settings
            "registry": registry.status() if registry is not None else None,
            "input": input_health(config, parts.source, src, counters, src.get("ignored", 0)),
            "output": {
                "kind": config.output.kind,
                "address": self.output_address,
                "prefix": config.output.prefix,
                **self.output_stats(),
            },
            "store": {
                "directory": str(config.storage.directory) if parts.store else None,
                **store,
            },
            "probes": parts.probes.health(),
            "interrupted": (
                parts.interrupted.health()
                if parts.interrupted is not None
                else {"open": [], "closed": []}
            ),
            "feedback": feedback_health(config, parts.ioc, parts.submitter),
            "limits": {
                **self._limits(src, store),
                "token_min_length": config.http.token_min_length,
            },
            "internal_errors": self.internal_errors,
            # analysis.prep_process: the child's pid, jobs, fallbacks to the thread, restarts
            "prep_process": (
                parts.pipeline.worker.health()
                if parts.pipeline is not None and parts.pipeline.worker is not None
                else None
            ),
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
