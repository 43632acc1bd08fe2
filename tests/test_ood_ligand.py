"""Ligand-aware out-of-domain score: synthetic edges, ONNX parity, bundle upgrade, measured Cu."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from xasflow import paths
from xasflow.models import uncertainty as U
from xasflow.spectra import model_input
from xasflow.training.ood import fit_ood
from xasflow.training.ood_ligand import METHOD, fit_ligand_ood, fit_whiteline

GRID = np.linspace(-3.5, 116.5, 240)


def _edges(
    n: int, rng: np.random.Generator, white: tuple[float, float], r: float, noise: float = 0.004
) -> np.ndarray:
    """Normalised K edges on ``GRID`` (with the 2 scalar columns of the model input): an
    arctangent step, a white line of height in ``white`` at E0+2 eV, and post-edge
    oscillations sin(2kR) damped with k, from first-shell distances around ``r`` (Angstrom),
    with point noise of ``noise`` (edge steps)."""
    e = GRID[None, :]
    k = np.sqrt(0.2625 * np.clip(e, 0.0, None))
    height = rng.uniform(*white, size=(n, 1))
    dist = r + rng.normal(0, 0.04, size=(n, 1))
    phase = rng.uniform(-0.3, 0.3, size=(n, 1))
    y = 0.5 + np.arctan(e / 1.5) / np.pi
    y = y + height * np.exp(-(((e - 2.0) / 3.0) ** 2))
    y = y + 0.08 * np.sin(2 * k * dist + phase) * np.exp(-0.1 * k**2) * (e > 5)
    y = y + noise * rng.normal(size=y.shape)
    return np.hstack([y, y[:, :2]]).astype(np.float32)


def _oxides(n: int, rng: np.random.Generator) -> np.ndarray:
    return _edges(n, rng, (0.3, 0.9), 1.95)


def test_weak_white_line_flagged_where_the_shape_score_is_blind() -> None:
    """Oxide-like oscillations without a white line (a sulfide's weak edge) lie close to the
    oxides' principal subspace, so the reconstruction score passes most of them; the
    combined score flags all by their white line, and still passes fresh oxides, also with
    a 15 % edge-step error. A longer first-shell bond (2.3 instead of 1.95 A) compresses the
    post-edge oscillations, which the post-edge component flags (half of them with its
    default smoothing, all without)."""
    rng = np.random.default_rng(0)
    tr, va = _oxides(1200, rng), _oxides(400, rng)
    fitted = fit_ligand_ood(tr, va, GRID)
    assert fitted.method == METHOD
    assert fitted.stats["val_flagged_fraction"] <= 0.05
    fresh = _oxides(1000, rng)
    assert fitted.flags(fresh).mean() <= 0.08
    # an edge-step error moves no component (each divides by the spectrum's own level)
    assert fitted.flags(fresh[:200] * 0.85).mean() <= 0.1
    assert fitted.flags(fresh[:200] * 1.15).mean() <= 0.1
    weak = _edges(50, rng, (0.0, 0.05), 1.95)
    base = fit_ood(tr, va, grid=GRID)
    assert base.flags(weak).mean() < 0.5  # the shape score alone misses most of them
    assert fitted.flags(weak).all()
    assert (fitted.component_scores(weak)["whiteline"] > fitted.threshold).all()
    long_bond = _edges(50, rng, (0.3, 0.9), 2.3)
    parts = fitted.component_scores(long_bond)
    assert (parts["whiteline"] > fitted.threshold).mean() <= 0.1  # as for any oxide
    # on these edges (white noise the only shape beyond a few components) the 3 eV smoothing
    # costs sensitivity: half the long bonds flagged by the post-edge, all without smoothing
    # (on the shipped Cu data it raised CuCl's post-edge score, 2.7 -> 4.0 thresholds)
    assert (parts["postedge"] > fitted.threshold).mean() >= 0.45
    plain = fit_ligand_ood(tr, va, GRID, postedge_smooth_ev=0.0)
    assert (plain.component_scores(long_bond)["postedge"] > plain.threshold).mean() >= 0.9


def _wobbled(x: np.ndarray, rng: np.random.Generator, amp: float = 0.01) -> np.ndarray:
    """``x`` with a smooth random deviation (Gaussian-filtered noise, sigma 8 columns, rms
    ``amp``): what a FEFF spectrum's shape has beyond a few principal components."""
    from scipy.ndimage import gaussian_filter1d

    w = gaussian_filter1d(rng.normal(size=x.shape), 8.0, axis=1)
    out = x + amp * w / w.std()
    out[:, -2:] = out[:, :2]
    return out.astype(np.float32)


def test_postedge_smoothing_passes_point_noise_and_still_flags_a_long_bond() -> None:
    """Training spectra whose residual shape is smooth (as FEFF's), fresh ones with point
    noise of 1 % of the step on every column: the unsmoothed post-edge score flags all of
    them (median ~8x the threshold), the default smoothing (3 eV) few (median 0.5x), while a
    clean 2.3 A bond's oscillations stay past the threshold."""
    rng = np.random.default_rng(5)
    tr = _wobbled(_edges(1200, rng, (0.3, 0.9), 1.95, noise=0.0), rng)
    va = _wobbled(_edges(400, rng, (0.3, 0.9), 1.95, noise=0.0), rng)
    noisy = _wobbled(_edges(200, rng, (0.3, 0.9), 1.95, noise=0.01), rng)
    long_bond = _wobbled(_edges(50, rng, (0.3, 0.9), 2.3, noise=0.0), rng)
    plain = fit_ligand_ood(tr, va, GRID, postedge_smooth_ev=0.0)
    assert "smooth_columns" not in plain.spec()["components"]["postedge"]
    assert (plain.component_scores(noisy)["postedge"] > plain.threshold).mean() >= 0.95
    fitted = fit_ligand_ood(tr, va, GRID)
    assert fitted.spec()["components"]["postedge"]["smooth_columns"] == pytest.approx(
        3.0 / (GRID[1] - GRID[0])
    )
    post = fitted.component_scores(noisy)["postedge"]
    assert (post > fitted.threshold).mean() <= 0.15
    assert np.median(post) < 0.7 * fitted.threshold
    assert np.median(fitted.component_scores(long_bond)["postedge"]) > fitted.threshold


def test_whiteline_deficit_definition_and_checks() -> None:
    rng = np.random.default_rng(1)
    x = _oxides(20, rng).astype(np.float64)
    wl = fit_whiteline(x, GRID)
    got = wl.score(x)
    a, b = wl.peak, wl.level
    want = wl.center - x[:, a[0] : a[1]].max(axis=1) / x[:, b[0] : b[1]].mean(axis=1)
    assert np.allclose(got, want)
    assert np.isclose(np.median(got), 0.0, atol=1e-9)  # centred on the training median
    assert np.allclose(wl.score(3.0 * x), got)  # an edge-step error does not move it
    bad = x[:2].copy()
    bad[0, b[0] : b[1]] = 0.0
    bad[1, 5] = np.nan
    assert np.isinf(wl.score(bad)).all()
    with pytest.raises(ValueError, match="shape"):
        U.whiteline_deficit(x[:, :100], a, b, 0.0)
    with pytest.raises(ValueError, match="empty"):
        U.whiteline_deficit(x, (5, 5), b, 0.0)
    with pytest.raises(ValueError, match="one scale per score"):
        U.max_scaled([got], [1.0, 2.0])
    assert np.array_equal(
        U.max_scaled([np.array([1.0, 4.0]), np.array([3.0, 0.0])], [1, 2]), [1.5, 4.0]
    )


def test_onnx_graph_equals_numpy_and_flags_unscorable_rows() -> None:
    rng = np.random.default_rng(2)
    tr, va = _oxides(600, rng), _oxides(200, rng)
    fitted = fit_ligand_ood(tr, va, GRID)
    x = np.vstack([_oxides(30, rng), _edges(10, rng, (0.0, 0.05), 2.3)])
    x[-1, :] = 0.0  # no level, no mean: cannot be scored
    sess = ort.InferenceSession(fitted.to_onnx(242), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True))
    want = fitted.score(x)
    assert np.isinf(out["ood_score"][-1]) and np.isinf(want[-1])
    assert np.allclose(out["ood_score"][:-1], want[:-1], rtol=1e-3, atol=1e-3)
    for name, part in fitted.component_scores(x[:-1]).items():
        assert np.allclose(out[f"ood_{name}"][:-1], part, rtol=1e-3, atol=1e-3), name
    spec = fitted.spec()
    assert set(spec["components"]) == {"recon", "whiteline", "postedge"}
    assert spec["scales"]["whiteline"] > 0
    with pytest.raises(ValueError, match="narrower"):
        fitted.components["whiteline"].to_onnx(100)


def test_upgrade_reseals_a_bundle(tiny_cu_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """The upgraded copy verifies, serves the combined score from its OOD graph, keeps the
    task graphs byte for byte, and a second upgrade gives the same score."""
    from xasflow.models.bundle import verify_bundle
    from xasflow.models.predictor import Predictor
    from xasflow.training.dataset import DatasetError
    from xasflow.training.ood_upgrade import upgrade_bundle

    monkeypatch.setenv("XASFLOW_CACHE", str(tiny_cu_bundle.parent.parent / "cache"))
    src = tmp_path / "cu-k"
    shutil.copytree(tiny_cu_bundle, src)
    before = verify_bundle(src)
    assert before.ood is not None
    with pytest.raises(ValueError, match="too few"):  # 5 validation rows cannot flag 5 %
        upgrade_bundle(src, tmp_path / "up", log=lambda _: None)
    out = upgrade_bundle(src, tmp_path / "up", log=lambda _: None, flag_fraction=0.25)
    after = verify_bundle(out)
    assert after.ood is not None and after.ood.method == METHOD
    assert after.ood.details["components"]["recon"]["threshold"] == before.ood.threshold
    for name in before.files:
        if name != after.ood.file:
            assert (out / name).read_bytes() == (src / name).read_bytes()
    assert after.files[after.ood.file] != before.files[before.ood.file]
    again = verify_bundle(
        upgrade_bundle(out, tmp_path / "again", log=lambda _: None, flag_fraction=0.25)
    )
    assert again.ood is not None and np.isclose(again.ood.threshold, after.ood.threshold)
    x = np.vstack([np.hstack([GRID * 0 + 1.0, [1.0, 1.0]])] * 2).astype(np.float32)
    raw = Predictor(out, all_outputs=True).run(x)[after.ood.file]
    assert set(raw) >= {"ood_score", "ood_recon", "ood_whiteline", "ood_postedge"}
    (out / "manifest.sig").write_text("{}")
    with pytest.raises(ValueError, match="signed"):
        upgrade_bundle(out, tmp_path / "x", log=lambda _: None, flag_fraction=0.25)
    with pytest.raises(DatasetError, match="no Cu sites"):
        upgrade_bundle(src, tmp_path / "y", data=tmp_path, log=lambda _: None, flag_fraction=0.25)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.shared_data
def test_shipped_bundle_upgrade_flags_cu2s_and_cucl_not_oxides(
    xdi_library: Path, cu_archive: Path, tmp_path: Path
) -> None:
    """On a copy of models/cu-k: every measured reference of bench/references-cu.csv gets its
    expected flag (Cu2S now too), the oxides at least 15 % below the threshold, and of the
    FEFF10 demo spectra CuCl is flagged while CuO, Cu2O and CuAl2O4 are not."""
    from xasflow.adapters.columns import read_spectrum_file
    from xasflow.models.bundle import verify_bundle
    from xasflow.models.predictor import Predictor
    from xasflow.sim.feff_demo import load_demo_spectra
    from xasflow.training.ood_upgrade import upgrade_bundle

    out = upgrade_bundle(paths.REPO_ROOT / "models" / "cu-k", tmp_path / "cu-k", log=print)
    predictor = Predictor(out)
    assert predictor.manifest.ood is not None
    threshold = predictor.manifest.ood.threshold
    # the threshold bounds a fresh split of unseen compositions at 90 % confidence
    # (ood_threshold); validation alone flagged 6.3 % of the test split
    details = predictor.manifest.ood.details
    assert details["threshold_rule"] == "group bootstrap of cross-fitted scores"
    assert details["test_flagged_fraction"] <= 0.05 and details["val_flagged_fraction"] <= 0.05
    assert threshold > details["split_conformal_threshold"]
    shipped = verify_bundle(paths.REPO_ROOT / "models" / "cu-k").ood
    assert shipped is not None and threshold == pytest.approx(shipped.threshold, rel=1e-9)
    with open(paths.REPO_ROOT / "bench" / "references-cu.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        pred = predictor.predict(read_spectrum_file(paths.shared_data_dir() / row["file"], "Cu"))
        assert pred.out_of_domain is (row["out_of_domain"] == "true"), row["file"]
        if row["out_of_domain"] == "false":
            assert pred.ood_score is not None and pred.ood_score < 0.85 * threshold, row["file"]
    demos = {d.name: predictor.predict(d.to_spectrum()) for d in load_demo_spectra()}
    assert demos["CuCl"].out_of_domain
    assert not any(demos[n].out_of_domain for n in ("CuO", "Cu2O", "CuAl2O4"))


def test_training_with_ood_ligand_serves_it(
    tiny_cu_bundle: Path, tmp_path: Path, monkeypatch
) -> None:
    """``TrainConfig(ood_ligand=True)``: the exported OOD graph is the combined score, equal to
    the fitted scorer's numpy formula, with the manifest recording its components."""
    from xasflow.models.bundle import read_manifest
    from xasflow.models.predictor import Predictor
    from xasflow.training.bundle_export import export_bundle
    from xasflow.training.dataset import build_feff_dataset
    from xasflow.training.fit import TrainConfig, train

    monkeypatch.setenv("XASFLOW_CACHE", str(tiny_cu_bundle.parent.parent / "cache"))
    source = read_manifest(tiny_cu_bundle).training["source"]
    ds = build_feff_dataset(source, "Cu", n_jobs=1, progress=False)
    cfg = TrainConfig(  # 25 %: the conformal rank needs only 3 of the tiny validation rows
        n_estimators=8,
        n_jobs=1,
        test_fraction=0.3,
        val_fraction=0.15,
        split_by="material",  # the synthetic tree has three formulas
        networks=(),
        ood_ligand=True,
        ood_flag_fraction=0.25,
    )
    trained = train(ds, cfg, log=lambda *_: None)
    assert trained.ood_ligand is not None and trained.ood_spread is None
    out = export_bundle(trained, tmp_path / "cu-k")
    predictor = Predictor(out)
    ood = predictor.manifest.ood
    assert (
        ood is not None and ood.method == METHOD and ood.threshold == trained.ood_ligand.threshold
    )
    assert set(ood.details["components"]) == {"recon", "whiteline", "postedge"}
    # the threshold bounded over the split's groups, recorded with its rule
    assert ood.details["threshold_rule"] == "group bootstrap of cross-fitted scores"
    assert ood.details["pool_groups"] >= 10 and ood.details["fresh_groups"] >= 1
    xs = model_input(trained.gridded.y, cfg.features, cfg.prep)
    _, scores = predictor.infer(xs)
    assert scores is not None
    np.testing.assert_allclose(scores, trained.ood_ligand.score(xs), rtol=1e-3, atol=1e-3)
