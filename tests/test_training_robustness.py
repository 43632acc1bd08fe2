"""Review of the offline training half (dataset -> labels/cache -> split -> train -> export).

Every test here failed on the code it was written against (rev-train review); each says in a
comment what a user should get instead. Small synthetic trees only (a few seconds each).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from synthetic_feff import K_EDGES, XMU_HEADER, model_mu, poscar, write_tree

from xasflow.cli import main
from xasflow.training import dataset as D
from xasflow.training import labels as L
from xasflow.training.bundle_export import export_bundle
from xasflow.training.dataset import build_feff_dataset, label_cache_path
from xasflow.training.fit import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def _site_xmu(seed: int, e0_shift: float = 0.0) -> str:
    """A synthetic FEFF xmu.dat (model curve) for a Cu K site."""
    rng = np.random.default_rng(seed)
    e0 = K_EDGES["Cu"] + 1.0 + e0_shift + rng.normal(0, 0.3)
    energy = np.arange(e0 - 18.0, e0 + 130.0, 0.5)
    mu = model_mu(energy, e0, 1.0, 4.0, 2.3) + rng.normal(0, 0.004, energy.size)
    table = np.column_stack(
        [energy, energy - 9000, np.zeros_like(energy), mu, np.ones_like(mu), mu - 1]
    )
    return XMU_HEADER + "\n".join(" ".join(f"{v:.6f}" for v in row) for row in table) + "\n"


def _write_material(root: Path, mid: str, poscar_text: str, seed: int, site: int = 0) -> None:
    site_dir = root / mid / "FEFF-XANES" / f"{site:03d}_Cu"
    site_dir.mkdir(parents=True)
    (root / mid / "POSCAR").write_text(poscar_text)
    (site_dir / "xmu.dat").write_text(_site_xmu(seed))


def _small_cfg(**update: object) -> TrainConfig:
    cfg = TrainConfig(
        n_estimators=4,
        n_jobs=1,
        test_fraction=0.3,
        val_fraction=0.2,
        split_by="material",
        networks=(),
    )
    return cfg.model_copy(update=update)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 good materials of 3 formulas (Cu2O, CuCl, CuO), no broken items."""
    return write_tree(tmp_path_factory.mktemp("feff"), per_type=5, broken=False)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("XASFLOW_CACHE", str(path))
    return path


@pytest.fixture
def small_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``xasflow train`` fits the tests' small network ensembles (``small_config``'s), not the
    defaults: for CLI tests that check what the command writes, not what the networks learn
    (the defaults took some 10 s of the OmniXAS citation test)."""
    from synthetic_feff import small_config

    from xasflow.training import fit

    real, small = fit.train, small_config().network_overrides

    def train_small(ds: Any, cfg: TrainConfig, *args: Any, **kw: Any) -> Any:
        return real(ds, cfg.model_copy(update={"network_overrides": small}), *args, **kw)

    monkeypatch.setattr(fit, "train", train_small)


# --------------------------------------------------------------------------------------
# export


def test_export_refuses_to_replace_a_directory_that_is_not_a_bundle(
    tree: Path, tmp_path: Path, cache: Path
) -> None:
    # `xasflow train --out DIR` with an existing DIR that is not a bundle (a user's results
    # folder, or `--out models` meaning "put it in models/"): write_bundle renames DIR away
    # and rmtree's it (models/bundle.py), so every unrelated file in it is deleted
    # without a word. Expected: refuse (a clear error) unless DIR is empty or already a bundle.
    ds = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    result = train(ds, _small_cfg(), log=lambda *_: None)
    out = tmp_path / "my results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "other-bundle").mkdir()
    (out / "other-bundle" / "manifest.json").write_text("{}")
    with contextlib.suppress(Exception):  # a clear refusal is fine
        export_bundle(result, out, log=lambda *_: None)
    assert (out / "thesis.tex").exists(), "export deleted an unrelated file in --out"
    assert (out / "other-bundle" / "manifest.json").exists()


def test_single_class_task_does_not_abort_the_process(tmp_path: Path) -> None:
    # A small tree where every absorber has one environment (all tetrahedral CuCl-like, a
    # real case for a small single-phase set of another element): the 'environment' task
    # is a one-class *string* classifier; its ONNX graph aborts onnxruntime with a C++
    # assertion (SIGABRT, rc -6) while export_bundle scores the draft
    # (bundle_export.py -> served_metrics.py -> predictor). `xasflow train` dies with
    # no Python error and no bundle. Expected: a clear error naming the task (or the task
    # exported/skipped so that the bundle works) -- never a killed process.
    root = tmp_path / "feff"
    for k in range(12):
        _write_material(root, f"cucl-{k}", poscar("CuCl", 1.0 + 0.004 * (k - 6)), seed=k)
    script = textwrap.dedent(
        f"""
        import os
        os.environ["XASFLOW_CACHE"] = {str(tmp_path / "cache")!r}
        from xasflow.training.dataset import build_feff_dataset
        from xasflow.training.fit import TrainConfig, train
        from xasflow.training.bundle_export import export_bundle
        ds = build_feff_dataset({str(root)!r}, "Cu", n_jobs=1, progress=False)
        assert set(ds.dominant_cn.tolist()) == {{4}}
        cfg = TrainConfig(n_estimators=4, n_jobs=1, test_fraction=0.3, val_fraction=0.2,
                          split_by="material", networks=())
        export_bundle(train(ds, cfg, log=lambda *_: None), {str(tmp_path / "b" / "cu-k")!r},
                      log=lambda *_: None)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode >= 0, (
        f"process killed by signal {-proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    )


# --------------------------------------------------------------------------------------
# dataset / labels


def test_materials_with_the_same_dir_name_do_not_share_labels(
    tree: Path, tmp_path: Path, cache: Path
) -> None:
    # Two runs merged into one tree (batchA/m1 = CuO, batchB/m1 = Cu2O): the reader keeps
    # them apart by path, but material_id is the last path part (feff.py) and labels are
    # keyed (material_id, site) (dataset.py), so one material's labels are silently
    # given to the other (the CuO site comes out CN 2). Expected: distinct ids (e.g. the
    # relative path), or a 'duplicate_material' issue -- never another structure's labels.
    root = tmp_path / "merged"
    shutil.copytree(tree / "syn-CuO-0", root / "batchA" / "m1")
    shutil.copytree(tree / "syn-Cu2O-0", root / "batchB" / "m1")
    ds = build_feff_dataset(root, "Cu", n_jobs=1, progress=False)
    if len(ds) == 2:
        by_formula = dict(zip(ds.formula.tolist(), ds.dominant_cn.tolist(), strict=True))
        assert by_formula == {"CuO": 6, "Cu2O": 2}, by_formula
    else:
        assert any("duplicate" in i.reason for i in ds.issues), ds.issues


@pytest.mark.parametrize("damage", ["empty", "truncated", "bitflip"])
def test_a_damaged_label_cache_is_rebuilt(tree: Path, cache: Path, damage: str) -> None:
    # dataset.py says "stale or damaged cache: recompute" but catches only
    # OSError/KeyError/ValueError; an empty file raises EOFError, a truncated one
    # zipfile.BadZipFile, a flipped byte zlib.error -- every later build crashes until the
    # user finds and deletes the file. Expected: the damaged cache is ignored and rewritten.
    first = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    path = label_cache_path(first.fingerprint)
    good = path.read_bytes()
    bad = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "bitflip": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
    }[damage]
    path.write_bytes(bad)
    again = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    np.testing.assert_array_equal(again.dominant_cn, first.dominant_cn)


def test_labels_of_another_pymatgen_are_not_reused(
    tree: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The label cache was keyed on the input and LABELS_SCHEMA only: labels CrystalNN and
    # BVAnalyzer gave under another pymatgen (or multiplicities under another spglib) were
    # reused silently after an upgrade. Expected: the same versions reuse the cache, another
    # version labels again (into its own file: the old one still serves its version).
    import importlib.metadata

    real_labels, real_version = D.compute_labels, importlib.metadata.version
    calls: list[int] = []

    def counted(jobs, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(jobs))
        return real_labels(jobs, **kw)

    monkeypatch.setattr(D, "compute_labels", counted)
    first = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    assert calls == [15]  # the second build read the cache
    for builds, package in enumerate(("pymatgen", "spglib"), start=2):
        other = {package: "0.0.1"}
        monkeypatch.setattr(
            importlib.metadata, "version", lambda name, o=other: o.get(name) or real_version(name)
        )
        again = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
        assert calls == [15] * builds, (package, calls)  # every material labelled again
        np.testing.assert_array_equal(again.dominant_cn, first.dominant_cn)
    assert len(list(cache.glob("labels-*.npz"))) == 3


def test_a_lost_worker_is_not_cached_as_the_sites_label(
    tree: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compute_labels turns a dead dask worker (OOM kill, node lost) into 'worker_lost'
    # failures; _cached_labels saves them and, since failures count as "labelled"
    # (dataset.py `wanted <= set(labels)`), every later build reuses them: those sites
    # are dropped for good although nothing is wrong with them. Expected: transient failures
    # (worker_lost) are not cached, or are retried on the next build.
    real = D.compute_labels
    calls = {"n": 0}

    def flaky(jobs, **kw):  # type: ignore[no-untyped-def]
        labels, mult = real(jobs, **kw)
        calls["n"] += 1
        if calls["n"] == 1:  # the first build loses the worker of one material
            mid, _, sites = jobs[0]
            for s in sites:
                labels[(mid, s)] = L.LabelFailure(mid, s, "worker_lost", "KilledWorker(...)")
        return labels, mult

    monkeypatch.setattr(D, "compute_labels", flaky)
    first = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    assert first.issue_counts() == {"worker_lost": 1}
    second = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    assert "worker_lost" not in second.issue_counts(), second.issue_counts()
    assert len(second) == len(first) + 1


def test_concurrent_builds_of_one_tree_do_not_crash(
    tree: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both builds write the cache through the same fixed temp name (dataset.py,
    # `<cache>.tmp.npz`) and rename it: when a second build (another `xasflow train` with
    # other settings, a `dataset build`) finishes while the first is writing, the first's
    # rename fails with FileNotFoundError after all the labelling work. Simulated
    # deterministically: the second build runs while the first is inside savez.
    # Expected: a per-writer temp file; both builds succeed.
    real = np.savez_compressed
    nested = {"done": False}

    def savez(fh, **arrays):  # type: ignore[no-untyped-def]
        real(fh, **arrays)
        if not nested["done"]:
            nested["done"] = True
            build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)  # the other process

    monkeypatch.setattr(D.np, "savez_compressed", savez)
    ds = build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    assert len(ds) == 15


def test_a_file_name_that_is_not_utf8_does_not_crash_the_build(
    tree: Path, tmp_path: Path, cache: Path
) -> None:
    # Trees copied from old NFS/Windows shares can hold Latin-1 names (here an unrelated
    # notes file). fingerprint_path encodes every relative path as UTF-8 (dataset.py):
    # UnicodeEncodeError traceback, for any verb that reads the tree. Expected: the build
    # works (os.fsencode the path), or at worst a DatasetError naming the file.
    root = tmp_path / "tree"
    shutil.copytree(tree / "syn-CuO-0", root / "syn-CuO-0")
    (root / "syn-CuO-0" / os.fsdecode(b"notes-\xe9t\xe9.txt")).write_text("x")
    try:
        ds = build_feff_dataset(root, "Cu", n_jobs=1, progress=False)
    except D.DatasetError:
        return
    assert len(ds) == 1


def test_a_poscar_with_nan_coordinates_is_a_skipped_material_not_a_segfault(
    tree: Path, tmp_path: Path
) -> None:
    # A POSCAR from a relaxation that blew up (VASP writes NaN coordinates) parses in
    # pymatgen, and BVAnalyzer's spglib call then segfaults (labels.py via
    # label_jobs.py): with --jobs 1 `xasflow dataset build`/`train` die with SIGSEGV
    # (rc -11), with dask workers the site becomes 'worker_lost' (and is cached so).
    # Expected: the reader/labeller refuses non-finite coordinates: a 'bad_poscar' or
    # 'bad_structure' issue for that material, the others kept.
    root = tmp_path / "tree"
    shutil.copytree(tree / "syn-CuO-0", root / "good")
    shutil.copytree(tree / "syn-CuO-1", root / "nan")
    lines = (root / "nan" / "POSCAR").read_text().splitlines()
    lines[-1] = "nan nan nan O"
    (root / "nan" / "POSCAR").write_text("\n".join(lines) + "\n")
    script = textwrap.dedent(
        f"""
        import os
        os.environ["XASFLOW_CACHE"] = {str(tmp_path / "cache")!r}
        from xasflow.training.dataset import build_feff_dataset
        ds = build_feff_dataset({str(root)!r}, "Cu", n_jobs=1, progress=False)
        print(len(ds), sorted(ds.issue_counts()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr.strip()[-300:]}"
    assert proc.stdout.split()[0] == "1"


# --------------------------------------------------------------------------------------
# CLI


def test_cli_train_reports_an_empty_split_part_as_an_error_not_a_traceback(
    tree: Path, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # train() raises a helpful ValueError ("the split by formula left val, test empty ...
    # use --split-by material"), but cmd_train (cli.py) catches nothing, so the user
    # gets a Python traceback and exit status 1. Expected: "xasflow: error: ..." and exit 2,
    # as for every other user-fixable input problem.
    try:
        rc = main(
            ["train", "--data", str(tree), "--out", str(tmp_path / "cu-k"), "--jobs", "1",
             "--estimators", "4"]
        )  # fmt: skip
    except ValueError as exc:
        pytest.fail(f"traceback instead of a CLI error: ValueError: {exc}")
    assert rc == 2
    assert "--split-by material" in capsys.readouterr().err


def test_the_omnixas_citation_is_owed_by_the_omnixas_tree_only(
    tree: Path, tmp_path: Path, cache: Path, small_networks: None
) -> None:
    # cmd_train wrote the OmniXAS citation into the manifest of any bundle whose --data path
    # held "feff" (this synthetic tree's does), and every evaluation report printed it.
    # Expected: only data laid out as the OmniXAS tree (FEFF/<El>/<mp-id>) owe it.
    from xasflow.models.bundle import verify_bundle

    out = tmp_path / "cu-k"
    rc = main(
        ["train", "--data", str(tree), "--out", str(out), "--jobs", "1", "--estimators", "4",
         "--split-by", "material", "--align", "centroid"]
    )  # fmt: skip
    assert rc == 0 and "feff" in str(tree)
    assert verify_bundle(out).training["citation"] == ""
    # (the same training run:) --align reaches the manifest, so the daemon grids as trained
    assert verify_bundle(out).prep.align == "centroid"
    assert build_feff_dataset(tree, "Cu", n_jobs=1, progress=False).citation == ""
    omnixas = tmp_path / "omnixas" / "FEFF" / "Cu"
    for k, material in enumerate(sorted(tree.iterdir())):
        shutil.copytree(material, omnixas / f"mp-{1000 + k}")
    citation = build_feff_dataset(omnixas.parents[1], "Cu", n_jobs=1, progress=False).citation
    assert "OmniXAS" in citation and "Cu K-edge" in citation


def test_cli_train_on_a_set_without_valence_labels_is_a_clear_error(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An intermetallic set (here B2 CuAl at several lattice scalings): BVAnalyzer gives no
    # valence for any site, so the valence task has no labelled training row and sklearn's
    # "Found array with 0 sample(s) ... ExtraTreesClassifier" escapes as a traceback
    # (fit.py, `make_estimator(...).fit(Xf, yf)` on zero rows). Expected: a clear error
    # naming the task, or the task left out of the bundle with a logged reason.
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.vasp import Poscar

    root = tmp_path / "cual"
    for k in range(14):
        s = Structure(
            Lattice.cubic(2.95 * (1 + 0.004 * (k - 7))), ["Cu", "Al"], [[0, 0, 0], [0.5] * 3]
        )
        _write_material(root, f"cual-{k}", Poscar(s).get_str(), seed=k)
    try:
        rc = main(
            ["train", "--data", str(root), "--out", str(tmp_path / "cu-k"), "--jobs", "1",
             "--estimators", "4", "--split-by", "material"]
        )  # fmt: skip
    except ValueError as exc:
        pytest.fail(f"traceback instead of a CLI error: ValueError: {exc}")
    if rc != 0:
        assert rc == 2 and "valence" in capsys.readouterr().err
