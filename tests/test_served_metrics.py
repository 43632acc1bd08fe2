"""A bundle's manifest reports the figures the bundle serves (xasflow.training.served_metrics)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from synthetic_feff import write_tree

from xasflow.models.bundle import verify_bundle
from xasflow.models.bundle_write import write_bundle
from xasflow.models.predictor import Predictor
from xasflow.training.dataset import Dataset, grid_dataset
from xasflow.training.evaluate import evaluate_bundle, predict_arrays, training_baselines
from xasflow.training.fit import task_targets
from xasflow.training.rebuild import training_data
from xasflow.training.scoring import MOTIF_NAMES, evaluate_task, trivial_answers
from xasflow.training.served_importance import served_region_importance
from xasflow.training.served_metrics import (
    IMPORTANCE_NOTE,
    METRICS_NOTE,
    rescore_bundle,
    with_served_metrics,
)
from xasflow.training.split import bundle_split


@pytest.fixture(scope="module")
def training_set(tiny_cu_bundle: Path) -> Dataset:
    """The tiny bundle's own synthetic FEFF tree, read again (its label cache beside it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XASFLOW_CACHE", str(tiny_cu_bundle.parent.parent / "cache"))
        return training_data(verify_bundle(tiny_cu_bundle))


def numbers(figures: dict[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in figures.items() if isinstance(v, int | float) and v is not True}


def test_an_exported_bundle_reports_what_evaluate_scores(
    tiny_cu_bundle: Path, training_set: Dataset
) -> None:
    """Every numeric figure of ``xasflow evaluate`` on the test split, calibration and
    conformal coverage included, is the manifest's: training used to write the candidates'
    raw figures (motif top-1 0.626 against 0.690 served on the shipped Cu bundle)."""
    manifest = verify_bundle(tiny_cu_bundle)
    ev = evaluate_bundle(Predictor(tiny_cu_bundle), training_set)
    assert ev.scope == "test split"
    for name, spec in manifest.tasks.items():
        assert spec.metrics == numbers(ev.tasks[name]), name
    assert {"ece", "set_coverage", "mean_set_size"} <= set(manifest.tasks["cn"].metrics)
    assert "interval_coverage" in manifest.tasks["distance"].metrics
    assert manifest.training["metrics"] == METRICS_NOTE


def test_rescoring_rewrites_the_metrics_and_nothing_else(
    tiny_cu_bundle: Path, training_set: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = verify_bundle(tiny_cu_bundle)
    files = {name: (tiny_cu_bundle / name).read_bytes() for name in manifest.files}
    wrong = {
        n: s.model_copy(update={"metrics": {"accuracy": 0.0}}) for n, s in manifest.tasks.items()
    }
    stale = write_bundle(tmp_path / "cu-k", manifest.model_copy(update={"tasks": wrong}), files)
    monkeypatch.setenv("XASFLOW_CACHE", str(tiny_cu_bundle.parent.parent / "cache"))
    said: list[str] = []
    rescore_bundle(stale, log=said.append)
    again = verify_bundle(stale)
    assert {n: s.metrics for n, s in again.tasks.items()} == {
        n: s.metrics for n, s in manifest.tasks.items()
    }
    assert again.files == manifest.files and again.bundle_id == manifest.bundle_id
    assert len(said) == len(manifest.tasks)
    # other data than the bundle learned from is refused, not scored
    other = write_tree(tmp_path / "other", per_type=3)
    with pytest.raises(ValueError, match="fingerprint"):
        rescore_bundle(stale, data=other, log=said.append)


def test_data_without_the_bundles_test_rows_leave_the_metrics_and_say_so(
    tiny_cu_bundle: Path, training_set: Dataset
) -> None:
    manifest = verify_bundle(tiny_cu_bundle)
    files = {name: (tiny_cu_bundle / name).read_bytes() for name in manifest.files}
    parts = bundle_split(training_set, manifest.training)
    trained_only = training_set.subset(parts["train"])  # same fingerprint, no test row
    other = dataclasses.replace(training_set, fingerprint="a-copy")  # not the bundle's split
    for data, why in ((trained_only, "test split"), (other, "test-split materials")):
        said: list[str] = []
        kept = with_served_metrics(manifest, files, data, said.append)
        assert kept.tasks == manifest.tasks
        assert kept.training["metrics"].startswith("tasks.*.metrics: not measured as served")
        assert len(said) == 1 and why in said[0]


def test_a_task_without_labelled_test_rows_reports_no_figures(
    tiny_cu_bundle: Path, training_set: Dataset
) -> None:
    """No NaN (JSON cannot carry it to /health) and no candidate figure left beside the
    served ones: a task evaluate cannot score on the test split has no metrics."""
    manifest = verify_bundle(tiny_cu_bundle)
    files = {name: (tiny_cu_bundle / name).read_bytes() for name in manifest.files}
    unlabelled = dataclasses.replace(
        training_set,
        valence=np.full(len(training_set), np.nan),
        distance=np.full(len(training_set), np.nan),
    )
    rescored = with_served_metrics(manifest, files, unlabelled, lambda _: None)
    assert rescored.tasks["valence"].metrics == {} == rescored.tasks["distance"].metrics
    assert rescored.tasks["cn"].metrics == manifest.tasks["cn"].metrics
    assert rescored.training["metrics"] == METRICS_NOTE


def test_a_signed_bundle_is_not_rescored_without_its_key(
    tiny_cu_bundle: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "cu-k"
    shutil.copytree(tiny_cu_bundle, copy)
    (copy / "manifest.sig").write_text("{}")
    with pytest.raises(ValueError, match="signed"):
        rescore_bundle(copy)


def test_the_trivial_answers_give_the_baselines_the_training_targets_give() -> None:
    """``evaluate_task`` with the recorded trivial answers scores the same baselines as with
    the training targets they came from, for every kind of task."""
    rng = np.random.default_rng(3)
    y_train = rng.choice([2, 4, 4, 6], 300)
    y_test, pred = rng.choice([2, 4, 6], 80), rng.choice([2, 4, 6], 80)
    motifs_train = rng.dirichlet(np.full(len(MOTIF_NAMES), 0.3), 300)
    motifs_test = rng.dirichlet(np.full(len(MOTIF_NAMES), 0.3), 80)
    cases = [
        ("cn", "classifier", pred, y_test, y_train),
        (
            "distance",
            "regressor",
            rng.normal(2, 0.1, 80),
            rng.normal(2, 0.1, 80),
            rng.normal(2.1, 0.1, 300),
        ),
        ("motifs", "multi_regressor", motifs_test[::-1], motifs_test, motifs_train),
    ]
    for name, kind, p, test, train in cases:
        trivial = json.loads(
            json.dumps(trivial_answers(name, kind, train))
        )  # as a manifest holds it
        with_rows = evaluate_task(name, kind, p, test, train)
        recorded = evaluate_task(name, kind, p, test, None, trivial=trivial)
        assert {k: v for k, v in recorded.items() if "baseline" in k} == {
            k: v for k, v in with_rows.items() if "baseline" in k
        }, name
    assert trivial_answers("cn", "classifier", y_train) == {"answer": 4}


def test_references_are_measured_against_the_training_rows_trivial_answers(
    tiny_cu_bundle: Path, training_set: Dataset, tmp_path: Path
) -> None:
    """Measured references are scored without the training rows: their baselines are the
    bundle's recorded trivial answers, not the best constant in hindsight on the scored set."""
    manifest = verify_bundle(tiny_cu_bundle)
    recorded = manifest.training["baselines"]
    assert recorded == training_baselines(manifest, training_set)
    # references none of which has the training rows' most common CN, so the recorded
    # answer scores 0 where the scored rows' own most common one would not
    others = np.flatnonzero(training_set.dominant_cn != recorded["cn"]["answer"])
    refs = dataclasses.replace(training_set.subset(others), fingerprint="refs", measured=True)
    ev = evaluate_bundle(Predictor(tiny_cu_bundle), refs)
    truth = ev.truths["cn"]
    assert truth.size and ev.tasks["cn"]["baseline_from"] == "training rows"
    assert ev.tasks["cn"]["baseline_accuracy"] == 0.0
    dist = ev.truths["distance"]
    assert abs(dist.mean() - recorded["distance"]["mean"]) > 1e-3  # another mean than theirs
    assert ev.tasks["distance"]["baseline_mae"] == pytest.approx(
        np.mean(np.abs(dist - recorded["distance"]["mean"]))
    )
    # a bundle from before the record: the scored rows' own (hindsight), and said so
    files = {name: (tiny_cu_bundle / name).read_bytes() for name in manifest.files}
    older = {k: v for k, v in manifest.training.items() if k != "baselines"}
    old = write_bundle(tmp_path / "old", manifest.model_copy(update={"training": older}), files)
    hindsight = evaluate_bundle(Predictor(old), refs).tasks["cn"]
    assert hindsight["baseline_from"] == "scored rows"
    modal = max(set(truth.tolist()), key=truth.tolist().count)
    assert hindsight["baseline_accuracy"] == np.mean(truth == modal) > 0.0


def test_region_importances_are_the_served_bundles_on_validation(
    tiny_cu_bundle: Path, training_set: Dataset
) -> None:
    """The recommender spends scan time by these: they are what the bundle, as served, loses
    on the validation split when a region is replaced by the training mean curve (here the
    distance MAE it gains); they were the float candidates' losses on the test split."""
    manifest = verify_bundle(tiny_cu_bundle)
    predictor = Predictor(tiny_cu_bundle)
    g = grid_dataset(training_set, manifest.prep)
    sub = training_set.subset(g.rows)
    parts = bundle_split(sub, manifest.training)
    _, target, valid = task_targets(sub, np.arange(len(sub)))["distance"]
    grid = manifest.prep.grid
    mean_curve = g.y[parts["train"]].mean(axis=0)

    def lost(rows: np.ndarray, lo: float, hi: float) -> float:
        rows = rows[valid[rows]]
        occluded = g.y[rows].copy()
        mask = (grid >= lo) & (grid < hi)
        occluded[:, mask] = mean_curve[mask]

        def mae(y: np.ndarray) -> float:
            return float(
                np.mean(np.abs(predict_arrays(predictor, y).point["distance"] - target[rows]))
            )

        return mae(occluded) - mae(g.y[rows])

    recorded = manifest.tasks["distance"].region_importance
    on_val = {name: lost(parts["val"], lo, hi) for name, (lo, hi) in manifest.regions.items()}
    on_test = {name: lost(parts["test"], lo, hi) for name, (lo, hi) in manifest.regions.items()}
    assert {name: recorded[name] for name in on_val} == pytest.approx(on_val)
    assert any(on_val.values()) and on_val != pytest.approx(on_test)
    assert manifest.training["region_importance"] == IMPORTANCE_NOTE
    again = served_region_importance(predictor, training_set)
    assert set(again) == set(manifest.tasks)
    for name, spec in manifest.tasks.items():
        assert spec.region_importance == pytest.approx(again[name]), name
