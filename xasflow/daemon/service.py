"""The streaming daemon's composition root: builds the parts from a :class:`DaemonConfig`,
wires them, starts and stops them. No document handling lives here.

Its threads, what each owns and one spectrum's way through them: ``docs/architecture.md``.

Parts and where their rules live: warm-up probes (:mod:`xasflow.adapters.probes`), crash
recovery (:mod:`xasflow.adapters.recovery`), the processing loop
(:mod:`xasflow.daemon.processor`), store writes (:mod:`xasflow.adapters.store_writer`).

Acknowledged results. A result row is *acknowledged* once a committed transaction holds it:
the store's journal (``storage.journal``, default) or its catalog (``AnalysisStore``
``on_stored``); ``health()["store"]["acknowledged"]`` counts them. An acknowledged row survives
SIGKILL (a journalled one is replayed into the catalog at the next start); a result already
published on the bus but not yet acknowledged may not.

``stop()`` (also on SIGTERM/SIGINT under :meth:`Daemon.serve_forever`) stops receiving,
analyses everything already queued, closes every open run with ``flush_all("shutdown")``
(exit_status "abort"; an unfinished step scan is rejected ``missing_stop``), publishes and
stores the results, then flushes and closes the store.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from xasflow import __version__
from xasflow.adapters.commit_gate import CommitGate
from xasflow.adapters.probes import PROBE_KEY, ProbeFilter
from xasflow.adapters.recovery import InterruptedRuns
from xasflow.adapters.store_writer import StoreWriter
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.bus import make_publisher, make_source, output_address
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.documents import ANALYSIS_STREAM, DATA_KEYS
from xasflow.daemon.health import feedback_health, input_health, limits_health
from xasflow.daemon.notify import sd_notify
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.processor import Processor
from xasflow.daemon.registry import ModelRegistry

__all__ = ["PROBE_KEY", "Daemon", "DaemonError"]

logger = logging.getLogger(__name__)


class DaemonError(RuntimeError):
    """The daemon cannot start (a port in use, a locked store, no proxy, ...)."""


class Daemon:
    """The streaming analysis service built from a :class:`DaemonConfig`.

    ``start()`` returns once the input is subscribed and HTTP answers; ``stop()`` finishes
    what was received. It satisfies :class:`~xasflow.daemon.view.DaemonView` (what HTTP and
    the dashboard read): :attr:`counters`, :meth:`health`, the adapters' stats.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.registry: ModelRegistry | None = None
        self.pipeline: Pipeline | None = None
        self.store: Any = None
        self.publisher: Any = None  # ZmqDocumentPublisher, or KafkaDocumentPublisher
        self.source: Any = None  # ZmqDocumentSource, or KafkaDocumentSource
        self.assembler: RunAssembler | None = None
        self.processor: Processor | None = None
        self.http: Any = None
        self.ioc: Any = None  # XasIoc when epics.enabled
        self.submitter: Any = None  # QueueServerSubmitter when queueserver.enabled
        self.app: Any = None
        self.probes = ProbeFilter()
        self.interrupted: InterruptedRuns | None = None
        self._writer: StoreWriter | None = None
        self.gate: CommitGate | None = None  # output.after_store
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._ready = False
        self._started_at: float | None = None
        self._stats_lock = threading.Lock()
        self._acknowledged = 0  # result rows whose store transaction committed

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Start every part; return when subscribed and HTTP is up, or raise DaemonError."""
        if self._started_at is not None:
            raise DaemonError("a Daemon can be started once")
        self._started_at = time.monotonic()
        cfg = self.config
        try:
            self._start_parts(cfg, timeout)
        except BaseException as exc:
            self._teardown()
            if isinstance(exc, DaemonError | KeyboardInterrupt):
                raise
            raise DaemonError(f"cannot start the daemon: {exc}") from exc
        self._ready = True
        logger.info(
            "xasflow daemon ready: input %s, output %s, http %s, models %s",
            self.source.address if self.source is not None else "?",
            self.output_address or "off",
            self.http_url or "off",
            [f"{m['element']}-{m['edge']}:{m['bundle_id']}" for m in self.models()] or "none",
        )

    def _start_parts(self, cfg: DaemonConfig, timeout: float) -> None:
        models = cfg.models
        self.registry = ModelRegistry(
            models.directory,
            self.counters,
            require_digest=models.require_digest,
            trusted_keys=models.trusted_keys,
            require_signature=models.require_signature,
        )
        if not self.registry.models():
            logger.warning(
                "no model bundle in %s: every spectrum will be rejected no_model",
                cfg.models.directory,
            )
        if cfg.models.watch:
            self.registry.start_watching(cfg.models.watch_interval_s)
        rec = cfg.recommend
        self.pipeline = Pipeline(
            self.registry,
            self.counters,
            align=cfg.analysis.align,
            recommend=rec.recommender if rec.enabled else None,
            recommend_interval_s=rec.interval_s,
            herfd=cfg.analysis.herfd,
        )
        self._start_feedback(cfg)
        if cfg.storage.enabled:
            from xasflow.adapters.tiled_store import AnalysisStore

            self.store = AnalysisStore(
                cfg.storage.directory,
                batch_size=cfg.storage.batch_size,
                flush_interval=cfg.storage.flush_interval_s,
                max_queue=cfg.storage.max_queue,
                table_backend=cfg.storage.backend,
                journal=cfg.storage.journal,
                catalog_process=cfg.storage.catalog_process,
            )
            self._writer = StoreWriter(self.store, on_stored=self._acknowledge)
            self.interrupted = InterruptedRuns(
                self.store, cfg.channels.stream, cfg.analysis.run_timeout_s
            )
            self.interrupted.find()
        self.publisher = make_publisher(cfg)
        store, writer = self.store, self._writer
        if self.publisher and cfg.output.after_store and writer is not None and store is not None:
            self.gate = CommitGate(
                self.publisher,
                cfg.output.after_store_timeout_s,
                commit_now=lambda: store.flush(0.0),  # asks the store to commit, never waits
            )
            writer.gate = self.gate
        self.assembler = RunAssembler(
            cfg.channels.to_channel_map(), run_timeout=cfg.analysis.run_timeout_s
        )
        self.source = make_source(cfg, self._durable)
        try:
            self.source.start(timeout=min(timeout, 10.0))
        except (TimeoutError, RuntimeError) as exc:
            raise DaemonError(str(exc)) from None
        if not self.source.ready.wait(timeout):
            raise DaemonError(f"input not subscribed to {self.source.address}")
        if cfg.http.enabled:
            from xasflow.daemon.http import HttpServer, create_app

            self.app = create_app(self, cfg.http)
            dashboard = self.app.state.dashboard
            if dashboard is not None:  # state published to it, never read from this thread
                self.add_listener(dashboard.listener)
                self.pipeline.on_latest = dashboard.offer_latest
        self.processor = self._processor()
        self._thread = threading.Thread(
            target=self.processor.run, name="xasflow-process", daemon=True
        )
        self._thread.start()
        if self.app is not None:
            self.http = HttpServer(self.app, cfg.http.host, cfg.http.port)
            try:
                self.http.start(timeout)
            except OSError as exc:
                raise DaemonError(str(exc)) from None

    def _processor(self) -> Processor:
        """The processing loop, its sinks in order: store writer, publisher, listeners."""
        assert self.source is not None and self.assembler is not None
        assert self.pipeline is not None
        proc = Processor(
            self.source.get,
            self.assembler,
            self.pipeline,
            self.counters,
            self.config.analysis,
            probes=self.probes,
            interrupted=self.interrupted,
            on_tick=self.sync_stats,
        )
        proc.store_sink = self._writer
        store = self.store
        if store is not None:  # the analysis table made at the raw start, not the first result
            table = {"name": ANALYSIS_STREAM, "data_keys": DATA_KEYS}

            def prepare(doc: dict[str, Any]) -> None:
                if isinstance(doc.get("uid"), str):  # a start without one is rejected later
                    store.prepare_run(doc["uid"], table)

            proc.on_raw_start = prepare
        if self.config.input.kind == "kafka":  # the commit rule's hooks
            proc.on_processed = self.source.mark_processed
            proc.abandoned = self.source.abandoned
        if self.gate is not None:
            proc.sinks.append(self.gate)  # publishes once the store holds the rows
        elif self.publisher is not None:
            proc.sinks.append(self.publisher)
        proc.sinks.extend(self._listeners)
        self._listeners = proc.sinks  # listeners added later go straight to the processor
        return proc

    def _start_feedback(self, cfg: DaemonConfig) -> None:
        """The EPICS IOC and the queueserver submitter, when enabled: both follow the
        analysis documents as listeners."""
        if cfg.epics.enabled:
            from xasflow.adapters.epics_ioc import XasIoc

            ioc = XasIoc(cfg.epics.prefix, host=cfg.epics.host, port=cfg.epics.port)
            try:
                ioc.start()
            except Exception as exc:
                raise DaemonError(
                    f"cannot serve EPICS PVs {cfg.epics.prefix}* on "
                    f"{cfg.epics.host}:{cfg.epics.port}: {exc}"
                ) from None
            self.ioc = ioc
            assert self.registry is not None
            ioc.set_model_ok(bool(self.registry.models()))
            self.add_listener(ioc)
        if cfg.queueserver.enabled:
            from xasflow.adapters.queueserver import QueueServerSubmitter

            self.submitter = QueueServerSubmitter(cfg.queueserver)
            self.add_listener(self.submitter)

    def _durable(self, timeout: float) -> bool:
        """Everything handed to the sinks so far is committed in the store and, with a
        Kafka output, acknowledged by the broker (the Kafka input commits only after this)."""
        if self.store is not None and not self.store.flush(timeout):
            return False
        flush = getattr(self.publisher, "flush", None)
        return flush(timeout) if flush is not None else True

    def _acknowledge(self) -> None:
        with self._stats_lock:  # called from the store's writer thread
            self._acknowledged += 1
        if self.gate is not None:
            self.gate.row_resolved()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop receiving, finish everything held, flush the store; idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._ready = False
            if self.source is not None:
                self.source.close()  # joins the receive thread: nothing new is queued now
            if self.processor is not None:
                self.processor.drain.set()
            if self._thread is not None:
                self._thread.join(timeout)
                if self._thread.is_alive():
                    logger.error("processing thread did not finish within %.0f s", timeout)
            self._teardown(timeout)
            self._stopped.set()
            logger.info("xasflow daemon stopped: %s", self.counters.summary())

    def _teardown(self, timeout: float = 30.0) -> None:
        """Close what was started (store last but one, HTTP last); safe on partial starts."""
        if self.processor is not None:
            self.processor.drain.set()
        if self.source is not None and not self.source.closed:
            self.source.close()
        if self.registry is not None:
            self.registry.stop()
        finish = getattr(self.source, "finish", None)
        if finish is not None:  # Kafka: commit what is processed and durable, leave the group
            finish(timeout)
        if self.store is not None:
            try:
                if not self.store.flush(timeout):
                    logger.error("analysis store did not flush within %.0f s", timeout)
                self.store.close()
            except Exception:
                logger.exception("closing the analysis store failed")
        if self.gate is not None:
            self.gate.close(timeout)  # the store has flushed: what it holds goes out now
        if self.publisher is not None:
            self.publisher.close()
        if self.submitter is not None:
            try:
                self.submitter.close(timeout)
            except Exception:
                logger.exception("closing the queueserver submitter failed")
        if self.ioc is not None:
            self.ioc.stop()
        if self.http is not None:
            self.http.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished; True if it has."""
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT (main thread only), stop cleanly; tell systemd."""
        requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %s: stopping", signal.Signals(signum).name)
            requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            # Start-up left a large heap of long-lived objects (modules, bundles, the store's
            # client): moved out of the collector's reach, a full collection no longer walks
            # them while spectra wait (measured: 40-144 ms pauses at 500-750 spectra/s).
            gc.collect()
            gc.freeze()
            sd_notify(f"READY=1\nSTATUS=analysing spectra; models: {len(self.models())}")
            while not requested.wait(0.5):
                if self._thread is not None and not self._thread.is_alive():
                    logger.error("processing thread ended unexpectedly; stopping")
                    break
        finally:
            sd_notify("STOPPING=1")
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ extension points

    def add_listener(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        """Also send every analysis document to ``callback`` (called from the processing thread;
        it must be quick and must not raise)."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ views (any thread)

    @property
    def ready(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._ready

    @property
    def uptime(self) -> float:
        """Seconds since ``start()`` (0 before)."""
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    @property
    def http_url(self) -> str | None:
        """Base URL of the HTTP server, or None when it is off or not started."""
        return self.http.url if self.http is not None else None

    @property
    def open_runs(self) -> int:
        """Raw runs being assembled."""
        return self.assembler.open_runs if self.assembler is not None else 0

    @property
    def echo_dropped(self) -> int:
        """Own analysis messages dropped at the input (empty input prefix)."""
        return self.source.stats().get("ignored", 0) if self.source is not None else 0

    def models(self) -> list[dict[str, Any]]:
        """Bundles in service (see ``ModelRegistry.models``)."""
        return self.registry.models() if self.registry is not None else []

    def input_stats(self) -> dict[str, int]:
        """The 0MQ input's counters and queue depth."""
        return self.source.stats() if self.source is not None else {}

    @property
    def output_address(self) -> str | None:
        """Where analysis documents go (a 0MQ address or ``kafka://servers/topic``)."""
        return output_address(self.config, self.publisher)

    def output_stats(self) -> dict[str, int]:
        """The publisher's counters (and the commit gate's, with ``output.after_store``)."""
        stats = self.publisher.stats() if self.publisher is not None else {}
        if self.gate is not None:
            stats.update({f"after_store.{k}": v for k, v in self.gate.stats().items()})
        return stats

    def store_stats(self) -> dict[str, int]:
        """The analysis store's counters (empty when storage is off)."""
        if self.store is None:
            return {}
        stats = self.store.stats()
        if self._writer is not None:
            stats["unstored"] = self._writer.unstored
        with self._stats_lock:
            stats["acknowledged"] = self._acknowledged
        return stats

    def sync_stats(self) -> None:
        """Fold the input's decode errors into the counters and refresh the gauges."""
        src = self.input_stats()
        prefix = "decode_errors."
        self.counters.sync_decode_errors(
            {k.removeprefix(prefix): v for k, v in src.items() if k.startswith(prefix)}
        )
        self.counters.sync_lost("overflow", src.get("dropped_overflow", 0))
        self.counters.set_gauge("queue_depth", src.get("queue_depth", 0))
        if self.config.input.kind == "kafka" and self.source is not None:
            self.counters.sync_kafka(src, self.source.lag())
        self.counters.set_gauge("open_runs", self.open_runs)
        store = self.store_stats()
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
        sse = getattr(getattr(self.app, "state", None), "sse_limit", None)
        return limits_health(self.config, src, store, sse)

    def health(self) -> dict[str, Any]:
        """Readiness, uptime, counters, models and adapter state, JSON-ready."""
        self.sync_stats()
        src = self.input_stats()
        registry = self.registry
        counters = self.counters.snapshot()
        return {
            "ready": self.ready,
            "version": __version__,
            "uptime_s": round(self.uptime, 3),
            "queue_depth": src.get("queue_depth", 0),
            "open_runs": self.open_runs,
            "counters": counters,
            # raw events that never reached the analysis, by cause (also in /metrics)
            "events_lost": {"total": counters["events_lost_total"], **counters["events_lost"]},
            "out_of_domain": counters["out_of_domain"],
            "models": self.models(),
            "models_refused": registry.refused() if registry is not None else {},
            # serving, standby, refusals by reason and the integrity settings
            "registry": registry.status() if registry is not None else None,
            "input": input_health(self.config, self.source, src, counters, self.echo_dropped),
            "output": {
                "kind": self.config.output.kind,
                "address": self.output_address,
                "prefix": self.config.output.prefix,
                **self.output_stats(),
            },
            "store": {
                "directory": str(self.config.storage.directory) if self.store else None,
                **self.store_stats(),
            },
            "probes": self.probes.health(),
            "interrupted": (
                self.interrupted.health()
                if self.interrupted is not None
                else {"open": [], "closed": []}
            ),
            "feedback": feedback_health(self.config, self.ioc, self.submitter),
            "limits": {**self.limits(), "token_min_length": self.config.http.token_min_length},
            "internal_errors": self.processor.internal_errors if self.processor else 0,
        }
