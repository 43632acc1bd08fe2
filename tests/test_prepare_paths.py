"""The single-spectrum shortcuts of ``prepare`` give the general (row-wise) code's numbers
to the last bit: each shortcut against the code it stands in for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.synthetic_feff import model_mu
from xasflow.spectra.quality import edge_snr, edge_snr_rows

CU_K = 8979.0


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _scans() -> list[tuple[np.ndarray, np.ndarray]]:
    """Measured-like and FEFF-like scans, noisy and noise-free, long and short."""
    rng = np.random.default_rng(7)
    out = []
    for points, lo, hi, noise in (
        (1000, -180, 600, 3e-3),
        (120, -40, 160, 1e-2),
        (400, -5, 300, 0.0),
    ):
        rel = np.sort(rng.uniform(lo, hi, points))
        mu = model_mu(rel + CU_K, CU_K, 1.3, 4.0, 2.0) + noise * rng.standard_normal(points)
        out.append((rel, mu))
    out.append((np.linspace(-100.0, 300.0, 400), np.linspace(0.0, 1.0, 400)))  # no noise at all
    out.append((np.linspace(-100.0, 300.0, 400), np.zeros(400)))
    out.append((np.linspace(-10.0, 10.0, 40), np.ones(40)))  # no noise window holds 7 points
    out.append((np.linspace(-100.0, 300.0, 6), np.ones(6)))  # too short
    return out


@pytest.mark.parametrize("step", [1.0, 0.37, -0.5, 0.0, math.nan])
def test_edge_snr_of_one_spectrum_is_its_row_of_edge_snr_rows(step: float) -> None:
    for rel, mu in _scans():
        for shift in (0.0, 25.0, -12.3):
            want = float(edge_snr_rows(rel - shift, mu, np.array([step]))[0])
            assert _same(edge_snr(rel - shift, mu, step), want), (rel.size, shift, step)
