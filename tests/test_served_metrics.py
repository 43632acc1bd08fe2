"""A bundle's manifest reports the figures the bundle serves (xasflow.training.served_metrics)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from synthetic_feff import write_tree

from xasflow.models.bundle import verify_bundle, write_bundle
from xasflow.models.predictor import Predictor
from xasflow.training.dataset import Dataset
from xasflow.training.evaluate import evaluate_bundle
from xasflow.training.rebuild import training_data
from xasflow.training.served_metrics import METRICS_NOTE, rescore_bundle, with_served_metrics
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
