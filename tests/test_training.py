"""End to end on a synthetic FEFF tree: dataset -> train -> ONNX bundle -> Predictor / CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from synthetic_feff import write_tree

from xasflow.cli import main
from xasflow.models.bundle import BundleError, verify_bundle
from xasflow.models.predictor import Predictor
from xasflow.models.uncertainty import apply_temperature, combined_ood, spread_score
from xasflow.spectra import PrepParams, featurize, linear_matrix, model_input
from xasflow.training import labels
from xasflow.training.bundle_export import export_bundle
from xasflow.training.dataset import DatasetError, build_feff_dataset, grid_dataset
from xasflow.training.fit import TrainConfig, TrainError, train, untrainable
from xasflow.training.split import split_dataset


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("feff"), per_type=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def dataset(tree: Path, cache: Path):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XASFLOW_CACHE", str(cache))
        return build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)


def small_config() -> TrainConfig:
    small = {"members": 2, "max_epochs": 30, "patience": 10}
    cfg = TrainConfig(
        n_estimators=12,
        n_jobs=1,
        test_fraction=0.3,
        val_fraction=0.15,
        split_by="material",  # the synthetic tree's 24 materials have three formulas
        networks=("mlp", "cnn"),
        network_overrides={"mlp": {**small, "hidden": [32, 32]}, "cnn": small},
        ood_spread=True,
    )
    return cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"copies": 1})})


@pytest.fixture(scope="module")
def trained(dataset):  # type: ignore[no-untyped-def]
    return train(dataset, small_config(), log=lambda *_: None)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(trained, tmp_path_factory.mktemp("b") / "cu-k")


def test_dataset_labels_and_issues(dataset, cache: Path) -> None:  # type: ignore[no-untyped-def]
    # 3 structure types x 8 scalings; the truncated spectrum and bad POSCAR are reported
    assert len(dataset) == 24
    assert sorted(np.unique(dataset.dominant_cn).tolist()) == [2, 4, 6]
    cuprite = dataset.material_id == "syn-Cu2O-0"
    assert dataset.dominant_cn[cuprite][0] == 2
    assert dataset.valence[cuprite][0] == 1
    assert dataset.distance[cuprite][0] == pytest.approx(4.27 * 0.98 * np.sqrt(3) / 4, abs=1e-3)
    counts = dataset.issue_counts()
    assert counts["truncated_xmu"] == 1 and counts["bad_poscar"] == 1
    assert list(cache.glob("labels-v1-*.npz")), "labels were not cached"
    # no weight at all is no label (as SiteLabels has it), not CN 1; unknown weights neither
    w = dataset.cn_vector.copy()
    w[0], w[1] = 0.0, np.nan
    odd = dataclasses.replace(dataset, cn_vector=w).dominant_cn
    assert odd[:2].tolist() == [0, 0] and (odd[2:] == dataset.dominant_cn[2:]).all()


def test_missing_element_is_a_clear_error(tree: Path) -> None:
    with pytest.raises(DatasetError, match="no Fe sites"):
        build_feff_dataset(tree, "Fe", n_jobs=1, progress=False)


def test_a_tree_of_l3_runs_is_an_l3_dataset_and_mixed_edges_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge comes from the runs (FEFF's header), not a hard-coded K: a bundle trained on
    L3 runs must not be filed under K, where the daemon would send K-edge spectra to it."""
    monkeypatch.setenv("XASFLOW_CACHE", str(tmp_path / "cache"))
    tree = write_tree(tmp_path / "feff", per_type=2, broken=False)
    runs = sorted(tree.rglob("xmu.dat"))
    for run in runs[:1]:
        run.write_text(run.read_text().replace(" K  shell", " L3 shell"))
    with pytest.raises(DatasetError, match="mixes Cu edges"):
        build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    for run in runs[1:]:
        run.write_text(run.read_text().replace(" K  shell", " L3 shell"))
    assert build_feff_dataset(tree, "Cu", n_jobs=1, progress=False).edge == "L3"


def test_training_says_which_labelled_spectra_it_could_not_prepare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that stops 30 eV above its edge cannot be normalised: it is left out of the
    training, and the log says so (it was dropped without a word)."""
    monkeypatch.setenv("XASFLOW_CACHE", str(tmp_path / "cache"))
    tree = write_tree(tmp_path / "feff", per_type=6, broken=False)
    run = sorted(tree.rglob("xmu.dat"))[0]
    lines = run.read_text().splitlines()
    head = [line for line in lines if line.startswith("#")]
    data = [line for line in lines if not line.startswith("#")]
    first = float(data[0].split()[0])
    run.write_text("\n".join(head + [r for r in data if float(r.split()[0]) < first + 48]) + "\n")
    ds = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    said: list[str] = []
    cfg = small_config().model_copy(update={"networks": ()})
    result = train(ds, cfg, log=said.append)
    assert len(result.gridded.issues) == 1 and len(result.dataset) == len(ds) - 1
    assert any("not prepared" in line and "no_post_edge" in line for line in said)


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


def test_formula_split_keeps_each_composition_on_one_side(dataset) -> None:  # type: ignore[no-untyped-def]
    """Duplicate Materials Project entries and polymorphs share a formula: grouped by it, no
    composition is on two sides, where grouping by id alone put each one on several."""
    from xasflow.training.split import split_dataset

    assert sorted(set(dataset.formula)) == ["Cu2O", "CuCl", "CuO"]
    assert dataset.formula[dataset.material_id == "syn-Cu2O-3"][0] == "Cu2O"
    for salt in ("a", "b", "c"):
        sides: dict[str, dict[str, set[str]]] = {"formula": {}, "material": {}}
        for by, seen in sides.items():
            for part, rows in split_dataset(dataset, salt, 0.3, 0.15, by=by).items():  # type: ignore[arg-type]
                for f in dataset.formula[rows]:
                    seen.setdefault(str(f), set()).add(part)
        assert all(len(parts) == 1 for parts in sides["formula"].values())
        assert any(len(parts) > 1 for parts in sides["material"].values())


def test_a_formula_split_that_leaves_a_part_empty_is_a_clear_error(dataset) -> None:  # type: ignore[no-untyped-def]
    """Three compositions hash (default salt) to 0.38, 0.62 and 0.78: nothing falls under the
    test fraction 0.3. Training said so with sklearn's "Found array with 0 sample(s)"."""
    cfg = small_config().model_copy(update={"split_by": "formula", "networks": ()})
    with pytest.raises(ValueError, match=r"left test empty \(3 groups.*--split-by material"):
        train(dataset, cfg, log=lambda *_: None)


def test_a_task_with_no_labelled_validation_row_is_left_out(dataset) -> None:  # type: ignore[no-untyped-def]
    """A task needs labelled rows in every split part (fit, choose and calibrate, score):
    without validation valence labels, training died in sklearn ("Found array with 0
    sample(s)"); now the task is left out with its reason, and the others are trained."""
    cfg = small_config().model_copy(update={"networks": ()})
    g = grid_dataset(dataset, cfg.prep)
    parts = split_dataset(
        dataset.subset(g.rows), cfg.split_salt, cfg.test_fraction, cfg.val_fraction, "material"
    )
    ds = dataclasses.replace(dataset, valence=dataset.valence.astype(float))
    ds.valence[g.rows[parts["val"]]] = np.nan
    result = train(ds, cfg, tasks=("cn", "valence"), log=lambda *_: None)
    assert set(result.tasks) == {"cn"}
    assert "no labelled validation spectrum" in result.skipped["valence"]
    assert untrainable("classifier", np.array([4, 4]), np.arange(2), np.arange(1), np.arange(1))
    with pytest.raises(TrainError, match=r"no task can be trained.*valence"):
        train(ds, cfg, tasks=("valence",), log=lambda *_: None)


def test_poscar_species_names_and_formulas() -> None:
    """VASP species names carry POTCAR suffixes (``Cu_pv``, ``Cu/5f3b``): the element counts
    and the formula are the element's, so the absorber count and the split group agree."""
    from xasflow.training.structures import element_count, poscar_formula

    head = "x\n1.0\n1 0 0\n0 1 0\n0 0 1\n"
    assert poscar_formula(head + "Cu_pv O\n4 4\ndirect\n") == "CuO"
    assert element_count(head + "Cu/5f3b O Cu_pv\n2 2 2\ndirect\n", "Cu") == 4
    assert poscar_formula(head + "Cu/5f3b O Cu_pv\n2 2 2\ndirect\n") == "Cu2O"
    assert poscar_formula("not a structure\n1.0\nCu\n1\n") == ""


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


def test_macro_f1_is_scikit_learns() -> None:
    """A class only ever predicted (CN 8 here) counts, with F1 0, as in scikit-learn."""
    from sklearn.metrics import f1_score

    from xasflow.training.metrics import f1_macro

    truth, pred = [4, 4, 6, 6, 2], [4, 6, 6, 6, 8]
    assert f1_macro(truth, pred) == pytest.approx(f1_score(truth, pred, average="macro"))
    assert f1_macro(truth, pred) < f1_macro(truth, [4, 6, 6, 6, 4])


def test_a_reference_table_refuses_a_cn_outside_the_label_range(tmp_path: Path) -> None:
    """CN 0 became CN 12 (index -1) and CN 13 an IndexError: both are a row's issue now."""
    from synthetic_feff import model_mu

    from xasflow.training.dataset import load_dataset

    energy = np.linspace(8900.0, 9150.0, 400)
    np.savetxt(
        tmp_path / "a.txt", np.column_stack([energy, model_mu(energy, 8981.5, 1.0, 4.0, 2.3)])
    )
    rows = ["file,element,cn", "a.txt,Cu,4", "a.txt,Cu,0", "a.txt,Cu,13"]
    (tmp_path / "refs.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "refs.csv", "Cu", n_jobs=1, progress=False)
    assert list(ds.dominant_cn) == [4]
    assert ds.issue_counts() == {"bad_reference": 2}


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


def test_mp_documents_dataset(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xasflow.training.dataset import load_dataset

    monkeypatch.setenv("XASFLOW_CACHE", str(cache))
    ds = load_dataset(
        Path(__file__).parent / "fixtures" / "mp_xas_docs.json", "Cu", n_jobs=1, progress=False
    )
    # the Fe document is filtered out, the one without a spectrum is reported
    assert list(ds.material_id) == ["mp-990001", "mp-990004"]
    assert ds.dominant_cn[0] >= 1 and np.isfinite(ds.distance[0])
    assert ds.issue_counts() == {"missing_spectrum": 1}
    # MP XANES end ~60 eV above E0: the default window (to +116.5 eV) cannot take them, which
    # is reported per spectrum when gridding; a Zheng-style 45 eV window can
    g = grid_dataset(ds, TrainConfig().prep)
    assert [i.reason for i in g.issues] == ["window", "window"] and len(g.rows) == 0
    g45 = grid_dataset(ds, PrepParams(window_stop=41.5, n_points=200))
    assert list(g45.rows) == [0, 1] and not g45.issues


def test_reference_table_dataset(tmp_path: Path) -> None:
    from synthetic_feff import model_mu

    from xasflow.training.dataset import build_reference_dataset

    energy = np.arange(8950.0, 9120.0, 0.5)
    np.savetxt(tmp_path / "a.txt", np.column_stack([energy, model_mu(energy, 8984, 1.6, 6.0, 2.1)]))
    (tmp_path / "refs.csv").write_text(
        "file,element,cn,motif,valence,distance\n"
        "a.txt,Cu,6,octahedral,2,2.10\n"
        "missing.txt,Cu,4,,1,\n"
        "a.txt,Cu,4,no such motif,,\n"
    )
    ds = build_reference_dataset(tmp_path / "refs.csv")
    assert len(ds) == 1 and ds.dominant_cn[0] == 6 and ds.valence[0] == 2
    assert ds.distance[0] == pytest.approx(2.10)
    details = sorted(i.detail for i in ds.issues)
    assert any("missing.txt" in d for d in details) and any("no such motif" in d for d in details)


def test_reference_table_keeps_to_one_element_and_edge(tmp_path: Path) -> None:
    """Rows of another element (by their cell, or their file's), of another edge, or of no
    known element are issues; without an element asked for, the first usable row's counts."""
    from synthetic_feff import model_mu

    from xasflow.training.dataset import DatasetError, build_reference_dataset

    energy = np.arange(8950.0, 9120.0, 0.5)
    np.savetxt(tmp_path / "a.txt", np.column_stack([energy, model_mu(energy, 8984, 1.6, 6.0, 2.1)]))
    header = "# XDI/1.0\n# Element.symbol: Cu\n# Element.edge: {}\n# Column.1: energy eV\n"
    for edge in ("K", "L3"):
        mu = model_mu(energy, 8984, 1, 6, 2)
        body = "".join(f"{e} {m}\n" for e, m in zip(energy, mu, strict=True))
        (tmp_path / f"{edge}.xdi").write_text(
            header.format(edge) + "# Column.2: mu\n#----\n# energy mu\n" + body
        )
    table = tmp_path / "refs.csv"
    table.write_text(
        "file,element,cn\na.txt,Ni,6\na.txt,Cu,6\na.txt,,4\nK.xdi,,4\nL3.xdi,,4\nK.xdi,Zn,4\n"
    )
    for element in ("Cu", "cu"):
        ds = build_reference_dataset(table, element)
        assert ds.element == "Cu" and list(ds.material_id) == ["a.txt", "K.xdi"] and ds.measured
        assert [(i.item, i.reason) for i in ds.issues] == [
            ("refs.csv:2", "other_element"),
            ("refs.csv:4", "no_element"),
            ("refs.csv:6", "other_edge"),
            ("refs.csv:7", "other_element"),
        ]
    first = build_reference_dataset(table)  # no element asked for: the first usable row's
    assert first.element == "Ni" and len(first) == 1
    assert first.issue_counts() == {"other_element": 4, "no_element": 1}
    with pytest.raises(DatasetError, match=r"no usable Zn reference rows.*refs.csv:3: other_el"):
        build_reference_dataset(table, "Zn")


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
