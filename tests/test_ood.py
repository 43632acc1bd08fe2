"""Out-of-domain scorer: synthetic Gaussian data, ONNX parity, and (shared data) measured Cu."""

from __future__ import annotations

import numpy as np
import pytest

from xasflow.models import uncertainty as U
from xasflow.training.ood import METHODS, energy_window, fit_ood


def _spectra(n: int, rng: np.random.Generator, width: int = 242) -> np.ndarray:
    """Spectrum-like rows: a mean curve plus a few smooth random modes plus noise."""
    t = np.linspace(0, 1, width)
    mean = 1.0 + 0.5 * np.exp(-(((t - 0.2) / 0.05) ** 2))
    modes = np.stack([np.sin((j + 1) * np.pi * t) for j in range(4)])
    return mean + rng.normal(size=(n, 4)) @ (0.1 * modes) + 0.005 * rng.normal(size=(n, width))


def _peak(t: np.ndarray) -> np.ndarray:
    """A narrow peak the training spectra never have (off their principal subspace)."""
    return 0.3 * np.exp(-(((t - 0.6) / 0.03) ** 2))


def _along_mode(t: np.ndarray) -> np.ndarray:
    """A large step along the second training mode (inside the principal subspace)."""
    return 1.0 * np.sin(2 * np.pi * t)


@pytest.mark.parametrize(
    ("method", "perturb"),
    [
        ("recon", _peak),
        ("mahalanobis", _along_mode),
        ("ppca", _peak),
        ("ppca", _along_mode),
    ],
)
def test_flags_far_points_and_few_fresh_in_domain_points(method: str, perturb) -> None:
    rng = np.random.default_rng(0)
    tr, va = _spectra(800, rng), _spectra(400, rng)
    scorer = fit_ood(tr, va, method=method, n_components=4, window=(0, 240), normalise=False)
    assert scorer.spec()["val_flagged_fraction"] <= 0.05
    assert scorer.flags(_spectra(1000, rng)).mean() <= 0.08  # threshold set for 5 % on validation
    x = _spectra(50, rng)
    assert not scorer.flags(x).all()
    assert scorer.flags(x + perturb(np.linspace(0, 1, 242))).all()


def test_each_pure_method_is_blind_to_the_other_kind_of_outlier() -> None:
    """Why ppca exists: reconstruction error misses in-subspace outliers, Mahalanobis the rest."""
    rng = np.random.default_rng(1)
    tr, va, x = _spectra(800, rng), _spectra(400, rng), _spectra(50, rng)
    t = np.linspace(0, 1, 242)
    recon = fit_ood(tr, va, "recon", 4, (0, 240), normalise=False)
    maha = fit_ood(tr, va, "mahalanobis", 4, (0, 240), normalise=False)
    assert recon.flags(x + _along_mode(t)).mean() < 0.5  # ppca and mahalanobis flag all
    assert maha.flags(x + _peak(t)).mean() < 0.5  # ppca and recon flag all


def test_normalised_score_ignores_a_scale_error() -> None:
    rng = np.random.default_rng(2)
    tr, va, x = _spectra(1000, rng), _spectra(500, rng), _spectra(20, rng)
    scaled = fit_ood(tr, va, n_components=4, window=(0, 240), normalise=True)
    assert np.allclose(scaled.score(x * 0.85), scaled.score(x))
    raw = fit_ood(tr, va, n_components=4, window=(0, 240), normalise=False)
    assert raw.flags(x * 0.85).all()  # without normalisation a 15 % scale error looks foreign


def test_window_and_input_checks() -> None:
    rng = np.random.default_rng(3)
    grid = np.linspace(-3.5, 116.5, 240)
    assert energy_window(grid, -3.5, 60.0) == (0, 127)  # 0.502 eV steps: 59.76 in, 60.26 out
    tr, va = _spectra(300, rng), _spectra(100, rng)
    scorer = fit_ood(tr, va, n_components=3, window=(0, 127))
    assert scorer.mean.shape == (127,) and scorer.n_components == 3
    with pytest.raises(ValueError, match="columns"):
        scorer.score(np.ones((2, 100)))
    with pytest.raises(ValueError, match="model grid"):
        fit_ood(tr, va)
    default = fit_ood(tr, va, n_components=3, grid=grid)
    assert (default.start, default.stop, default.spec()["norm_columns"]) == (0, 127, [0, 240])
    with pytest.raises(ValueError, match="unknown OOD method"):
        fit_ood(tr, va, method="knn", window=(0, 240))
    with pytest.raises(ValueError, match="n_components"):
        fit_ood(tr, va, n_components=0, window=(0, 240))
    bad = tr[:5].copy()
    bad[0, :] = 0.0  # zero mean: cannot be normalised, so it counts as out of domain
    assert np.isinf(scorer.score(bad)[0]) and scorer.flags(bad)[0]


@pytest.mark.parametrize(
    ("method", "norm_window", "smooth"),
    [(m, None, 0.0) for m in METHODS]
    + [("recon", (0, 240), 0.0), ("ppca", (0, 240), 0.0), ("recon", (0, 240), 4.0)],
)
def test_onnx_graph_equals_numpy(
    method: str, norm_window: tuple[int, int] | None, smooth: float
) -> None:
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(4)
    scorer = fit_ood(
        _spectra(800, rng),
        _spectra(300, rng),
        method=method,
        n_components=5,
        window=(2, 200),
        norm_window=norm_window,
        smooth=smooth,
    )
    sess = ort.InferenceSession(scorer.to_onnx(242), providers=["CPUExecutionProvider"])
    t = np.linspace(0, 1, 242)
    x = np.vstack([_spectra(64, rng), _spectra(8, rng) + 0.3 * np.sin(3 * np.pi * t)])
    x32 = x.astype(np.float32)
    got = sess.run(["ood_score"], {"x": x32})[0]
    want = scorer.score(x32)
    assert got.shape == (72,)
    assert np.max(np.abs(got - want) / np.abs(want)) <= 1e-4
    assert sess.run(None, {"x": x32[:1]})[0].shape == (1,)  # dynamic batch


def test_runtime_formula_matches_definition() -> None:
    rng = np.random.default_rng(5)
    mean = rng.normal(size=6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    comps = q.T  # (2, 6), orthonormal rows
    x = rng.normal(size=(3, 9)) + 2.0
    w = x[:, 1:7] / x[:, :8].mean(axis=1, keepdims=True)
    c = w - mean
    z = c @ comps.T
    r = c - z @ comps
    got = U.ood_score(x, mean, comps, np.array([2.0, 0.5]), 3.0, (1, 7), (0, 8))
    want = (z[:, 0] * 2) ** 2 + (z[:, 1] * 0.5) ** 2 + 3 * (r**2).sum(axis=1)
    assert np.allclose(got, want)
    plain = U.ood_score(x[:, :6], mean, comps, np.zeros(2), 1.0)
    c0 = x[:, :6] - mean
    assert np.allclose(plain, ((c0 - c0 @ comps.T @ comps) ** 2).sum(axis=1))
    with pytest.raises(ValueError, match="columns"):
        U.ood_score(x, mean, comps, np.zeros(2), 1.0, (0, 5))
    k = U.smoothing_matrix(6, 1.5)
    smoothed = U.ood_score(x, mean, comps, np.zeros(2), 1.0, (1, 7), (0, 8), smoother=k)
    cs = w @ k.T - mean
    assert np.allclose(smoothed, ((cs - cs @ comps.T @ comps) ** 2).sum(axis=1))


def test_smoothing_keeps_a_level_and_cuts_point_noise() -> None:
    """Each row of the smoother averages (a flat spectrum stays flat, ends included); white
    noise through a sigma of 6 columns keeps about 1/sqrt(4 pi 36) of its variance; the
    scorer records the smoothing and refuses a negative one."""
    k = U.smoothing_matrix(193, 6.0)
    assert np.allclose(k.sum(axis=1), 1.0) and np.allclose(np.ones(193) @ k.T, 1.0)
    noise = np.random.default_rng(0).normal(size=(400, 193))
    kept = np.var((noise @ k.T)[:, 30:-30]) / np.var(noise)
    assert kept == pytest.approx(1 / np.sqrt(4 * np.pi * 36), rel=0.15)
    rng = np.random.default_rng(6)
    scorer = fit_ood(_spectra(300, rng), _spectra(100, rng), "recon", 5, (2, 200), smooth=6.0)
    assert scorer.spec()["smooth_columns"] == 6.0
    assert (
        "smooth_columns"
        not in fit_ood(_spectra(300, rng), _spectra(100, rng), "recon", 5, (2, 200)).spec()
    )
    with pytest.raises(ValueError, match="smooth"):
        fit_ood(_spectra(300, rng), _spectra(100, rng), "recon", 5, (2, 200), smooth=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        U.smoothing_matrix(10, 0.0)


@pytest.mark.shared_data
def test_measured_cu_metal_and_sulfide_flagged_oxides_not(xdi_library, cu_archive) -> None:
    """The default scorer fitted on the shared FEFF spectra flags measured Cu foil and CuS,
    passes measured CuO and azurite, also when their edge step is 15 % off."""
    from xasflow.adapters.feff import read_feff_tree
    from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
    from xasflow.spectra import SpectrumError, model_input, prepare
    from xasflow.training.fit import TrainConfig
    from xasflow.training.ood import fit_default_ood
    from xasflow.training.split import group_key, split_rows
    from xasflow.training.structures import poscar_formula

    cfg = TrainConfig()
    ys, groups = [], []
    for material in read_feff_tree(cu_archive, element="Cu", progress=False).materials:
        for site in material.sites:
            try:
                ys.append(prepare(site.to_spectrum(), cfg.prep).y)
            except SpectrumError:
                continue
            groups.append(group_key(poscar_formula(material.poscar), material.material_id))
    x = model_input(np.array(ys), cfg.features, cfg.prep)
    parts = split_rows(np.array(groups), cfg.split_salt, cfg.test_fraction, cfg.val_fraction)
    scorer = fit_default_ood(x[parts["train"]], x[parts["val"]], cfg.prep.grid)
    assert scorer.flags(x[parts["test"]]).mean() <= 0.07

    def measured(name: str) -> np.ndarray:
        spectrum = xdi_to_spectrum(read_xdi(xdi_library / "Cu" / name))
        return model_input(prepare(spectrum, cfg.prep).y, cfg.features, cfg.prep)

    for name in ("Cu_Foil_rt_2016Foils.xdi", "cu_metal_rt.xdi", "CuS_covellite_13K_01.xdi"):
        assert scorer.flags(measured(name))[0], name
    for name in ("CuO_tenorite_13K_01.xdi", "Cu_azurite_13K_01.xdi"):
        x_ok = measured(name)
        assert not scorer.flags(np.vstack([x_ok, x_ok * 0.85, x_ok * 1.15])).any(), name
