"""The trained bundle: its ONNX graphs, calibrated answers, integrity, Predictor and CLI.

A synthetic FEFF tree, its dataset, the model trained on it and its bundle (conftest, once
per session): dataset -> train -> ONNX bundle -> Predictor / CLI.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from xasflow.cli import main
from xasflow.models.bundle import BundleError, verify_bundle
from xasflow.models.predictor import Predictor
from xasflow.models.uncertainty import apply_temperature, combined_ood, spread_score
from xasflow.spectra import featurize, linear_matrix, model_input


def test_split_is_grouped_and_model_learns(trained) -> None:  # type: ignore[no-untyped-def]
    mats = {k: set(trained.dataset.material_id[v]) for k, v in trained.split.items()}
    assert not (mats["train"] & mats["test"]) and not (mats["val"] & mats["test"])
    cn = trained.tasks["cn"].metrics
    assert cn["accuracy"] >= 0.9 > cn["baseline_accuracy"]
    dist = trained.tasks["distance"].metrics
    assert dist["mae"] < dist["baseline_mae"]
    assert set(trained.tasks["cn"].region_importance) >= {
        "pre-edge",
        "main peak",
        "pre-edge + main peak",
    }


def test_onnx_equals_sklearn(trained, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = trained.config
    test = trained.split["test"]
    y = trained.gridded.y[test]
    X = featurize(y, cfg.features, cfg.prep, linear_matrix(cfg.features, cfg.prep))
    raw = Predictor(bundle).run(model_input(y, cfg.features, cfg.prep))
    for name, fit in trained.tasks.items():
        graph = raw.get(f"{name}.onnx.gz")  # a forest is exported where the task serves it
        if graph is None:
            continue
        if fit.kind == "classifier":
            np.testing.assert_allclose(
                graph["probabilities"], fit.estimator.predict_proba(X), atol=1e-5
            )
            assert list(graph["label"]) == list(fit.estimator.predict(X))
        else:
            expected = fit.estimator.predict(X).reshape(len(test), -1)
            np.testing.assert_allclose(graph["variable"], expected, rtol=1e-4, atol=1e-5)


def test_served_answers_carry_calibrated_doubt(trained, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    """The predictor's probabilities are the forest's, temperature-scaled as the manifest says;
    classifiers carry a conformal set holding the answer, regressors an interval around it."""
    cfg = trained.config
    test = trained.split["test"]
    y = trained.gridded.y[test]
    X = featurize(y, cfg.features, cfg.prep, linear_matrix(cfg.features, cfg.prep))
    predictor = Predictor(bundle)
    tasks, _ = predictor.infer(model_input(y, cfg.features, cfg.prep))
    cn_spec = predictor.manifest.tasks["cn"]
    choice = trained.choices["cn"]
    assert cn_spec.estimator == choice.estimator and cn_spec.temperature is not None
    assert [m.kind for m in cn_spec.members] == list(choice.members)
    assert set(choice.selection) >= {"extra_trees", "mlp", "cnn", "ensemble"}
    assert cn_spec.conformal is not None and cn_spec.conformal.alpha == pytest.approx(0.1)
    x = model_input(y, cfg.features, cfg.prep)
    raw = [
        trained.tasks["cn"].estimator.predict_proba(X)
        if member == "extra_trees"
        else trained.networks[member].predict(x)["cn"]
        for member in choice.members
    ]
    expected = apply_temperature(np.mean(raw, axis=0), cn_spec.temperature)
    # CN decides; its probabilities are exactly the calibrated served members' average
    np.testing.assert_allclose(tasks["cn"].probabilities, expected, atol=1e-4)
    sets = tasks["cn"].sets
    assert sets is not None and sets[np.arange(len(test)), tasks["cn"].index].all()
    dist = tasks["distance"]
    assert dist.interval is not None
    assert np.all(dist.interval[:, 0] < dist.values) and np.all(dist.values < dist.interval[:, 1])
    # the out-of-domain graph scores every row: in-domain test rows mostly pass, a spectrum
    # that is nothing like a Cu K edge (a slow ramp with a deep dip) is flagged
    assert predictor.manifest.ood is not None
    _, scores = predictor.infer(x)
    assert scores is not None and np.mean(scores > predictor.manifest.ood.threshold) < 0.5
    ood = predictor.manifest.ood
    if trained.ood_spread is not None:  # CN serves a network: its spread joins the score
        assert ood.spread is not None and ood.recon_scale is not None
        assert ood.method == "recon+spread"
        raw = predictor.run(x)
        spread = spread_score([raw[f][o] for f, o in ood.spread.outputs])
        expected = combined_ood(
            raw[ood.file][ood.output], ood.recon_scale, spread, ood.spread.scale
        )
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
    else:
        assert ood.spread is None and trained.choices["cn"].members == ("extra_trees",)
    odd = np.linspace(0.2, 1.2, cfg.prep.n_points) * (1 + 0.8 * np.sin(cfg.prep.grid / 3.0))
    _, odd_score = predictor.infer(model_input(odd[None, :], cfg.features, cfg.prep))
    assert odd_score is not None and odd_score[0] > predictor.manifest.ood.threshold
    # environment never contradicts CN
    cn_values = tasks["cn"].point()
    for cn_value, env in zip(cn_values, tasks["environment"].point(), strict=True):
        assert env.startswith(f"CN{cn_value}-") or not any(
            str(c).startswith(f"CN{cn_value}-")
            for c in predictor.manifest.tasks["environment"].classes
        )


def test_predictor_on_a_spectrum(dataset, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    predictor = Predictor(bundle)
    row = int(np.flatnonzero(dataset.material_id == "syn-CuO-3")[0])
    pred = predictor.predict(dataset.spectra[row])
    assert pred["cn"].value == 6
    assert sum(pred["cn"].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred["environment"].value == "CN6-octahedral"
    assert pred["motifs"].ranking[0][0] == "CN6-octahedral"
    assert 2.0 < pred["distance"].value < 2.2
    assert json.loads(json.dumps(pred.to_dict()))["tasks"]["cn"]["value"] == 6


def test_tampered_or_partial_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    # which graphs a task serves depends on the served choice; take two the manifest lists
    first, second = sorted(verify_bundle(copy).files)[:2]
    data = bytearray((copy / first).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / first).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{re.escape(first)} does not match its manifest hash"):
        Predictor(copy)
    shutil.copy(bundle / first, copy / first)
    verify_bundle(copy)
    (copy / second).unlink()
    with pytest.raises(BundleError, match=rf"missing file {re.escape(second)} \(partial bundle"):
        verify_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        verify_bundle(copy)


def test_cli_evaluate_and_predict(
    tree: Path, bundle: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XASFLOW_CACHE", str(cache))
    out = tmp_path / "eval.json"
    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(bundle),
                "--data",
                str(tree),
                "--json",
                str(out),
                "--report",
                str(report),
                "--jobs",
                "1",
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    # a bundle not trained on OmniXAS's tree owes it no citation (the report printed it always)
    assert "OmniXAS" not in (report / "report.md").read_text()
    assert metrics["element"] == "Cu" and metrics["scope"] == "test split"
    assert metrics["n_spectra"] > 0 and metrics["n_materials"] <= metrics["n_spectra"]
    for task, keys in {
        "cn": {"accuracy", "baseline_accuracy", "f1_macro"},
        "environment": {"accuracy", "jaccard", "baseline_accuracy"},
        "distance": {"mae", "r2", "baseline_mae"},
        "valence": {"accuracy", "baseline_accuracy"},
        "charge": {"mae", "r2"},
    }.items():
        assert keys <= set(metrics["tasks"][task]), task
    cn = metrics["tasks"]["cn"]
    assert cn["accuracy"] >= 0.9
    # the overall accuracy is the clear and the ambiguous labels' weighted together
    parts = [
        (cn.get(f"n_{k}_labels", 0), cn.get(f"accuracy_{k}_labels", 0.0))
        for k in ("clear", "ambiguous")
    ]
    n = sum(k for k, _ in parts)
    assert n == cn["n_test"] and sum(k * a for k, a in parts) / n == pytest.approx(cn["accuracy"])
    assert cn["ambiguous_label_fraction"] == pytest.approx(parts[1][0] / n)
    assert 0.0 <= cn["accuracy_in_label_set"] <= 1.0
    assert (report / "report.md").read_text().count("![") >= 4
    assert "of the sites are ambiguous" in (report / "report.md").read_text()
    assert (report / "confusion_cn.png").stat().st_size > 1000

    energy = np.arange(8960.0, 9120.0, 0.5)
    from synthetic_feff import model_mu

    good = tmp_path / "tetra.txt"
    np.savetxt(good, np.column_stack([energy, model_mu(energy, 8981.5, 1.0, 4.0, 2.34)]))
    short = tmp_path / "short.txt"
    np.savetxt(short, np.column_stack([energy[:60], model_mu(energy[:60], 8981.5, 1.0, 4.0, 2.34)]))
    capsys.readouterr()
    pred_json = tmp_path / "pred.json"
    assert (
        main(["predict", "--bundle", str(bundle), str(good), str(short), "--json", str(pred_json)])
        == 1  # one file of two failed: a script must see it
    )
    captured = capsys.readouterr()
    assert "short.txt: cannot predict (no_post_edge)" in captured.err
    assert "1 of 2 files could not be predicted" in captured.err
    assert "tetra.txt: E0" in captured.out and "cannot predict" not in captured.out
    preds = json.loads(pred_json.read_text())
    assert preds[str(good)]["tasks"]["cn"]["value"] == 4
    assert preds[str(short)]["error"] == "no_post_edge"
    # a --json that cannot be written: a message and exit 2 (1 means a file failed)
    assert main(["predict", "--bundle", str(bundle), str(good), "--json", str(good / "x")]) == 2
    assert "cannot write --json" in capsys.readouterr().err
    # measured spectra are no training data: the message says what --data takes
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(good)]) == 2
    assert "to analyse measured spectra use `xasflow predict FILE`" in capsys.readouterr().err


def test_cli_predict_herfd_broadens_before_predicting(
    tiny_cu_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xasflow predict --herfd [FWHM]``: the same sharp spectrum, declared HERFD, is broadened
    (tabulated Cu width, or the given FWHM) before prediction and comes out differently."""
    from synthetic_feff import model_mu

    energy = np.arange(8960.0, 9120.0, 0.25)
    sharp = tmp_path / "sharp.txt"  # a narrow white line, as HERFD records it
    np.savetxt(sharp, np.column_stack([energy, model_mu(energy, 8981.5, 1.6, 1.0, 1.85)]))
    out: dict[str, dict[str, Any]] = {}
    for label, extra in {"plain": [], "tabulated": ["--herfd"], "wide": ["--herfd=4"]}.items():
        path = tmp_path / f"{label}.json"
        args = ["predict", "--bundle", str(tiny_cu_bundle), str(sharp), *extra, "--json", str(path)]
        assert main(args) == 0
        out[label] = json.loads(path.read_text())[str(sharp)]
    text = capsys.readouterr().out
    assert "HERFD: broadened to the model's resolution (tabulated width)" in text
    assert "HERFD: broadened to the model's resolution (4 eV)" in text
    assert [out[k]["herfd"] for k in ("plain", "tabulated", "wide")] == [False, True, 4.0]
    plain, tabulated, wide = out["plain"], out["tabulated"], out["wide"]
    assert plain["e0"] != tabulated["e0"] != wide["e0"]
    assert plain["tasks"] != wide["tasks"]  # the model sees another spectrum
    with pytest.raises(SystemExit):
        main(["predict", "--bundle", str(tiny_cu_bundle), "--herfd", str(sharp)])
    assert "put the files before --herfd" in capsys.readouterr().err
    # a file named as HERFD, declared not to be: predicted as recorded, like the plain one
    named = tmp_path / "sharp_herfd.txt"
    named.write_text(sharp.read_text())
    path = tmp_path / "denied.json"
    args = ["predict", "--bundle", str(tiny_cu_bundle), str(named), "--no-herfd"]
    assert main([*args, "--json", str(path)]) == 0
    denied = json.loads(path.read_text())[str(named)]
    assert denied["herfd"] is False and denied["e0"] == plain["e0"]
