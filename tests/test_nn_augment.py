"""On-the-fly augmentation of network batches: what each operation does to a known curve."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the nn extra (torch) is not installed")

from xasflow.spectra import FeatureSpec, PrepParams, model_input  # noqa: E402
from xasflow.training.nn import NetConfig, TaskTarget, fit_network_ensemble  # noqa: E402
from xasflow.training.nn_augment import BatchAugmenter, NetAugment  # noqa: E402

PREP = PrepParams(window_stop=116.5, n_points=240)
GRID = PREP.grid


def _edge(centre: float = 10.0, width: float = 1.0) -> np.ndarray:
    """An arctangent edge (0 -> 1) at ``centre`` eV with a Gaussian white line above it."""
    step = 0.5 + np.arctan((GRID - centre) / width) / np.pi
    return step + 0.6 * np.exp(-(((GRID - centre - 8.0) / 2.0) ** 2))


def _x(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(model_input(rows, FeatureSpec(), PREP))


def _run(recipe: NetAugment, rows: np.ndarray, seed: int = 0) -> np.ndarray:
    out = BatchAugmenter(recipe, GRID)(_x(rows), torch.Generator().manual_seed(seed))
    return out.numpy()


def _half_point(y: np.ndarray) -> float:
    """Energy where the edge first crosses 0.5."""
    i = int(np.flatnonzero(y >= 0.5)[0])
    return float(np.interp(0.5, y[i - 1 : i + 1], GRID[i - 1 : i + 1]))


def test_shift_moves_the_edge_within_the_range() -> None:
    rows = np.repeat(_edge()[None], 64, axis=0)
    out = _run(NetAugment(p=1.0, shift_ev=3.0), rows)
    moved = np.array([_half_point(r) for r in out[:, :240]]) - _half_point(rows[0])
    assert np.all(np.abs(moved) <= 3.0 + 0.05)
    assert moved.std() > 1.0  # uniform in +-3 eV: std 1.7
    # positive shifts move features up in energy: the white line's peak moves with the edge
    peak = GRID[np.argmax(out[:, :240], axis=1)] - GRID[np.argmax(rows[0])]
    np.testing.assert_allclose(peak, moved, atol=0.6)  # one grid step of 0.5 eV


def test_broadening_lowers_the_peak_and_keeps_flat_parts() -> None:
    rows = np.repeat(_edge()[None], 32, axis=0)
    for recipe in (NetAugment(p=1.0, gauss_fwhm_ev=6.0), NetAugment(p=1.0, lorentz_fwhm_ev=6.0)):
        out = _run(recipe, rows)[:, :240]
        assert np.all(out.max(axis=1) <= rows.max() + 1e-6)
        assert np.mean(out.max(axis=1) < rows.max() - 0.02) > 0.5
        # far above the edge the curve is flat: broadening (ends replicated) keeps it there
        np.testing.assert_allclose(out[:, -20:], rows[:, -20:], atol=0.01)
    flat = _run(NetAugment(p=1.0, gauss_fwhm_ev=5.0, lorentz_fwhm_ev=5.0), np.ones((4, 240)))
    np.testing.assert_allclose(flat[:, :240], 1.0, atol=1e-5)


def test_scalars_follow_the_augmented_curve_and_unpicked_rows_are_untouched() -> None:
    rows = np.repeat(_edge()[None], 200, axis=0)
    recipe = NetAugment(p=0.5, shift_ev=2.0, scale_sigma=0.05, noise_sigma=0.01)
    out = _run(recipe, rows)
    # the white-line scalars are model_input's, recomputed from the augmented spectrum
    np.testing.assert_allclose(out, model_input(out[:, :240], FeatureSpec(), PREP), atol=1e-5)
    same = np.all(out == _x(rows).numpy(), axis=1)
    assert 0.35 < same.mean() < 0.65  # p = 0.5 of the rows changed
    heights = out[~same, :240].max(axis=1) / rows[0].max()
    assert 0.02 < np.std(heights) < 0.1  # edge-step jitter of 5 %


def test_default_recipe_is_off_and_bad_grids_are_refused() -> None:
    x = _x(_edge()[None])
    assert not NetAugment().active and not NetAugment(p=1.0).active
    assert BatchAugmenter(NetAugment(), GRID)(x, torch.Generator()) is x
    with pytest.raises(ValueError, match="uniform"):
        BatchAugmenter(NetAugment(p=1, shift_ev=1), np.r_[0.0, 1.0, 3.0, 4.0])
    with pytest.raises(ValueError):
        NetAugment(p=1.5)


def test_an_ensemble_trains_with_augmentation_and_needs_the_grid() -> None:
    rng = np.random.default_rng(0)
    centre = rng.uniform(0.0, 20.0, 160)
    rows = np.stack([_edge(c) for c in centre])
    x = model_input(rows, FeatureSpec(), PREP)
    targets = {"cn": TaskTarget("classifier", np.where(centre < 10, 4, 6), np.ones(160, bool))}
    cfg = NetConfig(
        members=1,
        hidden=(16,),
        max_epochs=3,
        patience=2,
        threads=1,
        augment=NetAugment(p=0.5, shift_ev=1.0, gauss_fwhm_ev=2.0, noise_sigma=0.01),
    )
    train, val = np.arange(120), np.arange(120, 160)
    with pytest.raises(ValueError, match="grid"):
        fit_network_ensemble(x, targets, train, val, cfg, log=lambda _: None)
    ens = fit_network_ensemble(x, targets, train, val, cfg, log=lambda _: None, grid=GRID)
    assert ens.predict(x[val])["cn"].shape == (40, 2)
