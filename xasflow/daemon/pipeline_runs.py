"""The analysis runs :class:`~xasflow.daemon.pipeline.Pipeline` keeps open, and their documents.

A run opens at its start (or, when that was lost, at its first spectrum, without the start's
metadata); each spectrum is one event (ok or rejected, counted once its row is in the run);
an assembly rejection of a run being analysed is one too (one row per run for duplicates);
the stop carries the raw run's counts, "fail" when a failed batch lost its spectra or when
closing it hit a bug. :class:`PipelineRuns` is a mixin only the pipeline uses; every method
runs on the processing thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xasflow.daemon.analysis_rows import ok_row, rejected_row
from xasflow.daemon.documents import AnalysisRun, Doc
from xasflow.daemon.outputs import Rejected, RunClosed, RunOpened
from xasflow.models.predictor import HERFD_SUSPECTED

if TYPE_CHECKING:
    from xasflow.daemon.advice import RunAdvice
    from xasflow.daemon.batch_prep import Work
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.herfd_hint import HerfdHints

__all__ = ["PipelineRuns"]

logger = logging.getLogger("xasflow.daemon.pipeline")  # the pipeline's, as before the move


class PipelineRuns:
    """The pipeline's open analysis runs: a spectrum's or a rejection's event, a run's stop."""

    counters: Counters
    clock: Callable[[], float]
    validate: bool
    observe_latency: bool
    advice: RunAdvice | None
    herfd_hints: HerfdHints
    _runs: dict[str, AnalysisRun]  # raw uid -> its open analysis run
    _hit: dict[str, str]  # raw uid -> why a failed batch lost its spectra

    def _ensure_run(self, raw_uid: str) -> AnalysisRun:
        run = self._runs.get(raw_uid)
        if run is None:
            logger.warning("output for raw run %s that was never opened; opening it now", raw_uid)
            run = self._new_run(raw_uid, None, "unknown")
        return run

    def _new_run(self, raw_uid: str, start: dict[str, Any] | None, kind: str) -> AnalysisRun:
        run = AnalysisRun(raw_uid, start, kind=kind, validate=self.validate, clock=self.clock)
        self._runs[raw_uid] = run
        self.counters.run_opened()
        return run

    def _opened(self, out: RunOpened) -> list[Doc]:
        if out.raw_uid not in self._runs:
            self._new_run(out.raw_uid, out.start, out.kind)
        return []

    def _spectrum_docs(self, work: Work) -> list[Doc]:
        """The analysis event of one spectrum; it is counted once its row is in the run, so a
        failure before that leaves it to the ``internal_error`` count of
        :meth:`Pipeline._documents <xasflow.daemon.pipeline.Pipeline._documents>`."""
        scan = work.scan
        run = self._ensure_run(scan.raw_uid)
        now = self.clock()
        latency = now - scan.event_time if math.isfinite(scan.event_time) else None
        ok = work.reason is None and work.prediction is not None
        if ok:
            assert work.prediction is not None
            row = ok_row(
                scan.index,
                work.prediction,
                energy_shift=work.shift,
                flags=[*work.flags, *work.prediction.flags],
                latency_ms=None if latency is None else latency * 1e3,
            )
        else:
            row = rejected_row(
                scan.index,
                work.reason or "internal_error",
                work.detail,
                flags=work.flags,
                element=work.element,
                edge=work.edge,
                bundle_id=None if work.predictor is None else work.predictor.bundle_id,
                energy_shift=work.shift,
                latency_ms=None if latency is None else latency * 1e3,
            )
        docs = run.event(row)
        self.counters.spectrum_received()
        if ok:
            assert work.prediction is not None
            self.counters.spectrum_analysed()
            if work.prediction.out_of_domain:
                self.counters.spectrum_out_of_domain()
                if HERFD_SUSPECTED in work.prediction.flags:
                    self.counters.spectrum_herfd_suspected()
        else:
            self.counters.reject(work.reason or "internal_error", "analysis")
        if self.observe_latency and latency is not None:
            self.counters.observe_latency(latency)
        if self.advice is not None:
            try:  # the advice must never cost the spectrum its counted document
                if ok:
                    self.advice.observe(run, work)
                else:  # "in a row" means without one refused
                    self.advice.interrupt(scan.raw_uid)
            except Exception:
                logger.exception("the advice failed on spectrum %d of %s", scan.index, run.raw_uid)
        return docs

    def _rejected(self, out: Rejected) -> list[Doc]:
        self.counters.reject(out.reason, "assembly")
        run = self._runs.get(out.raw_uid) if out.raw_uid is not None else None
        if run is None:
            return []
        if out.reason == "duplicate_event":  # one rejected row per run; the rest are counted
            run.n_duplicates += 1
            if run.n_duplicates > 1:
                return []
        elif self.advice is not None:  # refused in assembly: the row restarts too
            self.advice.interrupt(run.raw_uid)  # (a duplicate refuses no spectrum)
        row = rejected_row(out.index, out.reason, out.detail, element=run.element, edge=run.edge)
        return run.event(row)

    def _closed(self, out: RunClosed) -> list[Doc]:
        """The run's last advice and stop; never raises. When something here fails (a bug,
        counted ``run_stop``) the run is forgotten all the same (a replay opens a new one)
        and stopped "fail" with the error as its reason."""
        self.counters.run_closed(out.exit_status)
        # the input queue's drops are counted as overflow where they happen: not twice
        self.counters.lost("seq_gap", out.missing_events - out.dropped_events)
        run = self._runs.pop(out.raw_uid, None)
        if run is None:
            logger.warning("raw run %s closed but was never opened here", out.raw_uid)
            run = AnalysisRun(out.raw_uid, None, validate=self.validate, clock=self.clock)
            self.counters.run_opened()
        docs: list[Doc] = []
        lost = self._hit.pop(out.raw_uid, "")  # spectra lost to a failed batch: "fail"
        try:
            self.herfd_hints.forget(out.raw_uid)
            docs = self.advice.close(out.raw_uid) if self.advice is not None else []
            return docs + self._stop(run, out, lost)
        except Exception as exc:
            logger.exception("closing the analysis run of %s failed", out.raw_uid)
            self.counters.internal_error("run_stop")
            error = f"{type(exc).__name__}: {exc}"
        try:
            return docs + self._stop(run, out, error)
        except Exception:
            logger.exception("the analysis run of %s could not be stopped", out.raw_uid)
            return docs

    @staticmethod
    def _stop(run: AnalysisRun, out: RunClosed, error: str = "") -> list[Doc]:
        return run.close(
            out.exit_status,
            out.reason,
            seq_gaps=out.seq_gaps,
            missing_events=out.missing_events,
            dropped_events=out.dropped_events,
            error=error,
        )
