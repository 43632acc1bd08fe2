"""The decoder's rows: the fast constructors build the same frozen objects, rankings as defined."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xasflow.models.batch import TaskArrays
from xasflow.models.bundle import TaskSpec
from xasflow.models.results import Prediction, TaskResult, task_result


def test_task_result_and_prediction_make_equal_the_dataclasses_and_stay_frozen() -> None:
    fast = task_result(4, {"4": 0.9, "6": 0.1}, None, [4], None)
    slow = TaskResult(value=4, probabilities={"4": 0.9, "6": 0.1}, prediction_set=[4])
    assert fast == slow and fast.confidence == 0.9
    assert task_result(1.95, interval=(1.9, 2.0)) == TaskResult(1.95, interval=(1.9, 2.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.value = 6  # type: ignore[misc]
    args = ("b", "Cu", "K", 8979.0, 1.0, {"cn": fast}, ["out_of_domain"], 3.5)
    made = Prediction.make(*args)
    assert made == Prediction(*args) and made.out_of_domain and made["cn"] is fast
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.e0 = 0.0  # type: ignore[misc]


def test_ranking_rows_keep_the_outputs_above_threshold_in_order_lead_first() -> None:
    names = [f"m{k}" for k in range(6)]
    spec = TaskSpec(
        kind="multi_regressor", target="motifs", outputs=names, threshold=0.2, file="x.onnx"
    )
    rng = np.random.default_rng(3)
    values = rng.random((40, 6))
    values[0] = 0.05  # nothing above the threshold: the top output, an empty ranking
    leads = [None] * 20 + [names[int(k)] for k in rng.integers(0, 6, 20)]
    rows = TaskArrays(spec, values=values, lead=leads).results()
    for row, vals, lead in zip(rows, values, leads, strict=True):
        expected = sorted(
            ((n, v) for n, v in zip(names, vals.tolist(), strict=True) if v >= 0.2),
            key=lambda nv: -nv[1],
        )
        if lead is not None:
            expected = [(lead, float(vals[names.index(lead)]))] + [
                e for e in expected if e[0] != lead
            ]
        assert row.ranking == expected
        assert row.value == (expected[0][0] if expected else names[int(np.argmax(vals))])
