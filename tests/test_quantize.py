"""int8 network graphs: they follow the float graphs, the doubt is refitted on them, the bundle
re-seals, and a bundle whose calibration cannot be reproduced is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("sklearn")
pytest.importorskip("torch")
pytest.importorskip("pymatgen.core")


@pytest.fixture
def mlp_bundle(tiny_mlp_bundle: Path) -> tuple[Path, Path]:
    """The session's tiny MLP-serving Cu bundle and its label cache."""
    return tiny_mlp_bundle, tiny_mlp_bundle.parent.parent / "cache"


def test_quantized_bundle_follows_the_float_one(
    mlp_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xasflow.models.bundle import verify_bundle
    from xasflow.models.predictor import Predictor
    from xasflow.training.quantize import INT8, quantize_bundle
    from xasflow.training.rebuild import rebuild

    src, cache = mlp_bundle
    monkeypatch.setenv("XASFLOW_CACHE", str(cache))
    before = verify_bundle(src)
    served = {m.kind for t in before.tasks.values() for m in t.graph_members()}
    assert "mlp" in served, "the fixture must serve a network, or nothing is quantised"
    out = quantize_bundle(src, tmp_path / "q", log=lambda _: None)
    after = verify_bundle(out)
    for name, task in after.tasks.items():
        for m in task.graph_members():
            assert m.precision == (INT8 if m.kind == "mlp" else "float32"), (name, m)
    ops = {node.op_type for node in onnx.load(str(out / "mlp.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops
    assert (out / "mlp.onnx").stat().st_size < 0.7 * (src / "mlp.onnx").stat().st_size
    for name in before.files:  # tree and out-of-domain graphs are untouched
        if name != "mlp.onnx":
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    record = after.training["quantization"]["graphs"]["mlp.onnx"]
    for output, agree in record["validation_agreement"].items():
        assert agree["max_abs_diff"] < 0.02, output
        assert agree.get("argmax_agreement", 1.0) >= 0.95, output
    # the served answers on the held-out rows: the same classes, probabilities close
    x = rebuild(before).inputs("test").astype(np.float32)
    fa, fb = Predictor(src).infer(x)[0], Predictor(out).infer(x)[0]
    for name in ("cn", "environment", "valence"):
        assert np.mean(fa[name].index == fb[name].index) >= 0.95, name
        assert np.max(np.abs(fa[name].values - fb[name].values)) < 0.05, name
    with pytest.raises(ValueError, match="already quantised"):
        quantize_bundle(out, tmp_path / "again", log=lambda _: None)


def test_calibration_that_cannot_be_reproduced_is_refused(
    mlp_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recorded temperature the float graphs do not give back means other data or code: the
    int8 refit would calibrate something else, so nothing is written."""
    from xasflow.models.bundle import read_manifest
    from xasflow.models.bundle_write import write_bundle
    from xasflow.training.quantize import quantize_bundle

    src, cache = mlp_bundle
    monkeypatch.setenv("XASFLOW_CACHE", str(cache))
    manifest = read_manifest(src)
    cn = manifest.tasks["cn"]
    assert cn.temperature is not None
    tasks = {**manifest.tasks, "cn": cn.model_copy(update={"temperature": cn.temperature * 2})}
    files = {name: (src / name).read_bytes() for name in manifest.files}
    bad = write_bundle(tmp_path / "bad", manifest.model_copy(update={"tasks": tasks}), files)
    with pytest.raises(ValueError, match="not the data or code"):
        quantize_bundle(bad, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    signed = tmp_path / "signed"
    shutil.copytree(src, signed)
    (signed / "manifest.sig").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="signed"):
        quantize_bundle(signed, tmp_path / "out", log=lambda _: None)


def test_reexport_refuses_what_it_cannot_read(
    mlp_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-export reads float graphs in the per-member layout: an int8 bundle, or one whose
    graph was exported fused already, is refused with the reason, and nothing is written."""
    from xasflow.training.quantize import quantize_bundle
    from xasflow.training.reexport import reexport_bundle

    src, cache = mlp_bundle
    monkeypatch.setenv("XASFLOW_CACHE", str(cache))
    with pytest.raises(ValueError, match="needs no re-export"):
        reexport_bundle(src, tmp_path / "again", log=lambda _: None)
    int8 = quantize_bundle(src, tmp_path / "q", log=lambda _: None)
    with pytest.raises(ValueError, match="re-export the float bundle"):
        reexport_bundle(int8, tmp_path / "again", log=lambda _: None)
    assert not (tmp_path / "again").exists()
