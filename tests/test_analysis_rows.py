"""An analysed spectrum's row (``analysis_rows.ok_row``): documents and JSON carry no NaN."""

from __future__ import annotations

import json
import math

from xasflow.daemon.analysis_rows import ok_row
from xasflow.models.results import Prediction, task_result


def test_a_probability_that_is_not_finite_is_none_in_the_row() -> None:
    """A class probability that is NaN or infinite (decoding never leaves one: this is the
    row's own guard) is None in ``cn_probability`` / ``valence_probability``, as every other
    number of the row is, not NaN in the documents and the catalog; finite ones stay."""
    results = {
        "cn": task_result(4, {"4": math.nan}),
        "valence": task_result(2, {"2": math.inf}),
    }
    row = ok_row(0, Prediction("b", "Cu", "K", 8990.0, 1.0, results))
    assert row["cn_probability"] is None and row["valence_probability"] is None
    assert json.loads(row["cn_probabilities"]) == {"4": None}
    fine = {"cn": task_result(4, {"4": 0.75, "6": 0.25}), "valence": task_result(2, {"2": 0.5})}
    row = ok_row(0, Prediction("b", "Cu", "K", 8990.0, 1.0, fine))
    assert (row["cn_probability"], row["valence_probability"]) == (0.75, 0.5)
