"""Stop early: whether the last ``stop_count`` spectra of a run settle its cn answer
(rule 4 of :mod:`xasflow.daemon.recommend`), for :meth:`Recommender.settles
<xasflow.daemon.recommend.Recommender.settles>`.
"""

from __future__ import annotations

from collections.abc import Sequence

from xasflow.daemon.recommend_types import RecommenderConfig, withheld_by
from xasflow.models.bundle import Manifest
from xasflow.models.predictor import Prediction

__all__ = ["settles"]


def settles(
    cfg: RecommenderConfig,
    manifest: Manifest,
    prediction: Prediction | None,
    history: Sequence[Prediction],
) -> tuple[bool, str]:
    """Whether the last ``stop_count`` spectra settle the cn answer.

    With a calibrated bundle (conformal sets), when each of them has the same single-value
    set and a cn probability of at least ``stop_set_probability``: the answer then holds
    with the bundle's coverage (a set always keeps its top class, so a flat answer can be
    a single-value set too). Without sets, when they
    agree on cn with probability >= ``stop_probability``. Never for a spectrum out of the
    bundle's domain (its probabilities mean nothing), and withheld, saying why, where one
    of them has incomplete data (:func:`~xasflow.daemon.recommend_types.withheld_by`).
    """
    stop, reason = _agree(cfg, manifest, prediction, history)
    if not stop or prediction is None:
        return stop, reason
    held = withheld_by(_recent(cfg, prediction, history))
    return (False, f"{held}; otherwise {reason}: keep measuring") if held else (True, reason)


def _recent(
    cfg: RecommenderConfig, prediction: Prediction, history: Sequence[Prediction]
) -> list[Prediction]:
    """The last ``stop_count`` spectra of the run, ending with ``prediction``."""
    recent = list(history)[-cfg.stop_count :]
    if not recent or recent[-1] is not prediction:
        recent = [*recent, prediction][-cfg.stop_count :]
    return recent


def _agree(
    cfg: RecommenderConfig,
    manifest: Manifest,
    prediction: Prediction | None,
    history: Sequence[Prediction],
) -> tuple[bool, str]:
    """:func:`settles`, whatever the spectra's quality flags."""
    if prediction is None or "cn" not in prediction.results:
        return False, ""
    if prediction.out_of_domain:
        return False, "out_of_domain: the answer is not to be trusted, keep measuring"
    recent = _recent(cfg, prediction, history)
    if len(recent) < cfg.stop_count or any(p.out_of_domain for p in recent):
        return False, ""
    results = [p.results["cn"] for p in recent if "cn" in p.results]
    current = prediction.results["cn"].prediction_set
    if len(results) < cfg.stop_count or (current is not None and len(current) != 1):
        return False, ""
    sets = [r.prediction_set for r in results]
    if all(s is not None for s in sets):
        first = sets[0]
        assert first is not None
        if len(first) != 1 or any(s != first for s in sets):
            return False, ""
        least = min(r.confidence or 0.0 for r in results)
        if least < cfg.stop_set_probability:  # single only because its top is kept
            return False, ""
        coverage = manifest.set_coverage("cn") or 0.9
        return True, (
            f"cn {first[0]}: a single-value {round(100 * coverage)} % set (probability >= "
            f"{least:.2f}) in the last {cfg.stop_count} spectra"
        )
    values = {str(r.value) for r in results}
    confs = [r.confidence or 0.0 for r in results]
    if len(values) != 1 or min(confs) < cfg.stop_probability:
        return False, ""
    (cn,) = values
    return True, (
        f"cn {cn} with probability >= {min(confs):.2f} "
        f"(>= {cfg.stop_probability:g}) in the last {cfg.stop_count} spectra"
    )
