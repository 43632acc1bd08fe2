"""What a daemon is built of: :class:`Parts`, the groups of them made together from the config
(the registry with its pipeline, the store with its writer and recovery, the commit gate, the
control-system feedback, the processing loop with its sinks), and the order they close.

The composition root (:mod:`xasflow.daemon.service`) decides what to build and wires it;
:class:`~xasflow.daemon.status.DaemonStatus` reads the parts for ``/health``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xasflow.adapters.probes import ProbeFilter
from xasflow.adapters.recovery import InterruptedRuns
from xasflow.adapters.store_writer import StoreWriter
from xasflow.daemon.analysis_rows import DATA_KEYS
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.documents import ANALYSIS_STREAM

if TYPE_CHECKING:
    from xasflow.adapters.commit_gate import CommitGate
    from xasflow.daemon.assembly import RunAssembler
    from xasflow.daemon.outlet import Sink
    from xasflow.daemon.pipeline import Pipeline
    from xasflow.daemon.processor import Processor
    from xasflow.daemon.registry import ModelRegistry

__all__ = [
    "CountedSink",
    "DaemonError",
    "Parts",
    "build_analysis",
    "build_feedback",
    "build_gate",
    "build_processor",
    "build_store",
    "http_bind_error",
    "models_directory_problem",
    "store_path_error",
]

logger = logging.getLogger(__name__)


class DaemonError(RuntimeError):
    """The daemon cannot start (a port in use, a locked store, no proxy, ...)."""


class CountedSink:
    """The publisher as the processing loop's sink when no commit gate stands before it
    (``output.after_store`` off, or no store): a document it refuses (raises) is logged and
    counted in ``errors`` (``xasflow_output_dropped_total{cause="publish_error"}``, as the
    gate's are); the loop used to log it only, so XasflowOutputDropped never saw it."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.errors = 0  # written by the processing thread only

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self.sink(name, doc)
        except Exception:
            self.errors += 1
            logger.exception("cannot publish %s document", name)


@dataclass
class Parts:
    """The daemon's parts (None: off, or not built yet). ``Any`` where there are several
    classes (0MQ or Kafka) or the class lives in an optional extra."""

    registry: ModelRegistry | None = None
    pipeline: Pipeline | None = None
    store: Any = None  # AnalysisStore, when storage is on
    writer: StoreWriter | None = None  # with the store
    gate: CommitGate | None = None  # with output.after_store
    publish_sink: CountedSink | None = None  # the publisher as the loop's sink, with no gate
    publisher: Any = None  # ZmqDocumentPublisher or KafkaDocumentPublisher
    source: Any = None  # ZmqDocumentSource or KafkaDocumentSource
    assembler: RunAssembler | None = None
    processor: Processor | None = None
    ioc: Any = None  # XasIoc, when epics.enabled
    submitter: Any = None  # QueueServerSubmitter, when queueserver.enabled
    app: Any = None  # the Starlette app, when http.enabled
    http: Any = None  # its HttpServer
    probes: ProbeFilter = field(default_factory=ProbeFilter)
    interrupted: InterruptedRuns | None = None

    def close(self, timeout: float = 30.0) -> None:
        """Close what was started, safe on a partial start: input first, then the store (it
        flushes), then what publishes what the store holds, the feedback, and HTTP last."""
        if self.processor is not None:
            self.processor.drain.set()
        if self.source is not None and not self.source.closed:
            self.source.close()
        if self.registry is not None:
            self.registry.stop()
        if self.pipeline is not None and self.pipeline.worker is not None:
            self.pipeline.worker.close()  # the processing thread has ended its batches
        finish = getattr(self.source, "finish", None)
        if finish is not None:  # Kafka: commit what is processed and durable, leave the group
            finish(timeout)
        if self.store is not None:
            try:
                if not self.store.flush(timeout):  # timed out, or gave results up
                    logger.error(
                        "analysis store: not everything was written within %.0f s "
                        "(results given up for good: %d)",
                        timeout,
                        self.store.write_lost,
                    )
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


def build_analysis(cfg: DaemonConfig, counters: Counters) -> tuple[ModelRegistry, Pipeline]:
    """The model registry (its bundles verified and loaded, watched when configured) and the
    pipeline that analyses with them; an empty models directory is logged, not refused."""
    from xasflow.daemon.pipeline import Pipeline
    from xasflow.daemon.registry import ModelRegistry

    models, rec = cfg.models, cfg.recommend
    registry = ModelRegistry(
        models.directory,
        counters,
        require_digest=models.require_digest,
        trusted_keys=models.trusted_keys,
        require_signature=models.require_signature,
        min_edge_snr=cfg.analysis.min_edge_snr,
        max_graph_bytes=models.max_graph_mb << 20,
    )
    if not registry.models():
        problem = models_directory_problem(models.directory)
        logger.warning(
            "%s: every spectrum will be rejected no_model",
            problem or f"no model bundle served from {models.directory}",
        )
    if models.watch:
        registry.start_watching(models.watch_interval_s)
    worker = None
    if cfg.analysis.prep_process:
        from xasflow.daemon.prep_worker import PrepWorker

        worker = PrepWorker()
        worker.start()  # it reports ready in ~1 s; until then the thread prepares
    pipeline = Pipeline(
        registry,
        counters,
        align=cfg.analysis.align,
        recommend=rec.recommender if rec.enabled else None,
        recommend_interval_s=rec.interval_s,
        herfd=cfg.analysis.herfd,
        worker=worker,
        calculated=cfg.analysis.calculated,
    )
    return registry, pipeline


def build_gate(
    cfg: DaemonConfig, publisher: Any, store: Any, writer: StoreWriter | None
) -> CommitGate | None:
    """With ``output.after_store``, a publisher and a store: the gate that publishes a result
    once the store holds it (the writer tells it); else None."""
    if not (publisher and cfg.output.after_store and writer is not None and store is not None):
        return None
    from xasflow.adapters.commit_gate import CommitGate

    gate = CommitGate(
        publisher,
        cfg.output.after_store_timeout_s,
        commit_now=lambda: store.flush(0.0),  # asks the store to commit, never waits
    )
    writer.gate = gate
    return gate


def build_store(
    cfg: DaemonConfig, on_stored: Callable[[], None]
) -> tuple[Any, StoreWriter, InterruptedRuns]:
    """The analysis store, its document writer (``on_stored``: a row is durable, called from
    the store's writer thread) and the runs a crash left open, found already."""
    from xasflow.adapters.tiled_store import AnalysisStore

    s = cfg.storage
    try:
        store = AnalysisStore(
            s.directory,
            batch_size=s.batch_size,
            flush_interval=s.flush_interval_s,
            max_queue=s.max_queue,
            table_backend=s.backend,
            journal=s.journal,
            catalog_process=s.catalog_process,
            full_wait_s=cfg.store_full_wait(),
        )
    except OSError as exc:
        error = store_path_error(s.directory, exc)
        if error is None:
            raise
        raise error from None
    try:
        writer = StoreWriter(store, on_stored=on_stored)
        interrupted = InterruptedRuns(store, cfg.channels.stream, cfg.analysis.run_timeout_s)
        interrupted.find()
    except BaseException:
        try:  # nobody else holds it yet: its lock and catalog child go with it
            store.close()
        except Exception:  # the first error is the one to report
            logger.exception("closing the analysis store after a failed start failed")
        raise
    return store, writer, interrupted


def models_directory_problem(directory: Path) -> str | None:
    """Why ``models.directory`` can serve no bundle, naming the setting, or None: missing, a
    bundle itself (its parent is the directory of bundles), or holding no ``*/manifest.json``."""
    if not directory.is_dir():
        return f"models.directory {directory} does not exist"
    if (directory / "manifest.json").is_file():
        return (
            f"models.directory {directory} is a bundle, not the directory of bundles: "
            f"give the directory holding it, {directory.parent}"
        )
    if not any(directory.glob("*/manifest.json")):
        return f"models.directory {directory} holds no bundle (no */manifest.json)"
    return None


def http_bind_error(exc: OSError) -> DaemonError:
    """The HTTP server's refused bind (:meth:`HttpServer.bind`'s OSError, whose text names the
    address) as the operator's error naming the setting to change, not ``[Errno 98] ...``."""
    hint = {
        errno.EADDRINUSE: "another process listens there: stop it, or set another http.port",
        errno.EADDRNOTAVAIL: "http.host is not an address of this machine",
        errno.EACCES: "a port below 1024 needs privileges: set http.port to 1024 or above",
    }.get(exc.errno or 0, "check http.host and http.port")
    return DaemonError(f"{exc.strerror or exc} ({hint})")


def store_path_error(directory: Path, exc: OSError) -> DaemonError | None:
    """``exc`` from opening the store as the operator's error, naming ``storage.directory``,
    when it is about that path (a file in its way, a directory this user cannot write), not
    ``[Errno 17] File exists``; None for any other OSError (e.g. the catalog child's)."""
    directory = Path(directory).absolute()
    failed = Path(exc.filename).absolute() if isinstance(exc.filename, str | Path) else None
    if failed is None or not (
        failed == directory or directory in failed.parents or failed in directory.parents
    ):
        return None
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        file = next(p for p in (directory, *directory.parents) if os.path.lexists(p))
        reason = f"{file} is in the way: a file (or a link), not a directory"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"this user (uid {os.getuid()}) cannot write {failed} ({exc.strerror})"
    else:
        reason = f"{exc.strerror or exc} ({failed})"
    return DaemonError(
        f"storage.directory {directory}: cannot keep the analysis store there: {reason}"
    )


def build_feedback(cfg: DaemonConfig, registry: ModelRegistry) -> tuple[Any, Any]:
    """The EPICS IOC (started; its MODEL_OK follows whether ``registry`` serves a bundle) and
    the queueserver submitter, each None when disabled; both follow the analysis documents
    as listeners."""
    ioc = submitter = None
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
    try:
        if ioc is not None:
            registry.on_serving(ioc.set_model_ok)
        if cfg.queueserver.enabled:
            from xasflow.adapters.queueserver import QueueServerSubmitter
            from xasflow.adapters.queueserver_memory import SUBMITTED_FILE

            # the queued plans remembered across restarts, beside the store (one daemon a store)
            memory = cfg.storage.directory / SUBMITTED_FILE if cfg.storage.enabled else None
            submitter = QueueServerSubmitter(cfg.queueserver, memory=memory)
    except BaseException:
        if ioc is not None:  # started above, and nobody else holds it yet
            ioc.stop()
        raise
    return ioc, submitter


def build_processor(
    p: Parts,
    cfg: DaemonConfig,
    counters: Counters,
    listeners: list[Sink],
    on_tick: Callable[[], None],
) -> Processor:
    """The processing loop over the built parts, its sinks in order: the store writer, the
    publisher (behind the commit gate when there is one), then ``listeners``; ``on_tick``
    (the stats, a few times a second) also ticks a publisher that has a ``tick``."""
    from xasflow.daemon.processor import Processor

    assert p.source is not None and p.assembler is not None and p.pipeline is not None
    publisher_tick = getattr(p.publisher, "tick", None)  # Kafka: its log served with no traffic
    if publisher_tick is not None:
        stats_tick = on_tick

        def on_tick() -> None:
            stats_tick()
            publisher_tick()

    proc = Processor(
        p.source.get,
        p.assembler,
        p.pipeline,
        counters,
        cfg.analysis,
        probes=p.probes,
        interrupted=p.interrupted,
        on_tick=on_tick,
    )
    proc.outlet.store_sink = p.writer
    # 0MQ's overflow policy may drop events: each is lost once (not again as a seq_gap)
    proc.input_dropped = getattr(p.source, "dropped_events", None)
    proc.input_unseen = getattr(p.source, "unseen_drops", None)  # nor as interrupted
    at_raw_start: list[Callable[[str], None]] = []
    store = p.store
    if store is not None:  # the analysis table made at the raw start, not the first result
        table = {"name": ANALYSIS_STREAM, "data_keys": DATA_KEYS}
        at_raw_start.append(lambda uid: store.prepare_run(uid, table))
    if p.ioc is not None:  # the last run's advice (STOP_EARLY) goes before this one scans
        at_raw_start.append(p.ioc.raw_run_started)  # (a refused start never gets here)
        p.ioc.group.loop_age_source = proc.turn_age  # LOOP_AGE
    if at_raw_start:

        def raw_start(doc: dict[str, Any]) -> None:
            uid = doc.get("uid")
            if not isinstance(uid, str):
                return  # a start without one is rejected later
            for hook in at_raw_start:
                try:
                    hook(uid)
                except Exception:  # each one's own trouble: the others still run
                    logger.exception("a raw-start hook failed for run %r", uid)

        proc.on_raw_start = raw_start
    if cfg.input.kind == "kafka":  # the commit rule's hooks
        proc.on_processed = p.source.mark_processed
        proc.abandoned = p.source.abandoned
        proc.runs_ended = p.source.runs_ended
        proc.replays_open_runs = True
    if p.gate is not None:
        proc.outlet.sinks.append(p.gate)  # publishes once the store holds the rows
    elif p.publisher is not None:  # its refusals counted, as the gate's are
        p.publish_sink = CountedSink(p.publisher)
        proc.outlet.sinks.append(p.publish_sink)
    proc.outlet.sinks.extend(listeners)
    return proc
