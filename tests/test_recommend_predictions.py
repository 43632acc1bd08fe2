"""Recommendations from hand-made predictions: region shares, layout, steps, stop-early."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from recommend_helpers import (
    CN_IMPORTANCE,
    REGIONS,
    SURE,
    UNSURE,
    VAL_SURE,
    VAL_UNSURE,
    manifest,
    pieces,
    prediction,
)

from xasflow.daemon.recommend import (
    RecommendationTracker,
    Recommender,
    RecommenderConfig,
    finest_step,
    k_pieces,
    region_shares,
)
from xasflow.models.predictor import OUT_OF_DOMAIN, Prediction
from xasflow.spectra import edge_energy


def test_region_shares_are_truncated_shapley() -> None:
    names = list(REGIONS)
    shares = region_shares(CN_IMPORTANCE, names)
    # phi(main) = 0.5*0.30 + 0.5*mean(0.40-0.10, 0.30-0.0, 0.32-0.02) = 0.30, scaled by 0.40
    assert shares["main peak"] == pytest.approx(0.30 / 0.40)
    # phi(pre) = 0.5*0.10 + 0.5*mean(0.40-0.30, 0.10-0.0, 0.12-0.02) = 0.10
    assert shares["pre-edge"] == pytest.approx(0.10 / 0.40)
    assert shares["post-peak"] == pytest.approx(0.0)
    assert region_shares({}, names) == dict.fromkeys(names, 0.0)
    # a negative (helpful-to-remove) importance never becomes a negative share
    assert min(region_shares({"pre-edge": -0.2, "beyond": 0.1}, names).values()) >= 0.0


def test_prior_recommendation_layout_is_deterministic() -> None:
    rec_a = Recommender(manifest()).recommend()
    rec_b = Recommender(manifest()).recommend()
    assert rec_a == rec_b
    tab = edge_energy("Cu", "K")
    assert rec_a.e0 == tab and rec_a.uncertainty == 1.0 and not rec_a.stop_early
    names = [r.name for r in rec_a.regions]
    # model regions by importance (main peak drives cn), then the support regions
    assert names[0] == "main peak"
    assert names[-2:] == ["pre-edge line", "approach"]
    assert [r.importance for r in rec_a.regions[:4]] == sorted(
        (r.importance for r in rec_a.regions[:4]), reverse=True
    )
    by = {r.name: r for r in rec_a.regions}
    assert by["main peak"].importance == 1.0
    # the edge region is kept fine whatever its importance (Cu K: 0.65 x 1.55 eV core hole)
    assert by["pre-edge"].step <= 1.0 < by["main peak"].step * 4.0
    # finer steps and longer dwell where it matters
    assert by["main peak"].step < by["post-peak"].step
    assert by["main peak"].dwell > by["post-peak"].dwell
    # contiguous cover of the model window plus the prior margin, nothing beyond it
    margin = RecommenderConfig().prior_e0_margin
    assert by["pre-edge"].start == pytest.approx(tab - 3.5 - margin)
    beyond = pieces(rec_a, "beyond")
    assert beyond[-1].stop == pytest.approx(tab + 116.5 + margin)
    energies = rec_a.energies()
    assert energies[0] == pytest.approx(tab - 150.0)
    assert energies[-1] == pytest.approx(tab + 116.5 + margin)
    assert np.all(np.diff(energies) > 0)
    assert rec_a.n_points == energies.size == rec_a.dwells().size
    # every region's grid divides its span exactly
    for r in rec_a.regions:
        e = r.energies()
        assert e[0] == r.start and e[-1] == pytest.approx(r.stop)
        assert np.allclose(np.diff(e), r.step, atol=1e-5)
        assert r.n_points == e.size == round((r.stop - r.start) / r.step) + 1
    # the scan is built once; what a caller does to its copy does not change the advice
    energies[:] = 0.0
    rec_a.dwells()[:] = -1.0
    assert rec_a.energies()[0] == pytest.approx(tab - 150.0)
    assert rec_a.time == pytest.approx(float(rec_a.dwells().sum())) and rec_a.time > 0


def test_regions_far_above_the_edge_are_cut_where_k_steps_grow() -> None:
    cfg = RecommenderConfig(fine_step=0.5)
    # below the fine-step floor (10.25 eV for 0.5 eV and 0.04/A) a region stays whole
    assert k_pieces(-15.0, 10.0, cfg.for_edge("Cu", "K")) == [(-15.0, 10.0)]
    cfg = cfg.for_edge("Cu", "K")
    cut = k_pieces(41.5, 128.0, cfg)
    assert cut[0][0] == 41.5 and cut[-1][1] == 128.0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cut))  # contiguous
    assert [round(b / a, 4) for a, b in cut[:-1]] == [round(cfg.piece_growth**2, 4)] * (
        len(cut) - 1
    )
    assert k_pieces(41.5, 128.0, cfg.model_copy(update={"piece_growth": 1.0})) == [(41.5, 128.0)]
    # the recommended pieces: one importance, coarser steps further out, same dwell
    rec = Recommender(manifest(), cfg).recommend(prediction(SURE, VAL_SURE))
    beyond = pieces(rec, "beyond")
    assert [r.name for r in beyond] == ["beyond", "beyond (2/3)", "beyond (3/3)"]
    steps = [r.step for r in beyond]
    assert steps == sorted(steps) and steps[-1] > cfg.piece_growth * steps[0]
    assert len({(r.importance, r.dwell) for r in beyond}) == 1
    w = beyond[0].importance
    for r in beyond:
        lo = r.start - rec.e0
        assert r.step <= finest_step(lo, cfg) * cfg.coarse_factor ** (1 - w) + 1e-6
    # fewer points than one grid at the step of the region's start, same span
    one = finest_step(41.5, cfg) * cfg.coarse_factor ** (1 - w)
    assert sum(r.n_points - 1 for r in beyond) < (beyond[-1].stop - beyond[0].start) / one


def test_steps_follow_importance_and_k_space() -> None:
    cfg = RecommenderConfig().for_edge("Cu", "K")
    assert finest_step(0.0, cfg) == cfg.fine_step == 1.0
    assert finest_step(100.0, cfg) == pytest.approx(2 * 3.80998 * math.sqrt(100 / 3.80998) * 0.04)
    rec = Recommender(manifest(), cfg).recommend(prediction(SURE, VAL_SURE))
    by = {r.name: r for r in rec.regions}
    w = by["post-peak"].importance
    expected = finest_step(26.5, cfg) * cfg.coarse_factor ** (1 - w)
    n = math.ceil(15.0 / expected - 1e-9)
    assert by["post-peak"].step == pytest.approx(15.0 / n, abs=1e-6)


def test_finest_step_follows_the_core_hole_width() -> None:
    """Open steps are set from the absorber's K core-hole width; given ones are kept; a
    config whose steps are still open is refused by the step helpers."""
    assert RecommenderConfig().for_edge("Cu", "K").steps() == (1.0, 1.0)
    assert RecommenderConfig().for_edge("Ti", "K").steps() == (0.6, 0.6)
    assert RecommenderConfig().for_edge("Cu", "L3").steps() == (0.5, 0.5)  # not tabulated
    given = RecommenderConfig(fine_step=0.3, edge_max_step=0.2).for_edge("Cu", "K")
    assert given.steps() == (0.3, 0.2)
    with pytest.raises(ValueError, match="for_edge"):
        finest_step(5.0, RecommenderConfig())
    assert Recommender(manifest()).config.steps() == (1.0, 1.0)


def test_uncertainty_moves_the_emphasis() -> None:
    rec = Recommender(manifest())
    # cn settled, valence open: the pre-edge (valence) gains on the main peak (cn)
    open_valence, _ = rec.importance(prediction(SURE, VAL_UNSURE))
    open_cn, _ = rec.importance(prediction(UNSURE, VAL_SURE))
    assert open_valence["pre-edge"] > open_cn["pre-edge"]
    # while cn is uncertain, important regions get the longer dwell
    unsure = {r.name: r for r in rec.recommend(prediction(UNSURE, VAL_SURE)).regions}
    sure = {r.name: r for r in rec.recommend(prediction(SURE, VAL_SURE)).regions}
    factor = RecommenderConfig().uncertain_dwell_factor
    assert unsure["main peak"].dwell == pytest.approx(sure["main peak"].dwell * factor, rel=0.02)
    assert "uncertain" in unsure["main peak"].reason
    # regions centre on the predicted E0 with the small margin
    assert sure["pre-edge"].start == pytest.approx(8985.0 - 3.5 - 2.0)


def test_stop_early_needs_agreement_and_confidence() -> None:
    rec = Recommender(manifest(), RecommenderConfig(stop_count=3, stop_probability=0.9))
    sure = prediction(SURE, VAL_SURE)
    assert not rec.recommend(sure, history=[sure]).stop_early  # one spectrum is not a trend
    out = rec.recommend(sure, history=[sure, sure, sure])
    assert out.stop_early and "cn 4" in out.stop_reason
    other = prediction({"2": 0.01, "4": 0.04, "6": 0.95}, VAL_SURE)
    assert not rec.recommend(sure, history=[other, sure, sure]).stop_early
    weak = prediction({"2": 0.05, "4": 0.85, "6": 0.10}, VAL_SURE)
    assert not rec.recommend(sure, history=[weak, sure, sure]).stop_early
    assert rec.recommend(sure, history=[other, sure, sure, sure]).stop_early  # last 3 count


def test_stop_early_never_out_of_domain_nor_with_an_open_conformal_set() -> None:
    """A confident answer on a spectrum the bundle was not trained for is not an answer."""
    rec = Recommender(manifest(), RecommenderConfig(stop_count=3, stop_probability=0.9))
    sure = prediction(SURE, VAL_SURE)
    assert rec.recommend(sure, history=[sure, sure, sure]).stop_early
    ood = dataclasses.replace(sure, flags=[OUT_OF_DOMAIN], ood_score=12.0)
    out = rec.recommend(ood, history=[sure, sure, ood])
    assert not out.stop_early and "out_of_domain" in out.stop_reason
    assert not rec.recommend(sure, history=[ood, sure, sure]).stop_early  # in the window
    cn = dataclasses.replace(sure.results["cn"], prediction_set=[4, 6])
    wide = dataclasses.replace(sure, results={**sure.results, "cn": cn})
    assert not rec.recommend(wide, history=[sure, sure, wide]).stop_early
    one = dataclasses.replace(sure.results["cn"], prediction_set=[4])
    narrow = dataclasses.replace(sure, results={**sure.results, "cn": one})
    assert rec.recommend(narrow, history=[sure, sure, narrow]).stop_early


#: Flags of a spectrum whose data are incomplete or whose energy scale is unchecked
INCOMPLETE = [
    "seq_gap",
    "points_rejected",
    "points_dropped",
    "nonfinite_dropped",
    "glitch_interpolated",
    "align_failed",
    "align_out_of_range",
    "extrapolated_4.0eV",
]


@pytest.mark.parametrize("flag", INCOMPLETE)
def test_stop_early_is_withheld_on_incomplete_data(flag: str) -> None:
    """A certain answer from a spectrum with events missing, points refused, the model
    window extrapolated or the foil alignment failed rests on data the model did not see
    whole: stop-early waits, and its reason names the flag, whichever spectrum of the row
    carries it."""
    rec = Recommender(manifest(), RecommenderConfig(stop_count=2, stop_probability=0.9))
    sure = prediction(SURE, VAL_SURE)
    assert rec.recommend(sure, history=[sure, sure]).stop_early
    flagged = dataclasses.replace(sure, flags=["seq_disorder", flag])
    out = rec.recommend(flagged, history=[sure, flagged])
    assert not out.stop_early
    assert out.stop_reason.startswith(f"withheld by {flag} in this spectrum")
    out = rec.recommend(sure, history=[flagged, sure])
    assert not out.stop_early
    assert out.stop_reason.startswith(f"withheld by {flag} in the spectrum 1 before")
    assert rec.recommend(sure, history=[flagged, sure, sure]).stop_early  # out of the row
    # an answer that would not settle anyway says nothing of the flag
    unsure = dataclasses.replace(prediction(UNSURE, VAL_SURE), flags=[flag])
    assert rec.recommend(unsure, history=[unsure, unsure]).stop_reason == ""


@pytest.mark.parametrize(
    "flag",
    ["seq_disorder", "points_retaken", "channel_dropped", "no_reference", "element_inferred"],
)
def test_stop_early_is_not_withheld_by_flags_of_complete_data(flag: str) -> None:
    """Events out of order, a re-taken point, a dropped optional channel, no foil at all:
    the spectrum is whole, and stop-early comes as without the flag."""
    rec = Recommender(manifest(), RecommenderConfig(stop_count=2, stop_probability=0.9))
    flagged = dataclasses.replace(prediction(SURE, VAL_SURE), flags=[flag])
    out = rec.recommend(flagged, history=[flagged, flagged])
    assert out.stop_early and out.stop_reason.startswith("cn 4")


def test_stop_early_on_single_value_conformal_sets() -> None:
    """With a calibrated bundle the rule is the 90 % set: the same single value three times,
    whatever the top probability; two values in a set, or sets that disagree, keep going."""
    rec = Recommender(manifest(), RecommenderConfig(stop_count=3, stop_probability=0.9))

    def with_set(probs: dict[str, float], chosen: list[int]) -> Prediction:
        base = prediction(probs, VAL_SURE)
        cn = dataclasses.replace(base.results["cn"], prediction_set=chosen)
        return dataclasses.replace(base, results={**base.results, "cn": cn})

    likely = with_set({"2": 0.1, "4": 0.75, "6": 0.15}, [4])  # below stop_probability
    out = rec.recommend(likely, history=[likely, likely, likely])
    assert out.stop_early and "single-value 90 % set" in out.stop_reason
    six = with_set({"2": 0.05, "4": 0.15, "6": 0.8}, [6])
    assert not rec.recommend(likely, history=[six, likely, likely]).stop_early
    open_set = with_set({"2": 0.05, "4": 0.55, "6": 0.4}, [4, 6])
    assert not rec.recommend(likely, history=[open_set, likely, likely]).stop_early
    # a flat answer (a mixed-phase sample) whose set is single only because its top class is
    # always kept: p 0.34 is no certainty, whatever the set (it stopped before)
    flat = with_set({"2": 0.34, "4": 0.33, "6": 0.33}, [2])
    assert not rec.recommend(flat, history=[flat, flat, flat]).stop_early
    floor = Recommender(manifest(), RecommenderConfig(stop_count=3, stop_set_probability=0.3))
    assert floor.recommend(flat, history=[flat, flat, flat]).stop_early


def test_the_tracker_says_when_stop_early_turns_and_a_rejection_restarts_the_row() -> None:
    """A caller that throttles advice asks ``turns`` for each spectrum: a stop-early decision
    that changes must go out at once; a refused spectrum (``interrupt``) breaks the row."""
    tracker = RecommendationTracker(RecommenderConfig(stop_count=2, stop_probability=0.9))
    m, sure = manifest(), prediction(SURE, VAL_SURE)
    history = tracker.observe("r", sure)
    assert not tracker.turns("r", m, history)  # one spectrum: no stop, and none said
    assert not tracker.recommend_observed("r", m, history).stop_early
    history = tracker.observe("r", sure)
    assert tracker.turns("r", m, history)  # two in a row: the decision turns to stop
    assert tracker.recommend_observed("r", m, history).stop_early
    assert not tracker.turns("r", m, tracker.observe("r", sure))  # still stop: nothing new
    tracker.interrupt("r")  # a spectrum of the run was rejected
    history = tracker.observe("r", sure)
    assert tracker.turns("r", m, history)  # one in a row again: stop turns back off
    assert not tracker.recommend_observed("r", m, history).stop_early
    tracker.close("r")
    assert tracker.open_runs == []


def test_the_tracker_forgets_a_runs_decision_with_its_history() -> None:
    """Runs never closed (a daemon that missed their stops) are dropped past ``max_runs``
    from the history, but their last stop-early decision stayed, one entry per run for
    good. Expected: both go together."""
    tracker = RecommendationTracker(RecommenderConfig(stop_count=1), max_runs=4)
    m, sure = manifest(), prediction(SURE, VAL_SURE)
    for k in range(50):
        tracker.recommend_observed(f"r{k}", m, tracker.observe(f"r{k}", sure))
    assert len(tracker.open_runs) == 4
    assert len(tracker._said) <= 4
