"""Recommendations that read the measured spectrum: noise, rescans, its axis, the mono range.

An ambiguous edge widens the margin; a recommendation's row and waveform round-trip.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from recommend_helpers import SURE, UNSURE, VAL_SURE, manifest, pieces, prediction

from xasflow.daemon.recommend import (
    RECOMMENDATION_KEYS,
    Recommender,
    RecommenderConfig,
    e0_ambiguity,
    estimate_noise,
    parse_recommendation_row,
    recommendation_row,
    waveform_regions,
)
from xasflow.spectra import Spectrum, align, find_e0


def smooth_mu(energy: np.ndarray, e0: float) -> np.ndarray:
    x = energy - e0
    return 0.5 + np.arctan(x / 1.5) / np.pi + 0.3 * np.exp(-0.5 * ((x - 18.0) / 5.0) ** 2)


def test_noise_estimate_recovers_white_noise() -> None:
    rng = np.random.default_rng(7)
    energy = np.arange(9000.0, 9100.0, 0.3)
    clean = smooth_mu(energy, 8985.0)
    assert estimate_noise(energy, clean, 9000.0, 9100.0, 1.0) < 0.002
    for sigma in (0.01, 0.05):
        noisy = clean + rng.normal(0.0, sigma, energy.size)
        est = estimate_noise(energy, noisy, 9000.0, 9100.0, 1.0)
        assert est == pytest.approx(sigma, rel=0.2)
        assert estimate_noise(energy, 2 * noisy, 9000.0, 9100.0, 2.0) == pytest.approx(est)
    assert estimate_noise(energy, clean, 9000.0, 9001.0, 1.0) is None  # < 7 points


def noisy_main_peak(e0: float) -> tuple[np.ndarray, np.ndarray]:
    """(energy, mu) of a smooth edge at ``e0`` with white noise (5 % of the step) over the
    main peak only."""
    rng = np.random.default_rng(3)
    energy = np.arange(e0 - 160.0, e0 + 130.0, 0.3)
    mu = smooth_mu(energy, e0)
    main = (energy >= e0 + 11.5) & (energy <= e0 + 26.5)
    mu[main] += rng.normal(0.0, 0.05, int(main.sum()))
    return energy, mu


def test_rescan_of_a_noisy_important_region() -> None:
    e0 = 8985.0
    energy, mu = noisy_main_peak(e0)
    spectrum = Spectrum(energy, mu, "Cu", "K")
    cfg = RecommenderConfig(noise_threshold=0.02, max_rescan_factor=4.0)
    rec = Recommender(manifest(), cfg).recommend(prediction(SURE, VAL_SURE), spectrum)
    assert rec.rescan is not None and rec.rescan.name == "main peak"
    # the whole region, noise measured over it, on the grid of its first piece
    main_pieces = pieces(rec, "main peak")
    main_region = main_pieces[0]
    assert (rec.rescan.start, rec.rescan.stop, rec.rescan.step) == (
        main_region.start,
        main_pieces[-1].stop,
        main_region.step,
    )
    # (0.05 / 0.02)^2 = 6.25x, capped at 4x
    assert rec.rescan.dwell == pytest.approx(4.0 * main_region.dwell, rel=1e-3)
    assert rec.noise["main peak"] == pytest.approx(0.05, rel=0.3)
    assert rec.noise["pre-edge"] < 0.01
    quiet = Spectrum(energy, smooth_mu(energy, e0), "Cu", "K")
    assert Recommender(manifest(), cfg).recommend(prediction(SURE, VAL_SURE), quiet).rescan is None


@pytest.mark.parametrize("shift", [4.0, -6.0])
def test_regions_are_on_the_recorded_axis_the_monochromator_drives(shift: float) -> None:
    """The daemon analyses a spectrum aligned to its reference foil (energy + shift), but a
    recommended scan is driven on the monochromator's own, recorded axis: regions, the
    rescan and E0 were published in the aligned frame, every region off by the shift (a
    mono reading 6 eV low: the next scan was cut short of the model window). Expected: the
    same regions as for the spectrum recorded on a true axis, and noise measured as before."""
    e0 = 8985.0
    energy, mu = noisy_main_peak(e0)
    cfg = RecommenderConfig(noise_threshold=0.02)
    true = Recommender(manifest(), cfg).recommend(
        prediction(SURE, VAL_SURE, e0=e0), Spectrum(energy, mu, "Cu", "K")
    )
    recorded = Spectrum(energy - shift, mu, "Cu", "K")  # the mono reads shift eV low
    aligned = align(recorded, shift)  # as the daemon analyses it
    got = Recommender(manifest(), cfg).recommend(prediction(SURE, VAL_SURE, e0=e0), aligned)
    assert [r.name for r in got.regions] == [r.name for r in true.regions]
    want = [(r.start - shift, r.stop - shift, r.step) for r in true.regions]
    np.testing.assert_allclose([(r.start, r.stop, r.step) for r in got.regions], want, atol=2e-3)
    assert got.e0 == pytest.approx(e0 - shift)
    assert got.rescan is not None and true.rescan is not None
    assert got.rescan.start == pytest.approx(true.rescan.start - shift)
    assert got.noise == pytest.approx(true.noise)


def test_regions_are_kept_within_the_monochromators_range() -> None:
    """Nothing held a recommended region to what the monochromator can reach (a plan past
    its limit fails in the RE Manager). With ``mono_range``, on the recorded axis the mono
    drives, a region reaching out of it is clipped to it and one wholly outside is dropped,
    each saying so (the event lists the dropped ones); unset, nothing changes."""
    e0, shift = 8985.0, 4.0
    energy, mu = noisy_main_peak(e0)
    aligned = align(Spectrum(energy - shift, mu, "Cu", "K"), shift)  # the mono reads 4 eV low
    pred = prediction(SURE, VAL_SURE, e0=e0)
    free = Recommender(manifest(), RecommenderConfig(noise_threshold=0.02)).recommend(pred, aligned)
    lo, hi = 8900.0, 9005.0
    cfg = RecommenderConfig(noise_threshold=0.02, mono_range=(lo, hi))
    got = Recommender(manifest(), cfg).recommend(pred, aligned)
    note = f"clipped to the monochromator's range {lo:g}-{hi:g} eV"
    kept, dropped = {r.name: r for r in got.regions}, {r.name: r for r in got.dropped}
    assert sorted([*kept, *dropped]) == sorted(r.name for r in free.regions)
    for r in free.regions:
        if r.stop <= lo or r.start >= hi:
            assert "outside the monochromator's range" in dropped[r.name].reason
        elif r.start < lo or r.stop > hi:
            g = kept[r.name]
            assert (g.start, g.stop) == (max(r.start, lo), min(r.stop, hi)) and note in g.reason
            assert g.step <= r.step and g.dwell == r.dwell
        else:
            assert kept[r.name] == r
    # the pre-edge line starts at the range, the main peak ends at it, all above it is dropped
    assert kept["pre-edge line"].start == lo and kept["main peak"].stop == hi
    assert {"post-peak", "beyond"} <= set(dropped)
    e = got.energies()
    assert e.min() == lo and e.max() == hi and got.n_points < free.n_points
    assert free.rescan is not None and free.rescan.stop > hi
    assert got.rescan is not None and got.rescan.stop == hi and note in got.rescan.reason
    back = parse_recommendation_row(json.loads(json.dumps(recommendation_row(0, got))))
    assert [d["name"] for d in back["dropped"]] == list(dropped)
    assert free.dropped == [] and recommendation_row(0, free)["dropped"] == "[]"
    with pytest.raises(ValueError, match="mono_range"):
        RecommenderConfig(mono_range=(hi, lo))
    from xasflow.daemon.config_sections import RecommendConfig

    section = RecommendConfig.model_validate({"recommender": {"mono_range": [lo, hi]}})
    assert section.recommender.mono_range == (lo, hi)


def test_a_rescan_of_a_region_in_k_pieces_has_as_many_points_as_its_grid() -> None:
    """Above the edge a region is cut into pieces of growing step; its rescan covers it
    uniformly with the pieces' points, not all of it at the first piece's finest step."""
    e0 = 8985.0
    rng = np.random.default_rng(4)
    energy = np.arange(e0 - 160.0, e0 + 200.0, 0.3)
    mu = smooth_mu(energy, e0)
    far = energy >= e0 + 42.0
    mu[far] += rng.normal(0.0, 0.05, int(far.sum()))
    cfg = RecommenderConfig(noise_threshold=0.02, rescan_importance=0.0)
    rec = Recommender(manifest(), cfg).recommend(
        prediction(SURE, VAL_SURE), Spectrum(energy, mu, "Cu", "K")
    )
    assert rec.rescan is not None
    own = pieces(rec, rec.rescan.name)
    assert len(own) > 1 and own[0].step < own[-1].step
    assert (rec.rescan.start, rec.rescan.stop) == (own[0].start, own[-1].stop)
    assert rec.rescan.n_points == sum(r.n_points for r in own) - (len(own) - 1)


def test_an_ambiguous_edge_widens_the_margin() -> None:
    e0 = 8991.0
    energy = np.arange(e0 - 160.0, e0 + 130.0, 0.3)
    clean = Spectrum(energy, smooth_mu(energy, e0), "Cu", "K")
    assert e0_ambiguity(clean, e0, 10.0, 0.5) == 0.0
    # a shoulder 6 eV below the edge, nearly as steep: E0 may jump between the two
    shoulder = 0.4 * (0.5 + np.arctan((energy - e0 + 6.0) / 0.8) / np.pi)
    twin = Spectrum(energy, smooth_mu(energy, e0) + shoulder, "Cu", "K")
    assert e0_ambiguity(twin, e0, 10.0, 0.5) == pytest.approx(6.0, abs=0.3)
    # a coarse scan (4 eV steps across the edge): mu is straight between points, so the
    # smoothed derivative is flat to rounding on each segment; those ripples are no rivals
    coarse = np.concatenate(
        [
            np.arange(8800.0, 8960.0, 10.0),
            np.arange(8960.0, 9010.0, 4.0),
            np.arange(9010, 9300, 3.0),
        ]
    )
    for width in (1.0, 2.0, 3.0):
        edge = Spectrum(coarse, 1.0 / (1.0 + np.exp(-(coarse - 8981.3) / width)), "Cu", "K")
        assert e0_ambiguity(edge, find_e0(edge), 10.0, 0.5) == 0.0
    cfg = RecommenderConfig()
    pred = prediction(SURE, VAL_SURE, e0=e0)
    plain = Recommender(manifest(), cfg).recommend(pred, clean)
    wide = Recommender(manifest(), cfg).recommend(pred, twin)
    first = {r.name: r for r in plain.regions}["pre-edge"]
    assert first.start == pytest.approx(e0 - 3.5 - cfg.e0_margin)
    assert {r.name: r for r in wide.regions}["pre-edge"].start == pytest.approx(
        first.start - 6.0, abs=0.3
    )


def test_row_and_waveform_round_trip() -> None:
    rec = Recommender(manifest()).recommend(prediction(UNSURE, VAL_SURE))
    row = recommendation_row(5, rec)
    assert set(row) == set(RECOMMENDATION_KEYS)
    json.dumps(row)
    back = parse_recommendation_row(row)
    assert back["index"] == 5 and back["rescan"] is None
    assert row["out_of_domain"] is False and recommendation_row(5, rec, True)["out_of_domain"]
    assert [r["name"] for r in back["regions"]] == [r.name for r in rec.regions]
    assert waveform_regions(back["waveform"]) == [tuple(r.row()) for r in rec.regions]
    assert back["n_points"] == rec.n_points
    # every field comes back as the recommendation had it, a rescan and noise included
    e0 = 8985.0
    energy = np.arange(e0 - 160.0, e0 + 130.0, 0.3)
    mu = smooth_mu(energy, e0)
    main = (energy >= e0 + 11.5) & (energy <= e0 + 26.5)
    mu[main] += np.random.default_rng(3).normal(0.0, 0.05, int(main.sum()))
    cfg = RecommenderConfig(noise_threshold=0.02)
    noisy = Recommender(manifest(), cfg).recommend(
        prediction(SURE, VAL_SURE), Spectrum(energy, mu, "Cu", "K")
    )
    assert noisy.rescan is not None and noisy.noise
    back = parse_recommendation_row(json.loads(json.dumps(recommendation_row(7, noisy))))
    plain = noisy.to_dict()
    assert back["rescan"] == plain["rescan"] and back["noise"] == plain["noise"]
    assert back["regions"] == plain["regions"]
    assert (back["scan_time"], back["stop_early"], back["stop_reason"]) == (
        noisy.time,
        noisy.stop_early,
        noisy.stop_reason,
    )
    assert (back["uncertainty"], back["e0"], back["bundle_id"]) == (
        noisy.uncertainty,
        noisy.e0,
        noisy.bundle_id,
    )
    with pytest.raises(ValueError, match="4 numbers"):
        waveform_regions([1.0, 2.0, 3.0])
    json.dumps(rec.to_dict())


def test_the_noise_median_is_numpys() -> None:
    """``quality._median`` (one partition) gives ``np.median``'s number, odd and even sizes,
    ties and scales alike, and NaN when any value is NaN."""
    from xasflow.spectra.quality import _median

    rng = np.random.default_rng(3)
    for n in [*range(1, 40), 333, 1000]:
        for scale in (1e-4, 1.0, 1e5):
            x = rng.normal(0.0, scale, n)
            assert _median(x) == np.median(x)
            ties = np.round(x / scale, 1)
            assert _median(ties) == np.median(ties)
    assert math.isnan(_median(np.array([1.0, math.nan, 2.0, 3.0])))
    assert math.isnan(_median(np.array([math.nan, 1.0, 2.0])))
    for x in ([1.0, math.inf, 2.0], [-math.inf, 1.0, 2.0, math.inf], [math.inf, math.inf]):
        assert _median(np.array(x)) == np.median(x)


def test_noise_on_an_uneven_grid_is_not_the_edge_shape() -> None:
    """A clean edge with a white line on the uneven grid of the library's As scans (steps
    0.31, 0.61, 0.61 eV in turn): the 7-point quadratic fitted on the points' own energies
    reads its shape as 0.7 % of the step (an index-space Savitzky-Golay: 3 %, and a rescan,
    as for 30 of 232 clean library spectra); white noise is still recovered."""
    e0 = 11873.0
    energy = e0 - 60.0 + np.cumsum(np.tile([0.31, 0.61, 0.61], 140))
    x = energy - e0
    clean = 0.5 + np.arctan(x / 1.0) / np.pi + 1.5 * np.exp(-0.5 * ((x - 3.0) / 1.5) ** 2)
    assert estimate_noise(energy, clean, e0 - 4.5, e0 + 11.5, 1.0) < 0.01  # was 0.031
    rng = np.random.default_rng(11)
    noisy = clean + rng.normal(0.0, 0.01, energy.size)
    assert estimate_noise(energy, noisy, e0 + 20.0, e0 + 200.0, 1.0) == pytest.approx(0.01, rel=0.2)
    spectrum = Spectrum(energy, clean, "Cu", "K")
    rec = Recommender(manifest()).recommend(prediction(SURE, VAL_SURE, e0=e0), spectrum)
    assert rec.rescan is None and max(rec.noise.values()) < 0.01
