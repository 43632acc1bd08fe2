"""The HERFD hint on the shipped bundle tells sharpness from noise: a conventional spectrum
made out of domain by its point noise is not told to declare HERFD (broadening would smooth
the noise away and change its answer), while a HERFD spectrum, clean or with the noise of
an ordinary scan, still is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xasflow import paths
from xasflow.models.predictor import HERFD_SUSPECTED, Predictor
from xasflow.sim.feff_demo import load_demo_spectra
from xasflow.spectra import Spectrum

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(BUNDLE)


def _noisy(predictor: Predictor, spectrum: Spectrum, fraction: float, seed: int) -> Spectrum:
    """``spectrum`` with Gaussian point noise of ``fraction`` of its edge step."""
    step = predictor.prepare(spectrum).edge_step
    noise = np.random.default_rng(seed).normal(0.0, fraction * step, spectrum.mu.size)
    return spectrum.with_(mu=spectrum.mu + noise)


@pytest.mark.parametrize(
    ("name", "seed"), [("CuO_tenorite_13K_01.xdi", 1), ("Cu_azurite_13K_01.xdi", 2)]
)
def test_a_noisy_conventional_scan_is_not_hinted_herfd(
    xdi_library: Path, predictor: Predictor, name: str, seed: int
) -> None:
    """Measured CuO and azurite (transmission, in domain clean) with point noise of 5 % of the
    edge step (edge SNR ~20; a draw that comes out of domain: with 2 % they are in domain
    since the post-edge component is smoothed, tests/test_ood_noise.py); broadened as HERFD
    they are in domain (the noise smoothed away), but so would be no conventional spectrum
    carrying their measured noise: no ``herfd_suspected``."""
    from xasflow.adapters.columns import read_spectrum_file

    spectrum = read_spectrum_file(xdi_library / "Cu" / name, element="Cu")
    assert not predictor.predict(spectrum).out_of_domain
    noisy = _noisy(predictor, spectrum, 0.05, seed=seed)
    pred = predictor.predict(noisy)
    assert pred.out_of_domain
    broadened = predictor.predict(noisy.with_(meta={**noisy.meta, "herfd": True}))
    assert not broadened.out_of_domain  # the old test alone would hint
    assert HERFD_SUSPECTED not in predictor.with_herfd_hint(noisy, pred).flags


@pytest.mark.parametrize("name", ["Cu2O", "CuAl2O4", "Cu_MgO"])
@pytest.mark.parametrize("fraction", [0.0, 0.005, 0.02])
def test_a_herfd_spectrum_clean_or_noisy_is_still_hinted(
    predictor: Predictor, name: str, fraction: float
) -> None:
    """The simulated-HERFD demo sites that are out of domain undeclared keep the hint, clean
    and with point noise of 0.5 % of the step (edge SNR ~200) and of 2 % (lost while point
    noise alone put the conventional spectra out of domain too)."""
    herfd = {d.name: d for d in load_demo_spectra(herfd=True)}[name].to_spectrum()
    noisy = _noisy(predictor, herfd, fraction, seed=0) if fraction else herfd
    pred = predictor.predict(noisy)
    assert pred.out_of_domain
    assert HERFD_SUSPECTED in predictor.with_herfd_hint(noisy, pred).flags


@pytest.mark.parametrize("name", ["Cu2O", "CuAl2O4", "CuO", "Cu_MgO"])
def test_a_noisy_conventional_computation_is_not_hinted_herfd(
    predictor: Predictor, name: str
) -> None:
    """The conventional computations of the same sites (in domain clean) with 2 % point
    noise: in domain (were out of domain, the hint raised on all four until the noise
    control), so no hint."""
    conventional = {d.name: d for d in load_demo_spectra()}[name].to_spectrum()
    assert not predictor.predict(conventional).out_of_domain
    noisy = _noisy(predictor, conventional, 0.02, seed=0)
    pred = predictor.predict(noisy)
    assert not pred.out_of_domain
    assert HERFD_SUSPECTED not in predictor.with_herfd_hint(noisy, pred).flags
