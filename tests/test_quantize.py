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


@pytest.fixture(scope="module")
def spread_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny MLP-serving Cu bundle whose out-of-domain score reads the CN networks' spread
    (``ood_spread``, no ligand score), its training tree and its label cache."""
    from synthetic_feff import write_tree

    from xasflow.training.bundle_export import export_bundle
    from xasflow.training.dataset import build_feff_dataset
    from xasflow.training.fit import TrainConfig, train

    base = tmp_path_factory.mktemp("spread")
    tree = write_tree(base / "feff", per_type=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XASFLOW_CACHE", str(base / "cache"))
        ds = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    small_mlp = {"members": 2, "hidden": [32, 32], "max_epochs": 30, "patience": 10}
    cfg = TrainConfig(
        n_estimators=12,
        n_jobs=1,
        test_fraction=0.3,
        val_fraction=0.15,
        split_by="material",
        networks=("mlp",),
        network_overrides={"mlp": small_mlp},
        ood_ligand=False,
        ood_spread=True,
        serve_tolerance=0.5,  # the MLP serves CN, so its spread joins the score
    )
    cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"copies": 1})})
    bundle = export_bundle(train(ds, cfg, log=lambda *_: None), base / "models" / "cu-k")
    return bundle, tree, base / "cache"


def test_spread_score_is_refitted_on_the_int8_graphs(
    spread_bundle: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spread score reads ``cn_std``, an output of the quantised graph: its scale and
    threshold stayed the float graph's while the validation scores moved (by up to 0.0086 on
    the review's tree). Expected: fitted again on the int8 graphs as training fits them."""
    from xasflow.models.bundle import read_manifest, verify_bundle
    from xasflow.models.bundle_write import write_bundle
    from xasflow.models.predictor import Predictor
    from xasflow.models.uncertainty import spread_score
    from xasflow.training.ood import fit_spread_ood
    from xasflow.training.quantize import quantize_bundle
    from xasflow.training.rebuild import rebuild

    src, tree, cache = spread_bundle
    monkeypatch.setenv("XASFLOW_CACHE", str(cache))
    before = verify_bundle(src)
    assert before.ood is not None and before.ood.spread is not None
    out = quantize_bundle(src, tmp_path / "q", data=tree, log=lambda _: None)
    after = verify_bundle(out)
    ood = after.ood
    assert ood is not None and ood.spread is not None and ood.recon_scale is not None
    assert ood.spread.outputs == before.ood.spread.outputs
    rebuilt = rebuild(before, tree)
    x = rebuilt.inputs("val").astype(np.float32)
    raw = Predictor(out).run(x)
    fraction = float(before.ood.details["flag_fraction"])
    fitted = fit_spread_ood(
        ood.spread.outputs,
        raw[ood.file][ood.output],
        spread_score([raw[f][o] for f, o in ood.spread.outputs]),
        fraction,
    )
    assert ood.spread.scale == pytest.approx(fitted.spread_scale, rel=1e-6)
    assert ood.threshold == pytest.approx(fitted.threshold, rel=1e-6)
    assert ood.recon_scale == pytest.approx(fitted.recon_scale, rel=1e-6)
    assert ood.spread.scale != before.ood.spread.scale  # the int8 cn_std differs
    # what the daemon computes from the int8 graphs flags validation as training's fit says
    scores = Predictor(out).infer(x)[1]
    assert scores is not None
    flagged = float(np.mean(scores > ood.threshold))
    assert flagged == ood.details["val_flagged_fraction"] == fitted.stats["val_flagged_fraction"]
    assert flagged <= fraction
    test_scores = Predictor(out).infer(rebuilt.inputs("test").astype(np.float32))[1]
    assert test_scores is not None
    test_flagged = float(np.mean(test_scores > ood.threshold))
    assert ood.details["test_flagged_fraction"] == pytest.approx(test_flagged)
    # a recorded spread scale the float graphs do not give back: refused, nothing written
    manifest = read_manifest(src)
    assert manifest.ood is not None and manifest.ood.spread is not None
    wrong = manifest.ood.spread.model_copy(update={"scale": manifest.ood.spread.scale * 2})
    bad_ood = manifest.ood.model_copy(update={"spread": wrong})
    files = {name: (src / name).read_bytes() for name in manifest.files}
    bad = write_bundle(tmp_path / "bad", manifest.model_copy(update={"ood": bad_ood}), files)
    with pytest.raises(ValueError, match="not the data or code"):
        quantize_bundle(bad, tmp_path / "out", data=tree, log=lambda _: None)
    assert not (tmp_path / "out").exists()
