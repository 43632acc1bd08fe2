"""The streaming daemon: 0MQ documents in, analysis runs out to the bus and the tiled store.

Threads and what they own::

    xasflow-zmq-in       ZmqDocumentSource: receive, decode, enqueue (bounded, counted)
    xasflow-process      this module: RunAssembler.feed -> Pipeline.handle_batch -> fan-out
    xasflow-tiled-writer AnalysisStore: batched, acknowledged writes
    xasflow-model-watch  ModelRegistry: verified hot swaps
    xasflow-http         uvicorn: /metrics, /health (and the dashboard)
    xasflow-ioc-<prefix> XasIoc (epics.enabled): caproto server; fed by a listener, never blocks
    (queueserver worker) QueueServerSubmitter (queueserver.enabled): plan submissions off the
                         processing thread, at most one per min_interval_s

The processing thread takes everything queued (up to ``analysis.batch_max`` documents) per
turn, feeds it to the assembler, looks for idle runs every ``analysis.timeout_check_s``,
hands the assembler outputs to the pipeline in batches of up to ``_ANALYSIS_CHUNK`` spectra
(one ONNX call per bundle, task and batch) and fans the resulting analysis documents out to
the publisher and the store after each batch, so a backlog's first results are not held
back until the whole backlog is analysed. It is the only thread touching the assembler and the pipeline.

Two kinds of input never reach the assembler: the daemon's own analysis documents coming
back through the proxy when the input prefix is empty (dropped before decoding by the input's
``ignore_prefixes``, counted as ``own_output``), and warm-up probe runs (a start carrying ``xasflow_probe`` and its stop,
see :meth:`xasflow.sim.beamline.SimBeamline.warm_up`), which only update
``health()["probes"]`` so a publisher can tell that the daemon sees it.

Acknowledged results. A result row is *acknowledged* once the store's transaction holding it
has committed (``AnalysisStore`` ``on_stored``); ``health()["store"]["acknowledged"]`` counts
them. An acknowledged row survives SIGKILL; a result already published on the bus but not yet
acknowledged may not.

Restart after a crash. 0MQ PUB/SUB is at-most-once: what the proxy forwards while no daemon is
subscribed is dropped, and the documents a killed daemon had received but not analysed or
stored are gone with it. At start the daemon therefore looks in the store for analysis runs
its predecessor left open (``AnalysisStore.unfinished_runs``) and reports the gap: each is
closed ("interrupted"), when the raw run's stop arrives (its ``num_events`` gives the raw
count, so ``raw_missing_events`` = raw spectra - spectra stored), after ``run_timeout_s``
without it, or at shutdown. The stop (``exit_status`` "fail", ``reason`` "interrupted: ...",
``interrupted: true``) is published under the analysis run's original start uid and recorded
in the store; ``health()["interrupted"]`` lists them. Raw events of such a run that arrive
after the restart belong to a descriptor this process never saw: the assembler rejects them
``unknown_descriptor`` (counted), and they are part of ``raw_missing_events``.

``stop()`` (also on SIGTERM/SIGINT under :meth:`Daemon.serve_forever`) stops receiving,
analyses everything already queued, closes every open run with ``flush_all("shutdown")``
(exit_status "abort"; an unfinished step scan is rejected ``missing_stop``), publishes and
stores the results, then flushes and closes the store.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from types import FrameType
from typing import Any

from xasflow import __version__
from xasflow.adapters.store_writer import StoreWriter
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig
from xasflow.daemon.assembly import RunAssembler, SpectrumReady
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.documents import ANALYSIS_STREAM
from xasflow.daemon.registry import ModelRegistry

__all__ = ["PROBE_KEY", "Daemon", "DaemonError"]

logger = logging.getLogger(__name__)

#: Start-document key of a warm-up probe run (same as ``xasflow.sim.beamline.PROBE_KEY``).
PROBE_KEY = "xasflow_probe"
_PROBE_MEMORY = 64
_STATS_INTERVAL_S = 0.25
#: Spectra per pipeline call when a backlog is drained: big enough to amortise the ONNX calls
#: (one per task and batch), small enough that the first results of a backlog go out early.
_ANALYSIS_CHUNK = 16


class DaemonError(RuntimeError):
    """The daemon cannot start (a port in use, a locked store, no proxy, ...)."""


class Daemon:
    """The streaming analysis service built from a :class:`DaemonConfig`.

    ``start()`` returns once the input is subscribed and HTTP answers; ``stop()`` finishes
    what was received. Public read-only views: :attr:`counters`, :attr:`registry`,
    :meth:`health`, :attr:`http_url`.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.registry: ModelRegistry | None = None
        self.pipeline: Any = None
        self.store: Any = None
        self.publisher: ZmqDocumentPublisher | None = None
        self.source: ZmqDocumentSource | None = None
        self.assembler: RunAssembler | None = None
        self.http: Any = None
        self.ioc: Any = None  # XasIoc when epics.enabled
        self.submitter: Any = None  # QueueServerSubmitter when queueserver.enabled
        self.app: Any = None
        self._fanout: StoreWriter | None = None
        self._thread: threading.Thread | None = None
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._ready = False
        self._started_at: float | None = None
        self._stats_lock = threading.Lock()
        self._decode_seen: dict[str, int] = {}
        self._probe_uids: OrderedDict[str, str] = OrderedDict()
        self._probe_tokens: OrderedDict[str, int] = OrderedDict()
        self._probes_seen = 0
        self._internal_errors = 0
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._acknowledged = 0  # result rows whose store transaction committed
        self._interrupted: dict[str, dict[str, Any]] = {}  # raw uid -> run left open before
        self._interrupted_closed: list[dict[str, Any]] = []
        self._recovered_at = 0.0

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
            cfg.input.address,
            cfg.output.address if cfg.output.enabled else "off",
            self.http_url or "off",
            [f"{m['element']}-{m['edge']}:{m['bundle_id']}" for m in self.models()] or "none",
        )

    def _start_parts(self, cfg: DaemonConfig, timeout: float) -> None:
        from xasflow.daemon.pipeline import Pipeline

        self.registry = ModelRegistry(cfg.models.directory, self.counters)
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
            )
            self._fanout = StoreWriter(self.store, on_stored=self._acknowledge)
            self._find_interrupted()
        if cfg.output.enabled:
            self.publisher = ZmqDocumentPublisher(
                cfg.output.address, prefix=cfg.output.prefix.encode("ascii"), fmt=cfg.output.format
            )
        self.assembler = RunAssembler(
            cfg.channels.to_channel_map(), run_timeout=cfg.analysis.run_timeout_s
        )
        self.source = ZmqDocumentSource(self._input_config(cfg))
        try:
            self.source.start(timeout=min(timeout, 10.0))
        except (TimeoutError, RuntimeError) as exc:
            raise DaemonError(str(exc)) from None
        if not self.source.ready.wait(timeout):
            raise DaemonError(f"0MQ input not subscribed to {cfg.input.address}")
        self._thread = threading.Thread(target=self._process, name="xasflow-process", daemon=True)
        self._thread.start()
        if cfg.http.enabled:
            from xasflow.daemon.http import HttpServer, create_app

            self.app = create_app(self, cfg.http)
            dashboard = self.app.state.dashboard
            if dashboard is not None:  # state published to it, never read from this thread
                self.add_listener(dashboard.listener)
                self.pipeline.on_latest = dashboard.offer_latest
            self.http = HttpServer(self.app, cfg.http.host, cfg.http.port)
            try:
                self.http.start(timeout)
            except OSError as exc:
                raise DaemonError(str(exc)) from None

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

    @staticmethod
    def _input_config(cfg: DaemonConfig) -> ZmqInputConfig:
        """The 0MQ input settings; ignores the daemon's own output prefix when it would see it."""
        zcfg = cfg.input.to_zmq()
        own = cfg.output.prefix.encode("ascii") if cfg.output.enabled else b""
        if own and own != zcfg.prefix and not zcfg.prefix:
            zcfg = dataclasses.replace(zcfg, ignore_prefixes=(*zcfg.ignore_prefixes, own))
        return zcfg

    def _acknowledge(self) -> None:
        with self._stats_lock:  # called from the store's writer thread
            self._acknowledged += 1

    def _find_interrupted(self) -> None:
        """Analysis runs a previous process left open (killed mid-run): closed later, see
        :meth:`_close_interrupted`."""
        assert self.store is not None
        for info in self.store.unfinished_runs():
            self._interrupted[info["raw_uid"]] = info
            logger.warning(
                "analysis run of raw run %s was left open by a previous process (%d results "
                "stored); it will be closed as interrupted",
                info["raw_uid"],
                info["rows"],
            )
        self._recovered_at = time.monotonic()

    def _close_interrupted(
        self, raw_uid: str, raw_stop: dict[str, Any] | None = None, why: str = ""
    ) -> None:
        """Close a run left open by a previous process: publish and store its stop.

        With the raw run's stop, ``raw_missing_events`` is its event count minus the spectra
        stored; without it the count is unknown (None).
        """
        info = self._interrupted.pop(raw_uid, None)
        if info is None:
            return
        start = info["start"]
        raw_total = None
        raw_status = "timeout" if raw_stop is None else str(raw_stop.get("exit_status", "fail"))
        if raw_stop is not None:
            num = raw_stop.get("num_events")
            value = num.get(self.config.channels.stream) if isinstance(num, dict) else None
            raw_total = value if isinstance(value, int) and not isinstance(value, bool) else None
        missing = None if raw_total is None else max(raw_total - info["spectra"], 0)
        seen = "unknown" if raw_total is None else str(raw_total)
        reason = (
            f"interrupted: the daemon restarted during this run; {info['spectra']} of {seen} "
            f"raw spectra have stored results"
            + ("" if missing is None else f", {missing} were not analysed")
            + (f" ({why})" if why else "")
        )
        stop = {
            "uid": str(uuid.uuid4()),
            "time": time.time(),
            "run_start": start.get("uid", ""),
            "exit_status": "fail",
            "reason": reason,
            "num_events": {info["descriptor"].get("name") or ANALYSIS_STREAM: info["rows"]},
            "raw_exit_status": raw_status,
            "bundle_ids": [start["bundle_id"]] if start.get("bundle_id") else [],
            "n_analysed": info["n_ok"],
            "n_rejected": info["n_rejected"],
            "raw_seq_gaps": None if missing is None else int(missing > 0),
            "raw_missing_events": missing,
            "interrupted": True,
        }
        logger.warning("raw run %s: %s", raw_uid, reason)
        self.counters.run_closed("interrupted")
        if self.store is not None:
            try:
                self.store.finish_run(raw_uid, stop)
            except Exception:
                logger.exception("cannot record the stop of interrupted run %s", raw_uid)
        if start.get("uid"):
            self._emit("stop", stop, store=False)
        with self._stats_lock:
            self._interrupted_closed.append(
                {
                    "raw_uid": raw_uid,
                    "stored": info["spectra"],
                    "raw_spectra": raw_total,
                    "missing": missing,
                    "raw_exit_status": raw_status,
                }
            )
            del self._interrupted_closed[:-_PROBE_MEMORY]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop receiving, finish everything held, flush the store; idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._ready = False
            if self.source is not None:
                self.source.close()  # joins the receive thread: nothing new is queued now
            self._draining.set()
            if self._thread is not None:
                self._thread.join(timeout)
                if self._thread.is_alive():
                    logger.error("processing thread did not finish within %.0f s", timeout)
            self._teardown(timeout)
            self._stopped.set()
            logger.info("xasflow daemon stopped: %s", self._summary())

    def _teardown(self, timeout: float = 30.0) -> None:
        """Close what was started (store last but one, HTTP last); safe on partial starts."""
        self._draining.set()
        if self.source is not None and not self.source.closed:
            self.source.close()
        if self.registry is not None:
            self.registry.stop()
        if self.store is not None:
            try:
                if not self.store.flush(timeout):
                    logger.error("analysis store did not flush within %.0f s", timeout)
                self.store.close()
            except Exception:
                logger.exception("closing the analysis store failed")
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
        """Start, then run until SIGTERM or SIGINT (main thread only), then stop cleanly."""
        requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %s: stopping", signal.Signals(signum).name)
            requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not requested.wait(0.5):
                if self._thread is not None and not self._thread.is_alive():
                    logger.error("processing thread ended unexpectedly; stopping")
                    break
        finally:
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

    # ------------------------------------------------------------------ processing thread

    def _process(self) -> None:
        assert self.source is not None and self.assembler is not None
        source, assembler = self.source, self.assembler
        batch_max = self.config.analysis.batch_max
        check_every = self.config.analysis.timeout_check_s
        next_check = time.monotonic() + check_every
        next_stats = 0.0
        while True:
            item = source.get(timeout=0.05)
            items: list[tuple[str, dict[str, Any]]] = []
            if item is not None:
                items.append(item)
                while len(items) < batch_max:
                    more = source.get(timeout=0)
                    if more is None:
                        break
                    items.append(more)
            elif self._draining.is_set():
                break  # the receive thread is joined and the queue is empty
            now = time.monotonic()
            try:
                outputs: list[Any] = []
                spectra = 0
                for name, doc in items:
                    if self._is_probe(name, doc):
                        continue
                    if self._interrupted and name == "stop" and isinstance(doc, dict):
                        run_start = doc.get("run_start")
                        if run_start in self._interrupted:
                            self._close_interrupted(run_start, raw_stop=doc)
                            continue
                    fed = assembler.feed(name, doc)
                    outputs.extend(fed)
                    spectra += sum(isinstance(o, SpectrumReady) for o in fed)
                    if spectra >= _ANALYSIS_CHUNK:  # a backlog: publish as we go, not at the end
                        self._analyse(outputs)
                        outputs, spectra = [], 0
                if now >= next_check:
                    next_check = now + check_every
                    outputs.extend(assembler.check_timeouts())
                    if (
                        self._interrupted
                        and now - self._recovered_at > self.config.analysis.run_timeout_s
                    ):
                        for raw_uid in list(self._interrupted):
                            self._close_interrupted(raw_uid, why="no stop within run_timeout_s")
                if outputs:
                    self._analyse(outputs)
                if now >= next_stats:
                    next_stats = now + _STATS_INTERVAL_S
                    self.sync_stats()
            except Exception:  # nothing here should raise; if it does, keep serving
                self._internal_errors += 1
                logger.exception("processing a batch of %d documents failed", len(items))
        for raw_uid in list(self._interrupted):
            self._close_interrupted(raw_uid, why="shutdown")
        self._analyse(assembler.flush_all("shutdown"))
        try:  # runs the pipeline still holds (none, unless an output went missing)
            for name, doc in self.pipeline.close_all("shutdown"):
                self._emit(name, doc)
        except Exception:
            logger.exception("closing the pipeline's runs failed")
        self.sync_stats()

    def _analyse(self, outputs: list[Any]) -> None:
        """Pipeline over one batch of assembler outputs, then fan the documents out."""
        if not outputs:
            return
        outputs = self._apply_element_defaults(outputs)
        try:
            docs = self.pipeline.handle_batch(outputs)
        except Exception:  # a pipeline bug must not end the daemon: count and go on
            logger.exception("pipeline failed on a batch of %d outputs", len(outputs))
            n = sum(isinstance(o, SpectrumReady) for o in outputs)
            self._internal_errors += 1
            if n:
                self.counters.reject("internal_error", stage="analysis", n=n)
            return
        for name, doc in docs:
            self._emit(name, doc)

    def _emit(self, name: str, doc: dict[str, Any], store: bool = True) -> None:
        if self.publisher is not None:
            try:
                self.publisher(name, doc)
            except Exception:
                logger.exception("cannot publish %s document", name)
        if store and self._fanout is not None:
            self._fanout(name, doc)
        for callback in self._listeners:
            try:
                callback(name, doc)
            except Exception:
                logger.exception("analysis listener failed")

    def _apply_element_defaults(self, outputs: list[Any]) -> list[Any]:
        """Fill (``prefer: start``) or force (``prefer: config``) element/edge from the config."""
        a = self.config.analysis
        if a.element is None and a.edge is None:
            return outputs
        out = []
        for o in outputs:
            if isinstance(o, SpectrumReady):
                s = o.spectrum
                if a.prefer == "config":
                    o = SpectrumReady(dataclasses.replace(s, element=a.element, edge=a.edge))
                elif s.element is None and a.element is not None:
                    edge = s.edge or a.edge
                    o = SpectrumReady(dataclasses.replace(s, element=a.element, edge=edge))
                elif s.element is not None and s.edge is None and a.edge is not None:
                    o = SpectrumReady(dataclasses.replace(s, edge=a.edge))
            out.append(o)
        return out

    def _is_probe(self, name: str, doc: dict[str, Any]) -> bool:
        """Warm-up probe runs: remembered for health, never analysed."""
        if name == "start" and isinstance(doc, dict) and PROBE_KEY in doc:
            uid = str(doc.get("uid", ""))
            token = str(doc.get(PROBE_KEY))
            with self._stats_lock:
                self._probes_seen += 1
                self._probe_uids[uid] = token
                self._probe_tokens[token] = self._probe_tokens.get(token, 0) + 1
                self._probe_tokens.move_to_end(token)
                while len(self._probe_uids) > _PROBE_MEMORY:
                    self._probe_uids.popitem(last=False)
                while len(self._probe_tokens) > _PROBE_MEMORY:
                    self._probe_tokens.popitem(last=False)
            return True
        if name == "stop" and isinstance(doc, dict):
            return self._probe_uids.pop(str(doc.get("run_start", "")), None) is not None
        return False

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
        return self.source.stats()["ignored"] if self.source is not None else 0

    def models(self) -> list[dict[str, Any]]:
        """Bundles in service (see ``ModelRegistry.models``)."""
        return self.registry.models() if self.registry is not None else []

    def input_stats(self) -> dict[str, int]:
        """The 0MQ input's counters and queue depth."""
        return self.source.stats() if self.source is not None else {}

    def output_stats(self) -> dict[str, int]:
        """The publisher's counters."""
        return self.publisher.stats() if self.publisher is not None else {}

    def store_stats(self) -> dict[str, int]:
        """The analysis store's counters (empty when storage is off)."""
        if self.store is None:
            return {}
        stats = self.store.stats()
        if self._fanout is not None:
            stats["unstored"] = self._fanout.unstored
        with self._stats_lock:
            stats["acknowledged"] = self._acknowledged
        return stats

    def _feedback_health(self) -> dict[str, Any]:
        """The IOC's and the queueserver submitter's state (None where disabled)."""
        ioc, sub = self.ioc, self.submitter
        return {
            "recommend": self.config.recommend.enabled,
            "epics": None
            if ioc is None
            else {
                "prefix": ioc.prefix,
                "port": ioc.tcp_port,
                "running": ioc.running,
                "published": ioc.published,
            },
            "queueserver": None
            if sub is None
            else {"stats": dict(sub.stats), "last_error": sub.last_error},
        }

    def sync_stats(self) -> None:
        """Fold the input's decode errors into the counters and refresh the gauges."""
        src = self.input_stats()
        with self._stats_lock:
            for key, value in src.items():
                if key.startswith("decode_errors."):
                    reason = key.split(".", 1)[1]
                    delta = value - self._decode_seen.get(reason, 0)
                    if delta > 0:
                        self._decode_seen[reason] = value
                        self.counters.decode_error(reason, delta)
        self.counters.set_gauge("queue_depth", src.get("queue_depth", 0))
        self.counters.set_gauge("open_runs", self.open_runs)
        store = self.store_stats()
        if store:
            self.counters.set_gauge("store_queued", store.get("queued", 0))

    def health(self) -> dict[str, Any]:
        """Readiness, uptime, counters, models and adapter state, JSON-ready."""
        self.sync_stats()
        src = self.input_stats()
        with self._stats_lock:
            probes = {"seen": self._probes_seen, "tokens": list(self._probe_tokens)}
            interrupted = list(self._interrupted_closed)
        registry = self.registry
        return {
            "ready": self.ready,
            "version": __version__,
            "uptime_s": round(self.uptime, 3),
            "queue_depth": src.get("queue_depth", 0),
            "open_runs": self.open_runs,
            "counters": self.counters.snapshot(),
            "models": self.models(),
            "models_refused": registry.refused() if registry is not None else {},
            "input": {
                "address": self.config.input.address,
                "prefix": self.config.input.prefix,
                "last_decode_error": self.source.last_error if self.source else None,
                "own_output_dropped": self.echo_dropped,
                **src,
            },
            "output": {
                "address": self.config.output.address if self.publisher else None,
                "prefix": self.config.output.prefix,
                **self.output_stats(),
            },
            "store": {
                "directory": str(self.config.storage.directory) if self.store else None,
                **self.store_stats(),
            },
            "probes": probes,
            "interrupted": {"open": sorted(self._interrupted), "closed": interrupted},
            "feedback": self._feedback_health(),
            "internal_errors": self._internal_errors,
        }

    def _summary(self) -> str:
        c = self.counters.snapshot()
        return (
            f"{c['spectra_received']} spectra received, {c['spectra_analysed']} analysed, "
            f"{c['spectra_rejected']} rejected {c['rejected']}, decode errors {c['decode_errors']}"
        )
