"""Evaluation figures as the daemon serves the answers: a row the bundle answers nothing for,
or whose true class the model never saw, counts against it, never drops out of a figure."""

from __future__ import annotations

import numpy as np
import pytest

from xasflow.models.batch import TaskArrays
from xasflow.models.bundle import TaskSpec
from xasflow.training import calibrate as C
from xasflow.training.evaluate import BatchAnswers, uncertainty_metrics
from xasflow.training.scoring import MOTIF_NAMES, evaluate_task


def test_a_motif_ranking_with_no_served_top_is_a_top1_miss() -> None:
    """Where the bundle knows no motif of the CN it answered (CN 9, 10), the daemon serves
    no top motif (value None), yet top-1 accuracy scored the scores' argmax, which may be
    right. Expected: such a row is a miss for top-1; its ranking still counts for Jaccard."""
    truth = np.zeros((2, len(MOTIF_NAMES)))
    truth[:, 3] = 1.0
    pred = truth * 0.9  # the scores' argmax is the true motif on both rows
    both = evaluate_task("motifs", "multi_regressor", pred, truth, truth)
    one = evaluate_task(
        "motifs", "multi_regressor", pred, truth, truth, no_top=np.array([False, True])
    )
    assert both["top1_accuracy"] == 1.0
    assert one["top1_accuracy"] == 0.5
    assert one["jaccard"] == both["jaccard"] == 1.0


def test_ece_counts_rows_of_a_class_the_model_never_saw() -> None:
    """A CN test row of a class absent from training was left out of ECE (7 rows of the Cu
    test split), though accuracy counts it a miss. Expected: in ECE as a wrong answer at its
    top probability."""
    spec = TaskSpec(kind="classifier", file="g.onnx", target="cn", classes=[4, 6])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    arr = TaskArrays(spec, values=probs, index=probs.argmax(axis=1), probabilities=probs)
    answers = BatchAnswers(point={}, tasks={"cn": arr}, ood=None)
    truth = np.array([4, 6, 5], dtype=object)  # CN 5: never seen
    got = uncertainty_metrics(answers, {"cn": truth}, {"cn": np.ones(3, bool)})["cn"]["ece"]
    # equal-width bins: 0.9 right, 0.8 right, 0.7 wrong, each bin of one row
    want = (abs(1 - 0.9) + abs(1 - 0.8) + abs(0 - 0.7)) / 3
    assert got == pytest.approx(want)
    assert got > C.ece(probs[:2], np.array([0, 1]))
