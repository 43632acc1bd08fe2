"""The processing thread's way out: batches of assembler outputs begun on the pipeline and
ended in order, each analysis document to the store writer and then to every sink, in order.

:class:`Outlet` belongs to the :class:`~xasflow.daemon.processor.Processor` and is used by its
thread only. The config's element/edge fill or override those of the spectra
(``analysis.prefer``) before the pipeline sees them. A batch the pipeline raises on (a bug) is
salvaged: its spectra refused, its runs stopped "fail", never left open.

With a preparation process (``analysis.prep_process``, :mod:`xasflow.daemon.prep_worker`) a
batch is begun (its stacks sent there) and ended one turn later, or as soon as the child has
answered: the thread assembles the next batch meanwhile. Batches end in order, and all of
them before a stop the thread emits itself, before ``on_processed`` and at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.outputs import Output, SpectrumReady
from xasflow.daemon.pipeline import Batch, Pipeline

__all__ = ["Outlet", "Sink", "safely"]

logger = logging.getLogger("xasflow.daemon.processor")  # the processor's, as before the move

#: A consumer of analysis documents: ``sink(name, doc)``; quick, and it must not raise.
Sink = Callable[[str, dict[str, Any]], None]

_T = TypeVar("_T")


def safely(counters: Counters, what: str, default: _T, call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)``, or ``default`` if it raises (a bug: counted ``processing`` and
    logged), so one step's failure costs only what it would have given, not the turn."""
    try:
        return call(*args)
    except Exception:
        counters.internal_error("processing")
        logger.exception("%s failed", what)
        return default


class Outlet:
    """Begun batches, at most :attr:`depth` in flight, and the sinks (see the module)."""

    #: The store writer, when storage is on (documents it already holds skip it).
    store_sink: Sink | None = None

    def __init__(self, pipeline: Pipeline, counters: Counters, analysis: AnalysisConfig) -> None:
        self.pipeline = pipeline
        self.counters = counters
        self.analysis = analysis
        #: The publisher, the listeners: each analysis document, in order, after the store.
        self.sinks: list[Sink] = []
        #: Batches begun and not yet ended: at most one in flight with a preparation process.
        self.pending: deque[Batch] = deque()
        self.depth = 1 if pipeline.worker is not None else 0

    def analyse(self, outputs: list[Output]) -> None:
        """Pipeline over one batch of assembler outputs, then every sink in order (with a
        preparation process: the batch is begun, and the one before it ended). Never raises:
        a batch that fails is salvaged (:meth:`_failed`)."""
        if not outputs:
            return
        try:
            outputs = self._element_defaults(outputs)
            self.pending.append(self.pipeline.begin(outputs))
        except Exception as exc:  # a pipeline bug must not end the daemon: count and go on
            self.complete(0)  # the batches before it go out first, in order
            self._failed(outputs, exc)
        self.complete(self.depth)

    def complete(self, keep: int) -> None:
        """End begun batches, oldest first, until ``keep`` are left and the oldest is still
        being prepared; their documents to every sink in order. A bug asking whether a batch
        is prepared (counted) ends it now: ``end`` waits for its preparation."""
        worker = self.pipeline.worker
        while self.pending and (
            len(self.pending) > keep
            or safely(
                self.counters, "asking if a batch is prepared", True, self.pending[0].ready, worker
            )
        ):
            batch = self.pending.popleft()
            try:
                docs = self.pipeline.end(batch, advise=False)
            except Exception as exc:
                self._failed(batch.items, exc)
                continue
            for name, doc in docs:
                self.emit(name, doc)
            self.advise()  # computed once its results are out

    def advise(self) -> None:
        """The advice due now, computed and sent to every sink (after each batch's results,
        and by the processing loop at a pass that took nothing: a flip held for its
        interval, :mod:`xasflow.daemon.advice`)."""
        advice: list[tuple[str, dict[str, Any]]] = safely(
            self.counters, "advising", [], self.pipeline.advise
        )
        for name, doc in advice:
            self.emit(name, doc)

    def _failed(self, outputs: list[Output], exc: Exception) -> None:
        """A batch the pipeline raised on (a bug): counted, its spectra refused and counted
        received, its runs stopped "fail" (:meth:`Pipeline.salvage`), never left open."""
        logger.error("pipeline failed on a batch of %d outputs", len(outputs), exc_info=exc)
        self.counters.internal_error("processing")
        for name, doc in self.pipeline.salvage(outputs, f"{type(exc).__name__}: {exc}"):
            self.emit(name, doc)

    def emit(self, name: str, doc: dict[str, Any], store: bool = True) -> None:
        """One analysis document to the store writer (unless ``store`` is False) and sinks."""
        if store and self.store_sink is not None:
            self._call(self.store_sink, name, doc)
        for sink in self.sinks:
            self._call(sink, name, doc)

    @staticmethod
    def _call(sink: Sink, name: str, doc: dict[str, Any]) -> None:
        try:
            sink(name, doc)
        except Exception:
            logger.exception("analysis document consumer %r failed on a %s", sink, name)

    def _element_defaults(self, outputs: list[Output]) -> list[Output]:
        """Fill (``prefer: start``) or force (``prefer: config``) element/edge from the config."""
        a = self.analysis
        if a.element is None and a.edge is None:
            return outputs
        out: list[Output] = []
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
