"""Served graphs: unread outputs pruned and the files joined, with the very same answers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from xasflow import paths
from xasflow.models.graphs import join, prune
from xasflow.models.predictor import Predictor

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"


def _inputs(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    grid = np.linspace(-3.5, 116.5, 240)
    y = (
        0.5
        + np.arctan(grid / 1.5) / np.pi
        + rng.uniform(0.3, 0.9, (n, 1)) * np.exp(-(((grid - 2) / 3) ** 2))
    )
    return np.hstack([y, np.full((n, 1), 2.0), y.max(axis=1, keepdims=True)]).astype(np.float32)


def test_served_session_gives_the_whole_files_answers_bit_for_bit() -> None:
    served, whole = Predictor(BUNDLE), Predictor(BUNDLE, all_outputs=True)
    assert len(served._sessions) == 1 and len(whole._sessions) == 2  # mlp and ood joined
    x = _inputs(17)
    got, want = served.run(x), whole.run(x)
    wanted = served.manifest.served_outputs()
    assert {f: set(o) for f, o in got.items()} == wanted
    assert "embedding" in want["mlp.onnx"] and "cn_std" in want["mlp.onnx"]
    for file, outputs in got.items():
        for name, value in outputs.items():
            assert np.array_equal(value, want[file][name]), (file, name)
    a, b = served.infer(x), whole.infer(x)
    assert np.array_equal(a[1], b[1])
    for task in a[0]:
        assert np.array_equal(a[0][task].values, b[0][task].values), task


def _tiny(name: str, opset: int, input_name: str = "x") -> onnx.ModelProto:
    nodes = [
        helper.make_node("Neg", [input_name], ["neg"]),
        helper.make_node("Abs", [input_name], ["abs"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["n", 2])],
        [
            helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, ["n", 2])
            for o in ("neg", "abs")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_prune_and_join_keep_names_and_refuse_what_cannot_share_a_graph() -> None:
    pruned = prune(_tiny("a", 17), ["abs"])
    assert [n.op_type for n in pruned.graph.node] == ["Abs"] and [
        o.name for o in pruned.graph.output
    ] == ["abs"]
    with pytest.raises(ValueError, match="no output"):
        prune(_tiny("a", 17), ["nothing"])
    joined = join({"a.onnx": _tiny("a", 17), "b.onnx": pruned}, "x")
    assert joined is not None
    model, names = joined
    assert sorted(names.values()) == [("a.onnx", "abs"), ("a.onnx", "neg"), ("b.onnx", "abs")]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-1.5, 2.0]], np.float32)
    got = dict(
        zip([names[o.name] for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True)
    )
    assert np.array_equal(got[("a.onnx", "neg")], -x) and np.array_equal(
        got[("b.onnx", "abs")], abs(x)
    )
    assert join({"a.onnx": _tiny("a", 17), "b.onnx": _tiny("b", 13)}, "x") is None
    assert join({"a.onnx": _tiny("a", 17), "b.onnx": _tiny("b", 17, "y")}, "x") is None
