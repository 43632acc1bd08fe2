"""The daemon's HERFD hint: an out-of-domain run that would be in domain if declared HERFD.

A beamline that measures HERFD and forgets ``analysis.herfd`` (or the start document's
``herfd``) gets every spectrum flagged out of domain, with no clue why. Once per raw run, at
its first out-of-domain spectrum, :class:`HerfdHints` asks the bundle whether the same
spectrum broadened as HERFD would be in domain, also with its measured point noise put back
(:meth:`~xasflow.models.predictor.Predictor.with_herfd_hint`: up to four more predictions,
once per run; a noisy conventional scan is not hinted); if so, that spectrum and the run's later out-of-domain ones carry the flag
``herfd_suspected`` beside ``out_of_domain``. It is a hint for the operator, never a change
of the answer: nothing is broadened unless HERFD is declared.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from xasflow.daemon.batch_prep import Work
from xasflow.models.predictor import HERFD_SUSPECTED

__all__ = ["HerfdHints"]

logger = logging.getLogger(__name__)


class HerfdHints:
    """Per open raw run, whether its out-of-domain spectra look like undeclared HERFD."""

    def __init__(self) -> None:
        self._runs: dict[str, bool] = {}  # raw uid -> the answer of its one check

    def apply(self, works: Iterable[Work]) -> None:
        """Add the hint to the out-of-domain predictions of ``works`` whose run it fits."""
        for w in works:
            pred = w.prediction
            if pred is None or not pred.out_of_domain or w.prepared is None:
                continue
            uid = w.scan.raw_uid
            hint = self._runs.get(uid)
            if hint is None:
                assert w.predictor is not None
                try:
                    hinted = w.predictor.with_herfd_hint(w.prepared.spectrum, pred)
                except Exception:  # only a hint: never lose the answer over it
                    logger.exception("HERFD check of run %s failed", uid)
                    hinted = pred
                hint = self._runs[uid] = HERFD_SUSPECTED in hinted.flags
            if hint and HERFD_SUSPECTED not in pred.flags:
                w.prediction = dataclasses.replace(pred, flags=[*pred.flags, HERFD_SUSPECTED])

    def forget(self, raw_uid: str) -> None:
        """The run is closed."""
        self._runs.pop(raw_uid, None)
