"""The processing pipeline: assembly outputs in, analysis-run documents out.

``Pipeline.handle_batch(outputs)`` takes ``RunOpened`` / ``SpectrumReady`` / ``Rejected`` /
``RunClosed`` from :class:`xasflow.daemon.assembly.RunAssembler` and returns the documents to
publish, in order. It is synchronous, never raises for bad data, and is not thread-safe
(one caller thread; the registry it reads may be swapped by its watcher at any time).
``begin(outputs)`` / ``end(batch)`` split it for a caller with a preparation process
(:mod:`xasflow.daemon.prep_worker`): between the two, steps 4-5 of the batch's stacks run
there while the caller assembles the next batch; batches end in the order they began.

For each spectrum (``SpectrumReady``); steps 1-5 are :mod:`xasflow.daemon.batch_prep`'s:

1. element/edge from the spectrum (the raw start document), else the tabulated edge in
   range that mu jumps across (:func:`xasflow.spectra.infer_edge_from_data`; from the energy
   range alone, :func:`~xasflow.spectra.infer_edge`, where the channels give no mu) (flag
   ``element_inferred``); nothing
   tabulated in range is ``unknown_element``. An edge missing next to a known element is
   taken from the inference when it names that element, else "K".
2. the registry's predictor for it, captured once, so a swap never splits a spectrum
   between two bundles; none is ``no_model``.
3. mu from the channels of ``ScanSpectrum.mode``: transmission ln(I0/It), fluorescence
   If/I0 (``bad_channel``, ``not_finite`` from :func:`mu_from_channels`).
4. with ``align``, the energy axis is shifted so the reference foil's E0 (ln(It/Ir)) lands
   on the tabulated edge. Alignment is best effort: no Ir channel flags ``no_reference``, a
   reference without a clear edge flags ``align_failed``, a shift beyond ``max_shift`` eV
   flags ``align_out_of_range``; the spectrum is then analysed unaligned.
5. the bundle's preprocessing (``Predictor.prepare``: ``no_edge``, ``no_post_edge``,
   ``window``, ...) and the ONNX graphs, batched per predictor over the whole call; a run's
   first out-of-domain spectrum is checked once for undeclared HERFD (flag
   ``herfd_suspected``, :mod:`xasflow.daemon.herfd_hint`).
6. with ``recommend`` (a :class:`~xasflow.daemon.recommend.RecommenderConfig`), an analysed
   spectrum's event is followed by an event of the run's ``recommendations`` stream (at most
   one per run per ``recommend_interval_s``, except when the stop-early decision turns or
   the answer goes into or out of the bundle's domain, which goes out at once, at most once
   per interval, unless a newer advice of the run in the same batch supersedes it; a flip
   held back goes out after the interval or with the stop: the run's last advice is always
   as out of domain as its latest answer; :mod:`xasflow.daemon.advice`): what to
   measure next, stop early, rescan
   (:mod:`xasflow.daemon.recommend`). A rejected spectrum restarts the run's "in a row",
   whether the pipeline or the assembler refused it (a duplicate event refuses none).
   Which spectra get advice is decided in order; the advice is computed after the batch's
   events (:mod:`xasflow.daemon.advice`), or, with ``end(advise=False)``, when
   :meth:`Pipeline.advise` is called, once the caller has published the results.

Every failure is a rejection with its reason: counted in ``Counters`` (stage "analysis")
and recorded as an event of the run's analysis run (the runs open here and their
documents: :mod:`xasflow.daemon.pipeline_runs`). Assembly rejections are counted (stage
"assembly") and, when they belong to a run being analysed, recorded in it too. A bug on a
run's start or stop is counted (``Counters.internal_error``, ``run_start``/``run_stop``): its
spectra open the run without the start's metadata; a run whose closing failed stops "fail".
A bug while a batch is begun or ended (counted ``processing``) costs only the spectrum it hit
(refused ``internal_error``; a batched step that raises is retried one spectrum at a time) or,
on a run's start, that run's spectra until its stop; the rest of the batch, other runs'
spectra included, is analysed as usual. A batch that raises all the same is salvaged
(:meth:`Pipeline.salvage`): its spectra refused, its runs stopped "fail".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xasflow.adapters.routing import paged
from xasflow.daemon.advice import RunAdvice
from xasflow.daemon.assembly import (
    Output,
    Rejected,
    RunClosed,
    RunOpened,
    ScanSpectrum,
    SpectrumReady,
)
from xasflow.daemon.batch_prep import (
    Pending,
    Work,
    predict_works,
    prepare_works,
    refused_work,
    start_work,
)
from xasflow.daemon.counters import Counters
from xasflow.daemon.documents import AnalysisRun, Doc
from xasflow.daemon.herfd_hint import HerfdHints
from xasflow.daemon.latest import LatestSpectrum, last_predicted
from xasflow.daemon.pipeline_runs import PipelineRuns
from xasflow.daemon.reasons import REASONS, known_rejections
from xasflow.daemon.recommend import RecommendationTracker, RecommenderConfig
from xasflow.daemon.registry import ModelRegistry
from xasflow.spectra.herfd import herfd_declared

if TYPE_CHECKING:
    from xasflow.daemon.prep_worker import PrepWorker

__all__ = ["REASONS", "Batch", "LatestSpectrum", "Pipeline", "known_rejections"]

logger = logging.getLogger(__name__)


def _declarations(start: dict[str, Any]) -> dict[str, Any]:
    """What a raw start declares about its spectra (``herfd``, ``calculated``); a key that
    declares nothing (absent, null, "") is left out, so the daemon's setting applies."""
    out = {}
    for key in ("herfd", "calculated"):
        declared = herfd_declared(start.get(key))  # true/false also as text; numbers as given
        if declared is not None:
            out[key] = declared
    return out


@dataclass
class Batch:
    """A batch :meth:`Pipeline.begin` started: its outputs, their works, their preparation."""

    items: list[Output]
    works: dict[int, Work]
    pending: Pending

    def ready(self, worker: PrepWorker | None) -> bool:
        """Whether :meth:`Pipeline.end` would not wait for the preparation process."""
        return self.pending.ready(worker)


class Pipeline(PipelineRuns):
    """Turns assembly outputs into analysis-run documents; counts every outcome (its open
    analysis runs and their documents: :class:`~xasflow.daemon.pipeline_runs.PipelineRuns`)."""

    def __init__(
        self,
        registry: ModelRegistry,
        counters: Counters | None = None,
        *,
        align: bool = True,
        max_shift: float = 20.0,
        align_search: float = 40.0,
        observe_latency: bool = True,
        validate: bool = False,
        clock: Callable[[], float] = time.time,
        recommend: RecommenderConfig | None = None,
        recommend_interval_s: float = 0.0,
        herfd: bool | float = False,
        worker: PrepWorker | None = None,
        calculated: bool | None = False,
    ) -> None:
        """``clock``: wall clock (epoch s) for document times and latencies.

        ``herfd``: spectra are HERFD (True: the element's tabulated width, a number: the
        FWHM in eV), broadened by ``prepare``. ``calculated``: spectra are calculations
        (True), measured (False: they need a pre-edge) or guessed per spectrum (None). A start
        document's own ``herfd`` or ``calculated`` key wins.

        ``recommend``: emit a ``recommendations`` stream in each analysis run (None: off).
        ``recommend_interval_s``: at most one recommendation per run in this many seconds
        (the first analysed spectrum of a run always gets one; the predictions in between
        still count towards stop-early). Advice at 500 spectra/s helps no one and costs
        about a millisecond each.

        ``observe_latency``: record each spectrum's raw-event-to-result latency in
        ``counters`` (turn off when the caller measures after publishing instead).
        ``validate``: check every composed document against the event-model schemas.
        ``worker``: the preparation process stacks of spectra go to (None: all here).
        """
        if max_shift < 0 or align_search <= 0:
            raise ValueError("max_shift must be >= 0 and align_search > 0")
        self.registry = registry
        self.counters = counters if counters is not None else registry.counters
        self.align = align
        self.max_shift = float(max_shift)
        self.align_search = float(align_search)
        self.observe_latency = observe_latency
        self.validate = validate
        self.clock = clock
        if recommend_interval_s < 0:
            raise ValueError("recommend_interval_s must be >= 0")
        #: the advice after analysed spectra (None: off); see :mod:`xasflow.daemon.advice`
        self.advice = (
            RunAdvice(recommend, recommend_interval_s, self.counters)
            if recommend is not None
            else None
        )
        self._runs: dict[str, AnalysisRun] = {}
        self.declared = {"herfd": herfd, "calculated": calculated}
        self._declared: dict[str, dict[str, Any]] = {}  # raw uid -> what its start declares
        self._hit: dict[str, str] = {}  # raw uid -> why a failed batch lost its spectra
        self.herfd_hints = HerfdHints()  # undeclared HERFD? checked once per run
        self.worker = worker
        #: The last spectrum analysed with a prediction (None before the first).
        self.latest: LatestSpectrum | None = None
        #: Called with each batch's ``latest`` (e.g. the dashboard's ``offer_latest``).
        self.on_latest: Callable[[LatestSpectrum], None] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def recommendations(self) -> RecommendationTracker | None:
        """The per-run prediction history stop-early reads (None: no advice)."""
        return self.advice.tracker if self.advice is not None else None

    @property
    def open_runs(self) -> list[str]:
        """Raw uids whose analysis run is open."""
        return list(self._runs)

    def run(self, raw_uid: str) -> AnalysisRun | None:
        """The open analysis run of a raw run, if any."""
        return self._runs.get(raw_uid)

    def handle(self, output: Output) -> list[Doc]:
        """Documents for one assembly output."""
        return self.handle_batch([output])

    def handle_batch(self, outputs: Iterable[Output]) -> list[Doc]:
        """Documents for many outputs, in order; predictions batched once per predictor."""
        return self.end(self.begin(outputs))

    def begin(self, outputs: Iterable[Output]) -> Batch:
        """Steps 1-5 started for a batch: with a preparation process its stacks are on their
        way there, so the caller may assemble the next batch meanwhile; :meth:`end` it
        (batches in the order begun). Never raises: a bug costs only the spectrum (refused
        ``internal_error``) or the run (its spectra refused until its stop) it hit."""
        items = list(outputs)
        works: dict[int, Work] = {}
        for i, out in enumerate(items):
            try:
                if isinstance(out, SpectrumReady):
                    works[i] = self._start(out.spectrum)
                elif isinstance(out, RunOpened):  # before its spectra are prepared
                    declared = _declarations(out.start)
                    if declared:
                        self._declared[out.raw_uid] = self.declared | declared
                elif isinstance(out, RunClosed):
                    # here, in the outputs' order, not in ``end``: with batches in flight a run
                    # closed in one batch and reopened under its uid in the next (begun before
                    # the first ended) would otherwise lose the new declaration for its later
                    # batches
                    self._declared.pop(out.raw_uid, None)
            except Exception as exc:  # a bug: only this spectrum, or this run, is lost
                logger.exception("beginning %r failed", out)
                self.counters.internal_error("processing")
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(out, SpectrumReady):
                    works[i] = refused_work(out.spectrum, error)
                elif isinstance(out, RunOpened):  # its spectra refused until its stop
                    self._declared[out.raw_uid] = {**self.declared, "error": error}
        pending = prepare_works(
            list(works.values()),
            align=self.align,
            max_shift=self.max_shift,
            align_search=self.align_search,
            worker=self.worker,
            on_bug=lambda: self.counters.internal_error("processing"),
        )
        return Batch(items, works, pending)

    def _start(self, scan: ScanSpectrum) -> Work:
        """Steps 1-3 of one spectrum with its run's declarations; a spectrum of a run whose
        start failed in :meth:`begin` is refused (analysed without its run's declaration,
        a HERFD or calculated spectrum's answer could be wrong)."""
        d = self._declared.get(scan.raw_uid, self.declared)
        if "error" in d:
            return refused_work(scan, f"its run's start failed: {d['error']}")
        return start_work(scan, self.registry, d["herfd"], d["calculated"])

    def end(self, batch: Batch, *, advise: bool = True) -> list[Doc]:
        """The documents of a batch :meth:`begin` started (waits for its preparation).

        A batch's analysis events come first, then the advice that follows them (a run's
        advice before its stop). ``advise=False``: the advice is left due, for
        :meth:`advise` (the processing loop publishes the results before computing it).
        A bug in the batch's preparation or prediction costs only the spectra it fails on
        alone (refused ``internal_error``, counted ``processing``)."""

        def bug() -> None:
            self.counters.internal_error("processing")

        batch.pending.finish(self.worker, on_bug=bug)
        items, works = batch.items, batch.works
        for w in works.values():
            if w.prepared is not None and w.prepared.spectrum.meta.get("broadened_fwhm"):
                w.flags.append("herfd_broadened")
            if w.prepared is not None and w.prepared.spectrum.meta.get("glitches_interpolated"):
                w.flags.append("glitch_interpolated")  # withholds stop-early
        predict_works(
            [w for w in works.values() if w.reason is None and w.prediction is None], on_bug=bug
        )
        try:  # a hint, and the dashboard's copy below, must never cost the batch its documents
            self.herfd_hints.apply(works.values())
        except Exception:
            logger.exception("the HERFD hint failed on a batch")
        try:
            self._offer_latest(works)
        except Exception:
            logger.exception("keeping the latest spectrum of a batch failed")
        docs = self._documents(items, works)
        return docs + self.advise() if advise else docs

    def salvage(self, outputs: list[Output], error: str) -> list[Doc]:
        """The documents of a batch whose processing raised all the same (a bug, counted by
        the caller): each of its spectra refused (``internal_error``, "its batch failed:
        <error>"), counted received, in its run; the runs it opens opened, its assembly
        rejections recorded, and the stop of each run it had spectra of, in this batch or a
        later one, "fail" with that reason (:meth:`_closed`). Never raises."""
        detail = f"its batch failed: {error}"
        try:
            works: dict[int, Work] = {}
            for i, out in enumerate(outputs):
                if isinstance(out, SpectrumReady):
                    works[i] = refused_work(out.spectrum, detail)
                    self._hit[out.spectrum.raw_uid] = detail
                elif isinstance(out, RunClosed):  # begin may have failed before its pop
                    self._declared.pop(out.raw_uid, None)
        except Exception:  # none recorded: counted as they are
            logger.exception("salvaging a failed batch of %d outputs failed", len(outputs))
            n = sum(isinstance(o, SpectrumReady) for o in outputs)
            self.counters.spectrum_received(n)
            self.counters.reject("internal_error", "analysis", n)
            return []
        return self._documents(outputs, works)

    def _documents(self, items: list[Output], works: dict[int, Work]) -> list[Doc]:
        """The documents of a batch's outputs, ``works`` their spectra's; never raises."""
        docs: list[Doc] = []
        for i, out in enumerate(items):
            try:
                if i in works:
                    docs.extend(self._spectrum_docs(works[i]))
                elif isinstance(out, RunOpened):
                    docs.extend(self._opened(out))
                elif isinstance(out, Rejected):
                    docs.extend(self._rejected(out))
                elif isinstance(out, RunClosed):
                    docs.extend(self._closed(out))
                else:
                    logger.error("pipeline got a %s, not an assembly output", type(out).__name__)
            except Exception:  # a bug here must not lose the rest of the batch
                logger.exception("pipeline failed on %r", out)
                if i in works:  # not counted yet (_spectrum_docs counts last): lost, seen
                    self.counters.spectrum_received()
                    self.counters.reject("internal_error", "analysis")
                elif isinstance(out, RunOpened):  # its first spectrum opens it (_ensure_run)
                    self.counters.internal_error("run_start")
        try:  # the documents are good without their pages
            return paged(docs)
        except Exception:
            logger.exception("paging a batch's %d documents failed", len(docs))
            self.counters.internal_error("processing")
            return docs

    def _offer_latest(self, works: dict[int, Work]) -> None:
        """:attr:`latest`: the batch's last spectrum with a prediction, offered on."""
        latest = last_predicted(works)
        if latest is None:
            return
        self.latest = latest
        if self.on_latest is not None:
            try:
                self.on_latest(latest)
            except Exception:
                logger.exception("offering the latest spectrum failed")

    def advise(self) -> list[Doc]:
        """The ``recommendations`` documents of the advice due so far, computed now."""
        return self.advice.take() if self.advice is not None else []

    def close_all(self, reason: str) -> list[Doc]:
        """Stop every open analysis run (exit_status "abort"), e.g. at shutdown."""
        docs: list[Doc] = []
        for raw_uid in list(self._runs):
            self._declared.pop(raw_uid, None)
            docs.extend(self._closed(RunClosed(raw_uid, "abort", reason, 0, 0, 0)))
        return docs
