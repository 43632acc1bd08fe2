"""Training data: FEFF trees, reference tables, MP documents, labels, splits, trainable tasks.

A synthetic FEFF tree, its dataset, the model trained on it and its bundle (conftest, once
per session): dataset -> train -> ONNX bundle -> Predictor / CLI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from synthetic_feff import small_config, write_tree

from xasflow.spectra import PrepParams
from xasflow.training.dataset import DatasetError, build_feff_dataset, grid_dataset
from xasflow.training.fit import TrainConfig, TrainError, train, untrainable
from xasflow.training.split import split_dataset


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


def _reference_table(tmp_path: Path, width: float, nn: float, rows: str) -> Any:
    """The dataset of a reference table ``rows`` (after its header line) whose ``a.txt`` is a
    synthetic Cu spectrum (white line ``width`` eV, neighbour distance ``nn`` A)."""
    from synthetic_feff import model_mu

    from xasflow.training.dataset import build_reference_dataset

    energy = np.arange(8950.0, 9120.0, 0.5)
    mu = model_mu(energy, 8984, 1.6, width, nn)
    np.savetxt(tmp_path / "a.txt", np.column_stack([energy, mu]))
    (tmp_path / "refs.csv").write_text(rows)
    return build_reference_dataset(tmp_path / "refs.csv")


def test_reference_table_dataset(tmp_path: Path) -> None:
    ds = _reference_table(
        tmp_path,
        6.0,
        2.1,
        "file,element,cn,motif,valence,distance\n"
        "a.txt,Cu,6,octahedral,2,2.10\n"
        "missing.txt,Cu,4,,1,\n"
        "a.txt,Cu,4,no such motif,,\n",
    )
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


def test_a_reference_table_takes_the_motif_as_predict_prints_it(tmp_path: Path) -> None:
    """``CN4-square co-planar`` (predict's words) is the motif ``square co-planar``; a CN prefix
    that the row's cn cell or the motif itself contradicts is the row's issue, said so, as is a
    bare motif name of another CN than the cn cell's (accepted without a word before)."""
    from xasflow.training.labels import MOTIFS

    ds = _reference_table(
        tmp_path,
        4.0,
        2.0,
        "file,element,cn,motif\n"
        "a.txt,Cu,4,CN4-square co-planar\n"
        "a.txt,Cu,,CN6-octahedral\n"
        "a.txt,Cu,4,square co-planar\n"
        "a.txt,Cu,6,CN4-square co-planar\n"
        "a.txt,Cu,,CN6-square co-planar\n"
        "a.txt,Cu,6,square co-planar\n",
    )
    square = MOTIFS.index((4, "square co-planar"))
    octahedral = MOTIFS.index((6, "octahedral"))
    assert len(ds) == 3
    assert [int(np.argmax(v)) for v in ds.motif_vector] == [square, octahedral, square]
    assert list(ds.dominant_cn[[0, 2]]) == [4, 4]
    assert [(i.item, i.reason) for i in ds.issues] == [
        ("refs.csv:5", "bad_reference"),
        ("refs.csv:6", "bad_reference"),
        ("refs.csv:7", "bad_reference"),
    ]
    assert "CN4" in ds.issues[0].detail and "cn cell says 6" in ds.issues[0].detail
    assert "square co-planar is a CN4 motif" in ds.issues[1].detail
    assert "is a CN4 motif but the cn cell says 6" in ds.issues[2].detail  # a bare name too
