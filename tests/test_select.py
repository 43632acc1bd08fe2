"""The latency-aware served choice and the spread-combined out-of-domain score."""

from __future__ import annotations

import numpy as np
import pytest

from xasflow.models import uncertainty as U
from xasflow.models.bundle import OodSpec, SpreadSpec
from xasflow.training.ood import fit_spread_ood
from xasflow.training.select import FOREST, NETWORKS, BaseOutputs, candidates, choose_task

CLASSES = [4, 6]


def _probs(right: np.ndarray, y: np.ndarray) -> BaseOutputs:
    """Probabilities that put 0.8 on the true class where ``right``, on the other elsewhere."""
    idx = np.where(right, (y == 6).astype(int), (y == 4).astype(int))
    p = np.full((len(y), 2), 0.2)
    p[np.arange(len(y)), idx] = 0.8
    return BaseOutputs(p)


def _bases(acc: dict[str, float], n: int = 400) -> tuple[dict[str, BaseOutputs], np.ndarray]:
    y = np.where(np.arange(n) % 2 == 0, 4, 6)
    out = {}
    for name, a in acc.items():
        right = np.arange(n) < round(a * n)
        out[name] = _probs(right, y)
    return out, y


def _choose(acc: dict[str, float], tolerance: float, n_se: float = 0.0):  # type: ignore[no-untyped-def]
    bases, y = _bases(acc)

    def score(pred: np.ndarray, rows: np.ndarray | None = None) -> float:
        return float(np.mean(pred.astype(int) == (y if rows is None else y[rows])))

    return choose_task(
        "cn", "classifier", CLASSES, bases, y, score, 0.1, "lac", tolerance, n_se=n_se
    )


def test_networks_average_is_a_candidate_beside_the_full_ensemble() -> None:
    bases, _ = _bases({FOREST: 0.8, "mlp": 0.8, "cnn": 0.8})
    cands = candidates(bases)
    assert set(cands) == {FOREST, "mlp", "cnn", NETWORKS, "ensemble"}
    assert cands[NETWORKS][0] == ("mlp", "cnn")
    assert set(candidates({"mlp": bases["mlp"], "cnn": bases["cnn"]})) == {"mlp", "cnn", "ensemble"}


def test_cheapest_candidate_within_tolerance_is_served() -> None:
    # the forest is best by 1 point; the MLP is within 2 % of it and ten times cheaper
    acc = {FOREST: 0.86, "mlp": 0.85, "cnn": 0.80}
    lazy = _choose(acc, tolerance=0.02)
    assert (lazy.estimator, lazy.members, lazy.candidate) == ("mlp", ("mlp",), "mlp")
    strict = _choose(acc, tolerance=0.0)
    assert strict.estimator in (FOREST, "ensemble") and FOREST in strict.members
    assert strict.selection[strict.candidate] == max(strict.selection.values())
    # out of tolerance the better one wins even when it costs more
    assert FOREST in _choose({FOREST: 0.90, "mlp": 0.80, "cnn": 0.80}, 0.02).members


def test_one_standard_error_rule_serves_the_cheaper_candidate_within_noise() -> None:
    """On 400 validation rows the best's accuracy (0.86) has a standard error of about 0.017:
    an MLP one point behind is served, one four points behind is not; the margin is kept."""
    acc = {FOREST: 0.86, "mlp": 0.85, "cnn": 0.80}
    within = _choose(acc, tolerance=0.0, n_se=1.0)
    assert within.members == ("mlp",)
    assert within.margin == pytest.approx(np.sqrt(0.86 * 0.14 / 400), rel=0.2)
    behind = _choose({FOREST: 0.86, "mlp": 0.82, "cnn": 0.80}, tolerance=0.0, n_se=1.0)
    assert FOREST in behind.members and behind.margin < 0.04
    assert _choose(acc, tolerance=0.0).members != ("mlp",)  # no rule: the best is served


def test_an_average_of_networks_is_served_as_an_ensemble() -> None:
    acc = {FOREST: 0.70, "mlp": 0.70, "cnn": 0.70}
    bases, y = _bases(acc)
    # the two networks are wrong on different rows: their average is right more often
    bases["mlp"] = _probs(np.arange(len(y)) % 4 != 1, y)
    bases["cnn"] = _probs(np.arange(len(y)) % 4 != 3, y)

    def score(pred: np.ndarray, rows: np.ndarray | None = None) -> float:
        return float(np.mean(pred.astype(int) == (y if rows is None else y[rows])))

    choice = choose_task("cn", "classifier", CLASSES, bases, y, score, 0.1, "lac", 0.0)
    assert choice.candidate in (NETWORKS, "ensemble")
    assert choice.estimator == "ensemble" and set(choice.members) >= {"mlp", "cnn"}


def test_spread_joins_the_reconstruction_score() -> None:
    rng = np.random.default_rng(0)
    recon, spread = rng.gamma(2.0, 1.0, 2000), rng.gamma(2.0, 0.1, 2000)
    fitted = fit_spread_ood([("mlp.onnx", "cn_std")], recon, spread, flag_fraction=0.05)
    assert fitted.stats["val_flagged_fraction"] <= 0.05
    fresh = fitted.score(rng.gamma(2.0, 1.0, 4000), rng.gamma(2.0, 0.1, 4000))
    assert np.mean(fresh > fitted.threshold) < 0.07
    # either signal alone flags: a typical shape with members far apart, or the reverse
    typical_r, typical_s = float(np.median(recon)), float(np.median(spread))
    odd = fitted.score(
        np.array([typical_r, 10 * recon.max()]), np.array([3 * spread.max(), typical_s])
    )
    assert np.all(odd > fitted.threshold)
    assert fitted.score(np.array([typical_r]), np.array([typical_s]))[0] < fitted.threshold
    assert U.combined_ood(np.array([np.nan]), 1.0, np.array([0.0]), 1.0)[0] == np.inf
    with pytest.raises(ValueError):
        fit_spread_ood([("mlp.onnx", "cn_std")], recon, spread[:10])


def test_manifest_spread_spec_is_checked_and_lists_its_graphs() -> None:
    spec = OodSpec(
        file="ood.onnx",
        method="recon+spread",
        threshold=1.2,
        recon_scale=0.1,
        spread=SpreadSpec(outputs=[("mlp.onnx", "cn_std"), ("cnn.onnx", "cn_std")], scale=0.3),
    )
    assert spec.files() == {"ood.onnx", "mlp.onnx", "cnn.onnx"}
    with pytest.raises(ValueError, match="together"):
        OodSpec(file="ood.onnx", method="recon", threshold=1.0, recon_scale=0.1)
    stds = [np.array([[0.1, 0.2], [0.0, 0.0]]), np.array([[0.3, 0.0], [0.2, 0.2]])]
    np.testing.assert_allclose(U.spread_score(stds), [0.3, 0.2])


def test_costs_can_be_overridden_for_ties() -> None:
    bases, y = _bases({FOREST: 0.8, "mlp": 0.8})

    def score(pred: np.ndarray, rows: np.ndarray | None = None) -> float:
        return float(np.mean(pred.astype(int) == (y if rows is None else y[rows])))

    args = ("cn", "classifier", CLASSES, bases, y, score, 0.1, "lac", 0.0)
    assert choose_task(*args).members == ("mlp",)  # a tie goes to the cheaper graph
    assert choose_task(*args, costs={FOREST: 0.0}).members == (FOREST,)


def test_primary_metric_is_evaluate_tasks_primary_score() -> None:
    """The served choice resamples a cheaper metric; it must be the very score it replaces."""
    from xasflow.training.scoring import MOTIF_NAMES, evaluate_task, primary_metric, primary_score

    rng = np.random.default_rng(3)
    cls_t, cls_p = rng.integers(2, 7, 300), rng.integers(2, 7, 300)
    reg_t, reg_p = rng.normal(2.0, 0.1, 300), rng.normal(2.0, 0.1, 300)
    mot_t = rng.dirichlet(np.ones(len(MOTIF_NAMES)) * 0.3, 300)
    mot_p = rng.dirichlet(np.ones(len(MOTIF_NAMES)) * 0.3, 300)
    for name, kind, t, p in (
        ("cn", "classifier", cls_t, cls_p),
        ("distance", "regressor", reg_t, reg_p),
        ("motifs", "multi_regressor", mot_t, mot_p),
    ):
        full = primary_score(name, kind, evaluate_task(name, kind, p, t, t))
        assert primary_metric(name, kind, p, t) == pytest.approx(full)
