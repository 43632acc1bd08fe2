"""The streaming daemon's composition root: builds the parts from a :class:`DaemonConfig`,
wires them, starts and stops them. No document handling lives here.

Its threads, what each owns and one spectrum's way through them: ``docs/architecture.md``.

The parts, the groups built together and the order they close in:
:mod:`xasflow.daemon.parts`. Where their rules live: warm-up probes
(:mod:`xasflow.adapters.probes`), crash recovery (:mod:`xasflow.adapters.recovery`), the
processing loop (:mod:`xasflow.daemon.processor`), store writes
(:mod:`xasflow.adapters.store_writer`).

Acknowledged results. A result row is *acknowledged* once a committed transaction holds it:
the store's journal (``storage.journal``, default) or its catalog (``AnalysisStore``
``on_stored``); ``health()["store"]["acknowledged"]`` counts them. An acknowledged row survives
SIGKILL (a journalled one is replayed into the catalog at the next start); a result already
published on the bus but not yet acknowledged may not.

``stop()`` (also on SIGTERM/SIGINT under :meth:`Daemon.serve_forever`) stops receiving,
analyses everything already queued, closes every open run with ``flush_all("shutdown")``
(exit_status "abort"; an unfinished step scan is rejected ``missing_stop``, except with a
Kafka input, which delivers the run again from its start and whose replay needs that row's
seq_num), publishes and stores the results, then flushes and closes the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from xasflow.adapters.probes import PROBE_KEY
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.bus import make_publisher, make_source
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.notify import run_until_signalled
from xasflow.daemon.parts import (
    DaemonError,
    Parts,
    build_analysis,
    build_feedback,
    build_gate,
    build_processor,
    build_store,
    http_bind_error,
)
from xasflow.daemon.pipeline import known_rejections
from xasflow.daemon.status import DaemonStatus

__all__ = ["PROBE_KEY", "Daemon", "DaemonError"]

logger = logging.getLogger(__name__)


class Daemon:
    """The streaming analysis service built from a :class:`DaemonConfig`.

    ``start()`` returns once the input is subscribed and HTTP answers; ``stop()`` finishes
    what was received. Its parts are in :attr:`parts`; HTTP and the dashboard get
    :attr:`view` (a :class:`~xasflow.daemon.status.DaemonStatus`), never the daemon.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.counters = Counters(rejections=known_rejections())
        self.parts = Parts()
        self.view = DaemonStatus(config, self.counters, self.parts)
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Start every part; return when subscribed and HTTP is up, or raise DaemonError."""
        if self._started:
            raise DaemonError("a Daemon can be started once")
        self._started = True
        self.view.started()
        try:
            self._start_parts(self.config, timeout)
        except BaseException as exc:
            self.parts.close()
            if isinstance(exc, DaemonError | KeyboardInterrupt):
                raise
            raise DaemonError(f"cannot start the daemon: {exc}") from exc
        self.view.ready = True
        logger.info(
            "xasflow daemon ready: input %s, output %s, http %s, models %s",
            self.parts.source.address if self.parts.source is not None else "?",
            self.view.output_address or "off",
            self.http_url or "off",
            [f"{m['element']}-{m['edge']}:{m['bundle_id']}" for m in self.view.models()] or "none",
        )

    def _start_parts(self, cfg: DaemonConfig, timeout: float) -> None:
        p = self.parts
        if cfg.http.enabled:  # first: a taken port is refused before a store or IOC exists
            from xasflow.daemon.http import HttpServer

            p.http = HttpServer(None, cfg.http.host, cfg.http.port)
            try:
                p.http.bind()
            except OSError as exc:
                raise http_bind_error(exc) from None
        p.registry, p.pipeline = build_analysis(cfg, self.counters)
        p.ioc, p.submitter = build_feedback(cfg, p.registry)
        for listener in (p.ioc, p.submitter):
            if listener is not None:
                self.add_listener(listener)
        if cfg.storage.enabled:
            p.store, p.writer, p.interrupted = build_store(cfg, on_stored=self._acknowledge)
        p.publisher = make_publisher(cfg)
        p.gate = build_gate(cfg, p.publisher, p.store, p.writer)
        p.assembler = RunAssembler(
            cfg.channels.to_channel_map(), run_timeout=cfg.analysis.run_timeout_s
        )
        p.source = make_source(cfg, self._durable, self._commit_hold)
        try:
            p.source.start(timeout=min(timeout, 10.0))
        except (TimeoutError, RuntimeError) as exc:
            raise DaemonError(str(exc)) from None
        if not p.source.ready.wait(timeout):
            raise DaemonError(f"input not subscribed to {p.source.address}")
        if p.http is not None:
            from xasflow.daemon.http import create_app

            p.app = p.http.app = create_app(self.view, cfg.http)
            dashboard = p.app.state.dashboard
            if dashboard is not None:  # state published to it, never read from this thread
                self.add_listener(dashboard.listener)
                p.pipeline.on_latest = dashboard.offer_latest
        p.processor = build_processor(p, cfg, self.counters, self._listeners, self.view.sync_stats)
        self._listeners = p.processor.outlet.sinks  # listeners added later go straight to it
        self._thread = threading.Thread(target=p.processor.run, name="xasflow-process", daemon=True)
        self._thread.start()
        if p.http is not None:
            try:
                p.http.start(timeout)
            except OSError as exc:
                raise DaemonError(str(exc)) from None
        if p.submitter is not None:  # started: the plans the last daemon gave up, once more
            p.submitter.retry_given_up()

    def _durable(self, timeout: float) -> bool:
        """Everything handed to the sinks so far is committed in the store and, with a
        Kafka output, acknowledged by the broker (the Kafka input commits only after this).
        With ``output.after_store`` the documents wait in the gate until the store holds
        their rows, so the gate must have let them all out before the publisher's flush."""
        deadline = time.monotonic() + timeout
        if self.parts.store is not None and not self.parts.store.flush(timeout):
            return False
        gate = self.parts.gate
        if gate is not None and not gate.drained(max(deadline - time.monotonic(), 0.0)):
            return False
        flush = getattr(self.parts.publisher, "flush", None)
        return flush(max(deadline - time.monotonic(), 0.0)) if flush is not None else True

    def _commit_hold(self) -> str | None:
        """Why the Kafka input may commit no offset any more: the store refused results
        (full for longer than ``storage.full_wait_s``) or gave up results it had accepted
        because the catalog would not take them (no journal copy to replay; rows that do
        not fit their columns would fail again, and do not hold), or the Kafka output lost
        analysis documents (not acknowledged by the broker), and a commit past them would
        lose them for good; a restart has Kafka redeliver them (the store skips rows it
        holds, the output publishes them again)."""
        store = self.parts.store
        refused = store.refused if store is not None else 0
        lost = store.write_lost if store is not None else 0
        undelivered = int(getattr(self.parts.publisher, "undelivered", 0))
        reasons = []
        if refused:
            reasons.append(f"the store refused {refused} results while full (storage.max_queue)")
        if lost:
            reasons.append(f"the store lost {lost} results the catalog would not take")
        if undelivered:
            reasons.append(f"{undelivered} analysis documents were not delivered to Kafka")
        if not reasons:
            return None
        return f"{'; '.join(reasons)}: restart the daemon to have Kafka redeliver them"

    def _acknowledge(self) -> None:
        self.view.row_acknowledged()  # called from the store's writer thread
        if self.parts.gate is not None:
            self.parts.gate.row_resolved()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop receiving, finish everything held, flush the store; idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self.view.ready = False
            p = self.parts
            if p.source is not None:
                p.source.close()  # joins the receive thread: nothing new is queued now
            if p.processor is not None:
                p.processor.drain.set()
            if p.store is not None:  # a full store refuses now (a Kafka input then holds its
                p.store.stop_waiting()  # commits) rather than outlast the join below
            if self._thread is not None:
                self._thread.join(timeout)
                if self._thread.is_alive():
                    logger.error("processing thread did not finish within %.0f s", timeout)
            self.parts.close(timeout)
            self._stopped.set()
            if self._thread is not None:  # a start that failed analysed nothing: its error says why
                logger.info("xasflow daemon stopped: %s", self.counters.summary())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished; True if it has."""
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT (main thread only), stop cleanly; tell systemd."""
        run_until_signalled(
            self.start,
            self.stop,
            alive=lambda: self._thread is None or self._thread.is_alive(),
            status=lambda: f"analysing spectra; models: {len(self.view.models())}",
        )

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_listener(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        """Also send every analysis document to ``callback`` (called from the processing thread;
        it must be quick and must not raise)."""
        self._listeners.append(callback)

    @property
    def http_url(self) -> str | None:
        """Base URL of the HTTP server, or None when it is off or not serving (yet, or any more)."""
        http = self.parts.http
        return http.url if http is not None and http.serving else None
