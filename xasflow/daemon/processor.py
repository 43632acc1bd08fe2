"""The processing thread: queued documents -> assembler -> pipeline -> every sink, in order.

:class:`Processor` takes everything queued (up to ``analysis.batch_max`` documents) per
turn, drops warm-up probe runs (:class:`~xasflow.adapters.probes.ProbeFilter`), closes runs a
killed predecessor left open when their raw stop arrives
(:class:`~xasflow.adapters.recovery.InterruptedRuns`), feeds the rest to the
:class:`~xasflow.daemon.assembly.RunAssembler`, looks for idle runs every
``analysis.timeout_check_s``, and hands the assembler outputs to the
:class:`~xasflow.daemon.pipeline.Pipeline` in chunks of up to ``max_spectra`` spectra
(one ONNX call per bundle, task and chunk), so a backlog's first results go out early.
:class:`~xasflow.daemon.batching.BatchPolicy` (``analysis.batching``) bounds the
micro-batching: a turn takes what is queued and waits a few ms for more only under load, so
a lone spectrum is never held back. Each analysis document goes to the sinks in order (the
store writer, the publisher, the listeners) through its :class:`~xasflow.daemon.outlet.Outlet`.
It is the only thread touching the assembler and the pipeline.

Run timeouts (``analysis.run_timeout_s``) are read on a
:class:`~xasflow.adapters.live_clock.LiveClock`, not the wall clock: a pass of the loop that
took a full batch (a backlog: the run's next documents may be queued) does not count, and no
pass counts for more than ``LiveClock.max_step_s``. A process
that stood still (SIGSTOP, swapping) or fell behind therefore never times out a run whose
documents are waiting in its own input; those documents used to come back as ``late_document``
rejections, and the run's stop then said nothing of them.

Input hooks (the Kafka input's commit rule): runs the input no longer owns (``abandoned()``:
``(raw uid, reason)``, a partition moved to another daemon, or back to this one) are closed
with that reason and forgotten after the turn's documents, or just before a start that
replays one of them, so that a partition which comes back here replays them as new runs
while documents taken before the hand-over still reach the old copy; runs closed by
their run timeout, and starts that opened no run (a warm-up probe, a start the assembler
refused), are reported (``runs_ended(uids)``: nothing will close them, so they must not hold
a commit back);
after the turn ``on_processed()`` says that every document taken so far has gone to the
sinks. A raw start of a run a killed predecessor left open (redelivered by Kafka) resumes
it: the run is analysed anew and the store skips the rows it holds. The events the 0MQ
input's overflow policy dropped (``input_dropped()``) go to the assembler at the start of each
turn, so each is lost once (``overflow``), not again as a gap in its run (``seq_gap``); those
of descriptors the input never queued (``input_unseen()``), or queued for a run a killed
predecessor left open (its descriptor came after the restart), to the interrupted runs, not
to be counted again as ``interrupted``. When such a run's start comes again (it resumes),
the interrupted runs give its rows back and the assembler holds them for it.

With a preparation process (``analysis.prep_process``) a batch is ended one turn after it
was begun, or as soon as the child has answered (:mod:`xasflow.daemon.outlet`): the thread
assembles the next batch meanwhile.

Liveness: :attr:`Processor.last_turn_at` is rebound at the end of every pass of the loop
(every 50 ms when idle), so its age (``/health`` ``last_turn_age_s``, ``/metrics``, the
IOC's ``LOOP_AGE``) grows only while a document or a batch holds the thread.

At the end (:meth:`Processor.drain` is set and the queue is empty) it closes every open run
(``flush_all("shutdown")``: exit_status "abort"), and the interrupted runs still open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from xasflow.adapters.live_clock import LiveClock
from xasflow.adapters.probes import ProbeFilter
from xasflow.adapters.recovery import InterruptedRuns
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.batching import BatchPolicy, RateMeter
from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.outlet import Outlet, safely
from xasflow.daemon.outputs import Output, RunClosed, SpectrumReady
from xasflow.daemon.pipeline import Pipeline

__all__ = ["Processor"]

logger = logging.getLogger(__name__)

_STATS_INTERVAL_S = 0.25

_T = TypeVar("_T")


class Processor:
    """The loop of the ``xasflow-process`` thread (see the module docstring)."""

    def __init__(
        self,
        get: Callable[[float], tuple[str, dict[str, Any]] | None],
        assembler: RunAssembler,
        pipeline: Pipeline,
        counters: Counters,
        analysis: AnalysisConfig,
        *,
        probes: ProbeFilter | None = None,
        interrupted: InterruptedRuns | None = None,
        on_tick: Callable[[], None] | None = None,
        batching: BatchPolicy | None = None,
    ) -> None:
        """``get(timeout)``: the next queued ``(name, doc)`` or None; ``on_tick``: called
        every ``_STATS_INTERVAL_S`` (the daemon refreshes its gauges); ``batching``: the
        micro-batching bounds (default: ``analysis.batching``)."""
        self.get = get
        self.assembler = assembler
        self.pipeline = pipeline
        self.counters = counters
        self.analysis = analysis
        self.probes = probes if probes is not None else ProbeFilter()
        self.interrupted = interrupted
        self.on_tick = on_tick
        self.batching = batching if batching is not None else analysis.batching
        self.rate = RateMeter()  # documents taken per second, recent (BatchPolicy.wait_s)
        #: Where the batches go: begun and ended in order, their documents to the store
        #: writer (``outlet.store_sink``) and then to ``outlet.sinks``.
        self.outlet = Outlet(pipeline, counters, analysis)
        #: Called after each turn: every document taken so far went to the sinks.
        self.on_processed: Callable[[], None] | None = None
        #: Told of every raw start that opened a run (not probes, not starts the assembler
        #: refused), e.g. to make its analysis table ahead or to give it the advice PVs.
        self.on_raw_start: Callable[[dict[str, Any]], None] | None = None
        #: Runs handed over, ``[(raw uid, reason)]``: asked before each start and after each
        #: turn's documents (see :meth:`_handed_over`).
        self.abandoned: Callable[[], list[tuple[str, str]]] | None = None
        self._handing_over: dict[str, str] = {}  # handed over, not yet closed: uid -> reason
        #: The input delivers a run closed at the end again from its start (Kafka: the commit
        #: never passed it): its close then makes no row the replay's first result needs.
        self.replays_open_runs = False
        #: Told the raw uids of runs closed by their run timeout, and of starts that opened no
        #: run (probes, refused starts): no stop will close them (see :meth:`_unopened`).
        self.runs_ended: Callable[[list[str]], None] | None = None
        #: Event rows the input queue dropped since asked, ``[(descriptor uid, seq_nums,
        #: run uid or None)]`` (``ZmqDocumentSource.dropped_events``): asked each turn, see
        #: :meth:`_input_drops`.
        self.input_dropped: Callable[[], list[tuple[Any, list[Any], str | None]]] | None = None
        #: Of those, the rows of descriptors the input never queued
        #: (``ZmqDocumentSource.unseen_drops``), for the interrupted runs' count.
        self.input_unseen: Callable[[], list[tuple[Any, list[Any]]]] | None = None
        self.drain = threading.Event()  # set once nothing more will be queued
        self.clock = LiveClock()
        assembler.clock = self.clock  # run timeouts count live time only (module docstring)
        assembler.on_error = lambda: counters.internal_error("run_stop")  # a run's closing
        #: ``time.monotonic()`` at the end of the loop's last pass. An idle loop passes every
        #: 50 ms, so its age grows only while one document's handling or one batch's sinks
        #: hold the thread (a hung store, a stuck call): ``/health`` and ``/metrics`` show it.
        self.last_turn_at = time.monotonic()

    @property
    def internal_errors(self) -> int:
        """Documents and batches this loop dropped on an unexpected error (a bug): the
        counters' ``internal_errors["processing"]``."""
        return self.counters.internal_errors.get("processing", 0)

    def turn_age(self) -> float:
        """Seconds since the loop's last pass (``/health``, ``/metrics``, the IOC's LOOP_AGE)."""
        return time.monotonic() - self.last_turn_at

    def run(self) -> None:
        """Process until :attr:`drain` is set and the queue is empty, then close everything."""
        a = self.analysis
        next_check = time.monotonic() + a.timeout_check_s
        next_stats = 0.0
        while True:
            items = self._take(a.batch_max)
            if not items and self.drain.is_set():
                break  # the receive thread is joined and the queue is empty
            self.clock.tick(counts=len(items) < a.batch_max)
            now = time.monotonic()
            keep = self.outlet.depth if items else 0  # what the preparation has done goes out
            self._safely("ending the batches prepared", None, self.outlet.complete, keep)
            if not items:  # a pause: advice held for its interval (never before results)
                self._safely("advising in a pause", None, self.outlet.advise)
            try:  # _turn feeds and analyses all it took, whatever fails (counted) on the way
                self._turn(items, check=now >= next_check)
                self._after_turn()
                if now >= next_check:
                    next_check = now + a.timeout_check_s
                if now >= next_stats and self.on_tick is not None:
                    next_stats = now + _STATS_INTERVAL_S
                    self.on_tick()
            except Exception:  # nothing here should raise; if it does, keep serving
                self.counters.internal_error("processing")
                logger.exception("finishing a turn of %d documents failed", len(items))
            self.last_turn_at = time.monotonic()
        self._finish()

    def _take(self, most: int) -> list[tuple[str, dict[str, Any]]]:
        item = self.get(0.002 if self.outlet.pending else 0.05)  # a batch in flight: end it soon
        if item is None:
            return []
        items = [item]
        while len(items) < most and (more := self.get(0.0)) is not None:
            items.append(more)  # everything queued, without waiting
        now = time.monotonic()
        budget = self.batching.wait_s(self.rate.add(len(items), now))
        enough = min(most, self.batching.target_docs)
        if budget > 0 and len(items) < enough:
            queued, deadline = len(items), now + budget
            while len(items) < enough:
                more = self.get(max(0.0, deadline - time.monotonic()))
                if more is None:
                    break
                items.append(more)
            self.rate.add(len(items) - queued, time.monotonic())
        return items

    def _handed_over(self, start: str | None = None) -> list[Output]:
        """Runs the input no longer owns, closed and forgotten.

        ``start``: the uid of a start about to be fed. A run handed over and open here is
        closed now only if this start is its replay (its partition came back here); other
        documents of this turn, taken before the hand-over, still go to their runs, and a
        run whose own start is among them (not open yet) waits for it. ``None``, after the
        turn's documents: every run handed over and open is closed; the others never opened.
        """
        if self.abandoned is None:
            return []
        self._handing_over.update(self.abandoned())
        due = [start] if start is not None else list(self._handing_over)
        out: list[Output] = []
        for raw_uid in due:
            if raw_uid not in self._handing_over:
                continue
            if self.assembler.is_open(raw_uid):
                reason = self._handing_over.pop(raw_uid)
                out.extend(self.assembler.abandon(raw_uid, reason, replayable=True))
            elif start is None:
                self._handing_over.pop(raw_uid)
        return out

    def _after_turn(self) -> None:
        if self.on_processed is not None:
            self.outlet.complete(0)  # "every document taken went to the sinks": none in flight
            self.on_processed()

    def _input_drops(self) -> None:
        """Tell the assembler which events the input queue dropped, before it closes their
        runs: a drop is recorded before any later document is queued, so every drop of a
        run's events is known once its stop (or timeout) is taken from the queue. Rows of a
        run a killed predecessor left open go to :attr:`interrupted` instead, whether this
        input queued their descriptor or not: that run never opens in the assembler, unless
        its start comes again (then :meth:`_feed` hands them back to the assembler)."""
        theirs: list[tuple[Any, list[Any], str | None]] = []  # a killed predecessor's runs'
        if self.input_dropped is not None:
            interrupted = self.interrupted
            for descriptor, seqs, run_start in self.input_dropped():
                if interrupted and interrupted.owns(run_start):  # a descriptor queued here
                    theirs.append((descriptor, seqs, run_start))  # of such a run (see _feed)
                else:
                    self.assembler.dropped(descriptor, seqs, run_start)
        if self.input_unseen is not None:  # and those of descriptors never queued here
            theirs.extend((descriptor, seqs, None) for descriptor, seqs in self.input_unseen())
        if self.interrupted is not None:
            self.interrupted.dropped(theirs)

    def _turn(self, items: list[tuple[str, dict[str, Any]]], check: bool) -> None:
        """One turn's documents through the assembler, its outputs through the pipeline. A
        bug in one step (counted ``processing``) costs only what that step would have given:
        the turn's other documents are still fed, and what they made is analysed."""
        outputs: list[Output] = []
        spectra = 0
        # after the turn's documents were taken (see _input_drops)
        self._safely("telling the assembler of the input's drops", None, self._input_drops)
        ended: list[str] = []  # raw uids that hold no commit back any more
        try:
            for name, doc in items:
                try:
                    fed = self._feed(name, doc, outputs)
                except Exception:  # one document's trouble: the turn's others still go on
                    self.counters.internal_error("processing")
                    logger.exception("handling a %r document failed", name)
                    fed = []
                if name == "start":
                    ended.extend(self._safely("a start's bookkeeping", [], self._unopened, doc))
                for out in fed:  # a page may hold many spectra
                    outputs.append(out)
                    if isinstance(out, SpectrumReady):
                        spectra += 1
                        if spectra >= self.batching.max_spectra:  # a backlog, a big page:
                            self.outlet.analyse(outputs)  # publish as we go, max_spectra a call
                            outputs, spectra = [], 0
            outputs.extend(self._safely("closing runs handed over", [], self._handed_over))
            if check:
                outputs.extend(self._safely("checking run timeouts", [], self._timeouts, ended))
            if ended and self.runs_ended is not None:
                self._safely("reporting ended runs", None, self.runs_ended, ended)
        finally:  # whatever the turn's documents made goes on (analyse never raises)
            self.outlet.analyse(outputs)

    def _timeouts(self, ended: list[str]) -> list[Output]:
        """The runs idle past their run timeout, closed (their uids added to ``ended``), and
        the interrupted runs whose stop did not come in time, each closed alone."""
        timed_out = self.assembler.check_timeouts()
        ended.extend(o.raw_uid for o in timed_out if isinstance(o, RunClosed))
        if self.interrupted:
            for raw_uid in self.interrupted.expired():
                self._safely(
                    "closing an interrupted run",
                    None,
                    self._close_interrupted,
                    raw_uid,
                    None,
                    "no stop within run_timeout_s",
                )
        return timed_out

    def _safely(self, what: str, default: _T, call: Callable[..., _T], *args: Any) -> _T:
        """:func:`~xasflow.daemon.outlet.safely` with this loop's counters."""
        return safely(self.counters, what, default, call, *args)

    def _unopened(self, doc: Any) -> list[str]:
        """``[uid]`` of a start that left no run of its uid open (a warm-up probe, a start the
        assembler refused: empty uid, a run already closed), else ``[]``. Nothing will close
        such a run, so the input must not hold its partition's commit at the start."""
        uid = doc.get("uid") if isinstance(doc, dict) else None
        return [uid] if isinstance(uid, str) and not self.assembler.is_open(uid) else []

    def _feed(self, name: str, doc: dict[str, Any], outputs: list[Output]) -> list[Output]:
        """One document through the probe filter, the crash-recovery and hand-over hooks and
        the assembler: what the assembler made of it (hand-over closes go to ``outputs``)."""
        if self.probes(name, doc):
            return []  # a warm-up probe run: remembered for /health, never analysed
        is_doc = isinstance(doc, dict)
        uid = doc.get("uid") if name == "start" and is_doc else None
        if isinstance(uid, str) and self.interrupted and self.interrupted.resume(uid):
            for descriptor, seqs in self.interrupted.take_rows(uid):  # redelivered from its
                self.assembler.dropped(descriptor, seqs, uid)  # start: its drops are its own
        run_start = doc.get("run_start") if name == "stop" and is_doc else None
        if isinstance(run_start, str) and self.interrupted and self.interrupted.owns(run_start):
            self._close_interrupted(run_start, raw_stop=doc)
            return []
        if isinstance(uid, str):  # a replay finds its run closed (the start is fed anyway)
            outputs.extend(self._safely("closing a replayed run", [], self._handed_over, uid))
        was_open = isinstance(uid, str) and self.assembler.is_open(uid)
        fed = self.assembler.feed(name, doc)  # refuses what is not a document, with a reason
        if isinstance(uid, str) and not was_open and self.assembler.is_open(uid):
            self._raw_started(uid, doc)
        return fed

    def _raw_started(self, uid: str, doc: dict[str, Any]) -> None:
        """Tell :attr:`on_raw_start` of a start that opened a run: only then, since a start
        the assembler refused (a run open or closed already) scans nothing new."""
        if self.on_raw_start is None:
            return
        try:
            self.on_raw_start(doc)
        except Exception:  # only an optimisation: the run is open without it
            logger.exception("preparing the analysis of run %r failed", uid)

    def _finish(self) -> None:
        """Close every run still open, the interrupted ones too; a bug in one step (counted
        ``processing``) skips only that step, so the thread ends and the other runs stop."""
        self.outlet.complete(0)
        self.outlet.analyse(self._safely("closing runs handed over", [], self._handed_over))
        self._safely("the input's last hooks", None, self._after_turn)
        pending: list[str] = self._safely("listing interrupted runs", [], self._pending_runs)
        for raw_uid in pending:
            why = "shutdown"
            self._safely(
                "closing an interrupted run", None, self._close_interrupted, raw_uid, None, why
            )
        self._safely("telling the assembler of the input's drops", None, self._input_drops)
        replay = self.replays_open_runs
        closing: list[Output] = self._safely(
            "closing the open runs", [], self.assembler.flush_all, "shutdown", replay
        )
        self.outlet.analyse(closing)
        try:  # runs the pipeline still holds (none, unless an output went missing)
            for name, doc in self.pipeline.close_all("shutdown"):
                self.outlet.emit(name, doc)
        except Exception:
            logger.exception("closing the pipeline's runs failed")
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception:
                logger.exception("the last statistics update failed")

    def _pending_runs(self) -> list[str]:
        """The interrupted runs still open (none without crash recovery)."""
        return self.interrupted.pending() if self.interrupted is not None else []

    def _close_interrupted(
        self, raw_uid: str, raw_stop: dict[str, Any] | None = None, why: str = ""
    ) -> None:
        assert self.interrupted is not None
        self.outlet.complete(0)  # the run's last results go out before its stop
        stop = self.interrupted.close(raw_uid, raw_stop, why)
        self.counters.run_closed("interrupted")
        if stop is None:
            return
        missing = stop.get("raw_missing_events")
        if isinstance(missing, int):  # those the input dropped are lost as overflow already
            self.counters.lost("interrupted", missing - (stop.get("raw_dropped_events") or 0))
        if stop["run_start"]:  # none: no analysis start went out, so no stop follows it
            # already in the store: to the bus and listeners
            self.outlet.emit("stop", stop, store=False)
