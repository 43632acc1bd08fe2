"""The advice that follows analysed spectra: which get a ``recommendations`` event, and when
it is computed.

Whether a spectrum gets advice is decided in spectrum order, as its result is composed: its
prediction is observed (stop-early sees every prediction), and advice is due at most once per
run per ``interval_s``, except when the stop-early decision turns, or when the answer goes
into or out of the bundle's domain: then at once, but such a flip at most once per run per
``interval_s`` as well. A flip held back so is remembered and advised once the interval is
over (after the next batch, or at the processing loop's next pass that takes nothing),
or at the run's close: a run's advice is at most ``interval_s`` (and one pass of the loop,
50 ms when idle) behind in saying whether the latest answer is out of domain, and its last
advice always says it. Before, every flip was advised: a stream whose answers flip at each
spectrum (the benches' mixed pools; a sample at the domain's edge) computed advice at every
turn, ~60 a second per run at 900 spectra/s, 7 % of the processing thread. The advice
itself (regions, waveform, noise: ~0.5-1 ms) is computed later, by :meth:`RunAdvice.take`,
from a copy of the run's history at that spectrum: the processing loop publishes a batch's
results first, so no result waits for the advice that follows it. A run's advice still due
is taken before its stop (:meth:`RunAdvice.close`).

Throttled (``interval_s`` > 0), advice due for a run is superseded by a later advice of the
same run due with it (one batch: they would be published in the same instant), unless it is
the run's very first advice or a turn of stop-early: each turn still goes out, and the run's
last advice is its newest. A sample whose answer flips in and out of domain at fly-scan rates
(or a stream mixing samples) made advice due for every flip: 40 % of the stream bench's
spectra at 1,000/s, a fifth of the daemon's time. A superseded advice is never computed, so
its rescan (``queueserver.submit_on: rescan``) is not looked for, as for a throttled
spectrum's. Superseded advice is counted (``xasflow_advice_superseded_total``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xasflow.daemon.documents import AnalysisRun, Doc
from xasflow.daemon.recommend import (
    RecommendationTracker,
    RecommenderConfig,
    recommendation_docs,
)

if TYPE_CHECKING:
    from xasflow.daemon.batch_prep import Work
    from xasflow.daemon.counters import Counters
    from xasflow.models.bundle import Manifest
    from xasflow.models.predictor import Prediction
    from xasflow.spectra import Spectrum

__all__ = ["RunAdvice"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Due:
    """Advice decided for one spectrum, not computed yet."""

    run: AnalysisRun
    index: int
    manifest: Manifest
    history: list[Prediction]  # the run's recent predictions at this spectrum (a copy)
    spectrum: Spectrum | None
    measured: Spectrum | None  # the same before HERFD broadening: its noise is measured there
    out_of_domain: bool
    keep: bool  # the run's first advice or a turn of stop-early: never superseded


class RunAdvice:
    """Per-run advice state of the pipeline (one caller thread, like the pipeline)."""

    def __init__(
        self, config: RecommenderConfig, interval_s: float = 0.0, counters: Counters | None = None
    ) -> None:
        """``interval_s``: at most one advice per run in this many seconds (see the module;
        0: advice after every analysed spectrum, none superseded). ``counters``: where
        superseded advice is counted."""
        if interval_s < 0:
            raise ValueError("recommend_interval_s must be >= 0")
        self.tracker = RecommendationTracker(config)
        self.interval_s = float(interval_s)
        self.counters = counters
        #: raw uid -> (monotonic time the next advice is due, its last advice out of domain)
        self._advised: dict[str, tuple[float, bool]] = {}
        #: raw uid -> monotonic time before which a flip in or out of domain waits
        self._flip_due: dict[str, float] = {}
        #: raw uid -> the advice of its latest flip held back (advised at the close at the latest)
        self._held: dict[str, _Due] = {}
        self._due: list[_Due] = []

    def observe(self, run: AnalysisRun, work: Work) -> None:
        """An analysed spectrum of ``run`` (its result composed): observe its prediction, and
        make its advice due unless throttled. Never raises (advice is optional)."""
        pred, predictor = work.prediction, work.predictor
        if pred is None or predictor is None:
            return
        tracker, manifest, raw_uid = self.tracker, predictor.manifest, run.raw_uid
        try:
            if work.flags:  # the spectrum's own (seq_gap, align_failed, ...): stop-early reads them
                pred = dataclasses.replace(pred, flags=[*work.flags, *pred.flags])
            history = tracker.observe(raw_uid, pred)
            now = time.monotonic()
            first = raw_uid not in self._advised
            due, ood = self._advised.get(raw_uid, (now, False))
            flip = ood != pred.out_of_domain
            turn = tracker.turns(raw_uid, manifest, history)
            held_flip = flip and now < self._flip_due.get(raw_uid, now)
            if now < due and not turn and (not flip or held_flip):
                if held_flip:  # advised when the interval is over, or at the close
                    self._held[raw_uid] = self._decided(run, work, manifest, pred, history, False)
                else:  # the last advice says what the latest answer says again
                    self._held.pop(raw_uid, None)
                return
            tracker.decided(raw_uid, manifest, history)  # the next spectrum's "turns" sees it
            self._advised[raw_uid] = (now + self.interval_s, pred.out_of_domain)
            if flip and not first:
                self._flip_due[raw_uid] = now + self.interval_s
            self._held.pop(raw_uid, None)
            self._due.append(self._decided(run, work, manifest, pred, history, first or turn))
        except Exception:
            logger.exception("recommendation failed for %s/%s", raw_uid, work.scan.index)

    @staticmethod
    def _decided(
        run: AnalysisRun,
        work: Work,
        manifest: Manifest,
        pred: Prediction,
        history: list[Prediction],
        keep: bool,
    ) -> _Due:
        """The advice of ``work``'s spectrum, to be computed by :meth:`take`."""
        prepared = work.prepared
        return _Due(
            run,
            work.scan.index,
            manifest,
            list(history),
            None if prepared is None else prepared.spectrum,
            None if prepared is None else prepared.measured,
            pred.out_of_domain,
            keep=keep,
        )

    def interrupt(self, raw_uid: str) -> None:
        """A spectrum of the run got no answer: the spectra "in a row" start again."""
        self.tracker.interrupt(raw_uid)

    def take(self, raw_uid: str | None = None) -> list[Doc]:
        """The documents of the advice due (of one run, or all), computed now, in order.
        Taking all, a flip held back whose interval is over is due too (the processing loop
        takes all after each batch and at each pass that took nothing, so a run whose
        spectra stopped after a flip still gets it)."""
        if raw_uid is None:
            self._release_held(time.monotonic())
            due, self._due = self._due, []
        else:
            due = [d for d in self._due if d.run.raw_uid == raw_uid]
            if not due:
                return []
            self._due = [d for d in self._due if d.run.raw_uid != raw_uid]
        if self.interval_s > 0:
            due = self._newest(due)
        docs: list[Doc] = []
        for d in due:
            try:
                rec = self.tracker.recommend_observed(
                    d.run.raw_uid, d.manifest, d.history, d.spectrum, d.measured
                )
                docs.extend(recommendation_docs(d.run, d.index, rec, d.out_of_domain))
            except Exception:  # advice is optional; the prediction is already recorded
                logger.exception("recommendation failed for %s/%s", d.run.raw_uid, d.index)
        return docs

    def _release_held(self, now: float) -> None:
        """Make due the held flips whose interval is over (each its run's latest spectrum)."""
        for raw_uid, held in list(self._held.items()):
            if now < self._flip_due.get(raw_uid, now):
                continue
            del self._held[raw_uid]
            self.tracker.decided(raw_uid, held.manifest, held.history)
            self._advised[raw_uid] = (now + self.interval_s, held.out_of_domain)
            self._flip_due[raw_uid] = now + self.interval_s
            self._due.append(held)

    def _newest(self, due: list[_Due]) -> list[_Due]:
        """``due`` without the advice a later one of the same run supersedes (see the module)."""
        later: set[str] = set()
        kept: list[_Due] = []
        for d in reversed(due):
            if d.keep or d.run.raw_uid not in later:
                kept.append(d)
            later.add(d.run.raw_uid)
        superseded = len(due) - len(kept)
        if superseded:
            logger.debug("%d advice superseded by newer advice of the same run", superseded)
            if self.counters is not None:
                self.counters.advice_superseded(superseded)
        kept.reverse()
        return kept

    def close(self, raw_uid: str) -> list[Doc]:
        """A run closes: the documents of its advice still due (a flip held back among them),
        and the run forgotten."""
        held = self._held.pop(raw_uid, None)
        if held is not None:
            self._due.append(held)
        docs = self.take(raw_uid)
        self.tracker.close(raw_uid)
        self._advised.pop(raw_uid, None)
        self._flip_due.pop(raw_uid, None)
        return docs
