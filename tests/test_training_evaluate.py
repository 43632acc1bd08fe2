"""Evaluating a bundle: its test materials, material averages, motif rankings, CN metrics.

A synthetic FEFF tree, its dataset, the model trained on it and its bundle (conftest, once
per session): dataset -> train -> ONNX bundle -> Predictor / CLI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from xasflow.models.predictor import Predictor
from xasflow.training import labels
from xasflow.training.dataset import grid_dataset


def test_macro_f1_is_scikit_learns() -> None:
    """A class only ever predicted (CN 8 here) counts, with F1 0, as in scikit-learn."""
    from sklearn.metrics import f1_score

    from xasflow.training.metrics import f1_macro

    truth, pred = [4, 4, 6, 6, 2], [4, 6, 6, 6, 8]
    assert f1_macro(truth, pred) == pytest.approx(f1_score(truth, pred, average="macro"))
    assert f1_macro(truth, pred) < f1_macro(truth, [4, 6, 6, 6, 4])


def test_evaluate_keeps_to_the_bundles_test_materials_on_other_copies_of_the_data(
    dataset, bundle: Path
) -> None:  # type: ignore[no-untyped-def]
    """Data whose fingerprint differs from the training data's (unpacked, recompressed,
    grown) still hold the bundle's training materials: the same split by material id keeps
    them out, instead of scoring every row (training rows included) as "external"."""
    from xasflow.models.predictor import Predictor
    from xasflow.training.evaluate import evaluate_bundle

    predictor = Predictor(bundle)
    own = evaluate_bundle(predictor, dataset)
    copy = evaluate_bundle(predictor, dataclasses.replace(dataset, fingerprint="a-copy"))
    assert own.scope == "test split" and copy.scope == "test-split materials"
    assert copy.n_spectra == own.n_spectra < len(dataset)
    assert copy.tasks["cn"]["accuracy"] == own.tasks["cn"]["accuracy"]
    # the split as trained: this bundle's is by material (its manifest says so); measured
    # references are never in a split, so every one of them is scored
    assert predictor.manifest.training["split_by"] == "material"
    assert own.n_spectra == len(trained_test_rows(predictor, dataset))
    measured = dataclasses.replace(dataset, fingerprint="refs", measured=True)
    external = evaluate_bundle(predictor, measured)
    assert external.n_spectra == len(dataset)
    # a measured reference's CN is no CrystalNN weight: no label-ambiguity figures for it
    assert "ambiguous_label_fraction" in own.tasks["cn"]
    assert "ambiguous_label_fraction" not in external.tasks["cn"]


def test_material_average_counts_the_materials_each_task_scored(dataset, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    """A test material without a valence label is not scored for valence in the site
    average, yet ``n_materials`` said every material for every task (394 for the Cu
    bundle's valence, scored on 326). Expected: each task's count of what it scored."""
    from xasflow.models.predictor import Predictor
    from xasflow.training.evaluate import evaluate_bundle

    predictor = Predictor(bundle)
    test = trained_test_rows(predictor, dataset)
    unlabelled = dataset.material_id[test][0]
    valence = np.where(dataset.material_id == unlabelled, np.nan, dataset.valence)
    ev = evaluate_bundle(predictor, dataclasses.replace(dataset, valence=valence))
    n = np.unique(dataset.material_id[test]).size
    assert ev.material_average["cn"]["n_materials"] == n
    assert ev.material_average["valence"]["n_materials"] == n - 1
    for metrics in ev.material_average.values():
        assert metrics["n_materials"] == metrics["n_test"]


def trained_test_rows(predictor: Predictor, dataset) -> np.ndarray:  # type: ignore[no-untyped-def]
    from xasflow.training.split import split_dataset

    t = predictor.manifest.training
    return split_dataset(
        dataset, t["split_salt"], t["test_fraction"], t["val_fraction"], "material"
    )["test"]


def test_evaluation_scores_the_motif_ranking_the_daemon_serves(dataset, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    """The served motif ranking leads with the CN-consistent label, even one under the
    threshold; evaluation scored the raw regressor scores instead (and lost the lead when it
    joined batches). Here every row's lead is a label the regressor ranks low."""
    from xasflow.training.evaluate import predict_arrays
    from xasflow.training.metrics import ranking_from_scores
    from xasflow.training.scoring import MOTIF_NAMES

    predictor = Predictor(bundle)
    served: list[Any] = []

    class LowLead:
        manifest = predictor.manifest

        def infer(self, x: np.ndarray) -> Any:
            tasks, ood = predictor.infer(x)
            motifs = tasks["motifs"]
            outputs = motifs.spec.outputs or []
            motifs.lead = [outputs[int(np.argmin(row))] for row in motifs.values]
            served.extend(r.ranking for r in motifs.results())
            return tasks, ood

    g = grid_dataset(dataset, predictor.manifest.prep)
    scored = predict_arrays(LowLead(), g.y, batch=5).point["motifs"]  # type: ignore[arg-type]
    sets = ranking_from_scores(scored, MOTIF_NAMES, predictor.manifest.tasks["motifs"].threshold)
    assert [MOTIF_NAMES[k] for k in np.argmax(scored, axis=1)] == [r[0][0] for r in served]
    assert [sorted(s) for s in sets] == [sorted(name for name, _ in r) for r in served]


def test_evaluation_cuts_the_motif_ranking_where_the_bundle_does(dataset, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    """A bundle whose motif ranking keeps only labels scoring 0.3 or more is scored on the
    rankings it serves (the Jaccard of those label sets), not on sets cut at the labels'
    own 0.05."""
    from xasflow.models.batch import decode_batch
    from xasflow.training.evaluate import evaluate_bundle
    from xasflow.training.metrics import jaccard, ranking_from_scores
    from xasflow.training.scoring import MOTIF_NAMES

    predictor = Predictor(bundle)
    m = predictor.manifest
    strict = m.model_copy(
        update={
            "tasks": {**m.tasks, "motifs": m.tasks["motifs"].model_copy(update={"threshold": 0.3})}
        }
    )
    served: list[list[str]] = []

    class Strict:
        manifest = strict

        def infer(self, x: np.ndarray) -> Any:
            tasks, ood = decode_batch(strict, predictor.run(x))
            served.extend([name for name, _ in r.ranking] for r in tasks["motifs"].results())
            return tasks, ood

    ev = evaluate_bundle(Strict(), dataset)  # type: ignore[arg-type]
    truth = ranking_from_scores(ev.truths["motifs"], MOTIF_NAMES, labels.MOTIF_THRESHOLD)
    served = served[: ev.n_spectra]  # the test rows; the material averages come after them
    assert len(truth) == ev.n_spectra
    assert ev.tasks["motifs"]["jaccard"] == pytest.approx(jaccard(truth, served))
    assert ev.tasks["motifs"]["jaccard"] != pytest.approx(
        evaluate_bundle(predictor, dataset).tasks["motifs"]["jaccard"]
    )


def test_cn_accuracy_by_how_clear_the_label_is() -> None:
    """Sites whose dominant CN holds under 60 % of CrystalNN's weight are scored apart, and
    an answer among the CNs of Zheng's ranked label (weight >= 0.2) counts in its own figure."""
    from xasflow.training.evaluate import cn_label_ambiguity

    w = np.zeros((4, 12))
    w[0, 3] = 1.0  # clear CN 4
    w[1, [3, 5]] = [0.55, 0.45]  # Jahn-Teller: 4 by a hair over 6
    w[2, [4, 5]] = [0.5, 0.5]  # 5 and 6 tie; the dominant label is 5
    w[3, [5, 7]] = [0.9, 0.1]  # clear CN 6
    out = cn_label_ambiguity(w, np.array([4, 6, 6, 8]), np.array([4, 4, 5, 6]))
    assert out == {
        "ambiguous_label_fraction": 0.5,
        "accuracy_in_label_set": 0.75,  # 6 is in both ambiguous labels; 8 (weight 0.1) is not
        "accuracy_clear_labels": 0.5,
        "n_clear_labels": 2,
        "accuracy_ambiguous_labels": 0.0,
        "n_ambiguous_labels": 2,
    }
    # answers as the decoder may give them: float or text classes, a blank answer
    as_floats = cn_label_ambiguity(w, np.array([4.0, 6.0, 6.0, 8.0]), np.array([4, 4, 5, 6]))
    assert as_floats == out
    mixed = cn_label_ambiguity(
        w, np.array(["4", "(none)", 6, 6], dtype=object), np.array([4, 4, 5, 6])
    )
    assert (mixed["accuracy_clear_labels"], mixed["accuracy_in_label_set"]) == (1.0, 0.75)
    assert cn_label_ambiguity(np.full((2, 12), np.nan), np.array([4, 4]), np.array([4, 6])) == {}
