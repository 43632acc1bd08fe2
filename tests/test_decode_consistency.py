"""CN decides the CN-motif answers; where the bundle has no motif of that CN, none is given."""

from __future__ import annotations

import numpy as np
import pytest

from xasflow.models.batch import TaskArrays, make_consistent
from xasflow.models.bundle import TaskSpec

ENV = ["CN4-square co-planar", "CN4-tetrahedral", "CN6-octahedral"]


def _spec(kind: str, **kw: object) -> TaskSpec:
    return TaskSpec(kind=kind, file="g.onnx", target="t", **kw)  # type: ignore[arg-type]


def _tasks(cn_probs: list[list[float]], env_probs: list[list[float]]) -> dict[str, TaskArrays]:
    cn_p, env_p = np.array(cn_probs), np.array(env_probs)
    cn = TaskArrays(
        _spec("classifier", classes=[4, 6, 9]),
        values=cn_p,
        index=cn_p.argmax(axis=1),
        probabilities=cn_p,
    )
    env = TaskArrays(
        _spec("classifier", classes=ENV),
        values=env_p,
        index=env_p.argmax(axis=1),
        probabilities=env_p,
        sets=env_p >= 0.3,
    )
    scores = np.array([[0.2, 0.1, 0.7]] * len(cn_probs))
    motifs = TaskArrays(_spec("multi_regressor", outputs=ENV, threshold=0.15), values=scores)
    return {"cn": cn, "environment": env, "motifs": motifs}


def test_the_cn_answer_decides_the_motif_or_leaves_it_blank() -> None:
    tasks = _tasks(
        cn_probs=[[0.8, 0.2, 0.0], [0.1, 0.1, 0.8]],  # CN 4; CN 9 (no motif of CN 9 known)
        env_probs=[[0.1, 0.3, 0.6], [0.2, 0.1, 0.7]],  # both rows' top label is octahedral
    )
    make_consistent(tasks)
    env = tasks["environment"].results()
    motifs = tasks["motifs"].results()
    # row 0: the most probable CN-4 label, added to its set; the ranking leads with it
    assert env[0].value == "CN4-tetrahedral"
    assert env[0].prediction_set == ["CN4-tetrahedral", "CN6-octahedral"]
    assert motifs[0].value == "CN4-tetrahedral"
    assert next(name for name, _ in motifs[0].ranking or []) == "CN4-tetrahedral"
    # row 1: CN 9 has no label, so neither answer names one of another CN
    assert env[1].value is None and motifs[1].value is None
    assert env[1].probabilities == dict(zip(ENV, [0.2, 0.1, 0.7], strict=True))
    assert env[1].prediction_set == ["CN6-octahedral"]  # the calibrated set, untouched
    assert [name for name, _ in motifs[1].ranking or []] == [
        "CN6-octahedral",
        "CN4-square co-planar",
    ]
    assert list(tasks["environment"].point()) == ["CN4-tetrahedral", None]


def test_a_classifier_is_calibrated_as_the_public_functions_say_and_refuses_nan() -> None:
    """``decode_task`` checks a batch's probabilities once and then calibrates without checking
    again: its answers equal ``apply_temperature`` and ``prediction_sets`` step by step, and a
    graph output with NaN still raises (the daemon rejects the spectrum ``prediction_error``)."""
    from xasflow.models.batch import decode_task
    from xasflow.models.bundle import ConformalSpec
    from xasflow.models.uncertainty import apply_temperature, prediction_sets

    spec = _spec(
        "classifier",
        classes=[4, 6, 9],
        temperature=1.7,
        conformal=ConformalSpec(alpha=0.1, method="lac", qhat=0.8),
    )  # one tree graph "g.onnx" (output "probabilities")
    raw = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.0, 0.0, 2.0]], dtype=np.float32)
    got = decode_task(spec, {"g.onnx": {"probabilities": raw}}, 3)
    p = raw.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    expected = apply_temperature(p, 1.7)
    assert np.array_equal(got.probabilities, expected)
    assert np.array_equal(got.sets, prediction_sets(expected, 0.8, "lac"))
    assert got.index.tolist() == [0, 1, 2]
    raw[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        decode_task(spec, {"g.onnx": {"probabilities": raw}}, 3)


def test_the_motif_set_keeps_only_motifs_of_a_cn_in_the_cn_set() -> None:
    """A 90 % CN set {4} beside a motif set {CN4-tetrahedral, CN6-octahedral} told an
    operator two things at once: the motif set drops the CN-6 label. A row whose CN set has
    no motif label at all (CN 9 alone) keeps its calibrated motif set."""
    tasks = _tasks(
        cn_probs=[[0.8, 0.2, 0.0], [0.5, 0.5, 0.0], [0.0, 0.1, 0.9]],
        env_probs=[[0.1, 0.4, 0.5], [0.1, 0.4, 0.5], [0.1, 0.4, 0.5]],
    )
    tasks["cn"].sets = np.array([[True, False, False], [True, True, False], [False, False, True]])
    make_consistent(tasks)
    sets = [r.prediction_set for r in tasks["environment"].results()]
    assert sets == [
        ["CN4-tetrahedral"],
        ["CN4-tetrahedral", "CN6-octahedral"],
        ["CN4-tetrahedral", "CN6-octahedral"],
    ]
