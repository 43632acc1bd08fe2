"""The shipped Cu K-edge bundle: verifies, stays small, and answers sensibly on real spectra."""

from __future__ import annotations

from pathlib import Path

from xasflow import paths
from xasflow.models.bundle import verify_bundle
from xasflow.models.predictor import Predictor

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"


def test_bundle_verifies_and_is_small() -> None:
    manifest = verify_bundle(BUNDLE)
    assert (manifest.element, manifest.edge) == ("Cu", "K")
    assert set(manifest.tasks) == {"cn", "environment", "motifs", "valence", "distance", "charge"}
    assert sum(p.stat().st_size for p in BUNDLE.iterdir()) < 25e6
    # held-out metrics travel with the bundle, each above its baseline
    cn = manifest.tasks["cn"].metrics
    assert cn["accuracy"] > cn["baseline_accuracy"] + 0.2
    dist = manifest.tasks["distance"].metrics
    assert dist["mae"] < dist["baseline_mae"]
    assert set(manifest.tasks["cn"].region_importance) >= {"pre-edge", "main peak", "post-peak"}


def test_demo_octahedral_and_spinel_sites() -> None:
    """The project's own FEFF10 spectra (not training data): CN 6 and CN 4 sites."""
    from xasflow.sim.beamline import demo_spectra

    predictor = Predictor(BUNDLE)
    by_name = {s.meta["name"]: s for s in demo_spectra(["Cu_MgO", "CuAl2O4"])}
    assert predictor.predict(by_name["Cu_MgO"])["cn"].value == 6
    assert predictor.predict(by_name["CuAl2O4"])["cn"].value == 4


def test_measured_cuo_is_square_planar_cu2(xdi_library: Path) -> None:
    from xasflow.adapters.columns import read_spectrum_file

    spectrum = read_spectrum_file(xdi_library / "Cu" / "CuO_tenorite_13K_01.xdi", element="Cu")
    pred = Predictor(BUNDLE).predict(spectrum)
    assert pred["cn"].value == 4
    assert pred["environment"].value == "CN4-square co-planar"
    assert pred["valence"].value == 2
