"""CN decides the CN-motif answers; where the bundle has no motif of that CN, none is given."""

from __future__ import annotations

import numpy as np

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
