"""The out-of-domain threshold bounded for a fresh split of unseen groups (ood_threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from xasflow.training.calibrate import conformal_quantile
from xasflow.training.ood_ligand import fit_ligand_ood
from xasflow.training.ood_threshold import (
    TooFewGroups,
    _refit,
    bound_for_split,
    bound_ligand_threshold,
    crossfit_scores,
    group_bound,
)

GRID = np.linspace(-3.5, 116.5, 240)


def _clustered(
    rng: np.random.Generator, n_groups: int, per: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose groups differ far more than their rows: an offset per group, small noise."""
    offset = np.repeat(rng.standard_t(4, n_groups), per)
    return offset + 0.2 * rng.normal(size=offset.size), np.repeat(np.arange(n_groups), per)


def _exceeds(threshold: float, rng: np.random.Generator, n_groups: int, trials: int) -> float:
    """How often a fresh split of ``n_groups`` groups has more than 5 % of its rows flagged."""
    return float(
        np.mean([(_clustered(rng, n_groups)[0] > threshold).mean() > 0.05 for _ in range(trials)])
    )


def test_group_bound_holds_for_fresh_splits_where_the_pooled_quantile_does_not() -> None:
    """At 90 % confidence about one fresh split in ten exceeds 5 % (0.07-0.24 over four pools:
    the pool is itself a sample); at the pooled quantile about half of them do."""
    rng = np.random.default_rng(0)
    pool, groups = _clustered(rng, 500)
    bound = group_bound(pool, groups, 0.05, n_groups=100, confidence=0.9)
    plain = conformal_quantile(pool, 0.05)
    assert bound > plain
    assert _exceeds(bound, rng, 100, 300) <= 0.25
    assert _exceeds(plain, rng, 100, 300) >= 0.4
    with pytest.raises(ValueError, match="confidence"):
        group_bound(pool, groups, 0.05, 100, confidence=1.0)
    with pytest.raises(ValueError, match="positive"):
        group_bound(pool, groups, 0.05, 0)


def test_crossfit_scores_each_row_without_its_group() -> None:
    groups = np.repeat(np.arange(30), 3)
    x = groups[:, None].astype(float)

    def score_without(fit: np.ndarray, held: np.ndarray) -> np.ndarray:
        assert not set(fit[:, 0]) & set(held[:, 0])
        return held[:, 0] * 10.0

    assert np.array_equal(crossfit_scores(x, groups, score_without), groups * 10.0)
    with pytest.raises(TooFewGroups, match="too few"):
        crossfit_scores(x[:27], groups[:27] % 9, score_without)


def _edge_groups(rng: np.random.Generator, n_groups: int, per: int = 4) -> np.ndarray:
    """Oxide-like edges whose white line and first-shell distance are set per group."""
    e = GRID[None, :]
    k = np.sqrt(0.2625 * np.clip(e, 0.0, None))
    height = np.repeat(rng.uniform(0.3, 0.9, n_groups), per)[:, None]
    dist = np.repeat(rng.normal(1.95, 0.06, n_groups), per)[:, None]
    y = 0.5 + np.arctan(e / 1.5) / np.pi + height * np.exp(-(((e - 2.0) / 3.0) ** 2))
    y = y + 0.08 * np.sin(2 * k * dist) * np.exp(-0.1 * k**2) * (e > 5)
    y = y + 0.004 * rng.normal(size=y.shape)
    return np.hstack([y, y[:, :2]])


def test_bound_for_split_records_its_rule_and_raises_the_threshold_on_grouped_spectra() -> None:
    rng = np.random.default_rng(1)
    x = _edge_groups(rng, 300)
    keys = np.repeat(np.arange(300), 4)
    parts = {"train": np.arange(0, 800), "val": np.arange(800, 1000), "test": np.arange(1000, 1200)}
    # the post-edge unsmoothed: smoothed, these edges' post-edge scores are one per group (their
    # white noise gone) and the cross-fit under-covers them (3.5 % flagged out of fold, 4.8 %
    # of fresh splits, 16 of 40 over 5 %); the shipped Cu bundle's test split: 4.4 %
    fitted = fit_ligand_ood(x[parts["train"]], x[parts["val"]], GRID, postedge_smooth_ev=0.0)
    bound = bound_for_split(fitted, x, keys, parts, confidence=0.9)
    stats = bound.stats
    assert stats["threshold_rule"] == "group bootstrap of cross-fitted scores"
    assert stats["fresh_groups"] == 50 and stats["pool_groups"] == 250
    assert stats["split_conformal_threshold"] == fitted.threshold
    assert stats["val_flagged_fraction"] == pytest.approx(np.mean(bound.flags(x[parts["val"]])))
    assert stats["crossfit_flagged_fraction"] <= 0.05
    assert bound.components is fitted.components and bound.scales == fitted.scales
    fresh = [_edge_groups(rng, 50) for _ in range(40)]
    assert np.mean([bound.flags(f).mean() > 0.05 for f in fresh]) <= 0.2
    assert np.mean([fitted.flags(f).mean() > 0.05 for f in fresh]) >= 0.4  # validation alone


def test_refit_reproduces_each_component_and_bad_confidence_is_refused_first() -> None:
    """The cross-fit refits each component as training fitted it: on the same rows, the same
    scores; a confidence outside (0, 1) is an error before any refit, never a fallback."""
    rng = np.random.default_rng(2)
    x = _edge_groups(rng, 100)
    fitted = fit_ligand_ood(x[:300], x[300:], GRID)
    for name, comp in fitted.components.items():
        again = _refit(comp, x[:300], x[300:])
        assert np.array_equal(again.score(x), comp.score(x)), name
    with pytest.raises(ValueError, match="confidence"):
        bound_ligand_threshold(fitted, x, np.repeat(np.arange(100), 4), 20, confidence=90.0)
