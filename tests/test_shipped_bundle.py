"""The shipped Cu K-edge bundle: verifies, stays small, and answers sensibly on real spectra."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def _measured(xdi_library: Path, name: str):  # type: ignore[no-untyped-def]
    from xasflow.adapters.columns import read_spectrum_file

    spectrum = read_spectrum_file(xdi_library / "Cu" / name, element="Cu")
    return Predictor(BUNDLE).predict(spectrum)


def test_measured_cuo_is_an_in_domain_cu2(xdi_library: Path) -> None:
    pred = _measured(xdi_library, "CuO_tenorite_13K_01.xdi")
    assert not pred.out_of_domain
    assert pred["valence"].value == 2 and pred["valence"].prediction_set == [2]
    # CN and the CN-motif label never contradict each other
    assert str(pred["environment"].value).startswith(f"CN{pred['cn'].value}-")
    assert pred["motifs"].ranking is not None
    assert pred["motifs"].ranking[0][0] == pred["environment"].value


@pytest.mark.xfail(
    strict=True,
    reason="transfer gap: the network ensembles served for CN call measured CuO six-"
    "coordinate (90% set {5, 6}); the forest alone says 4. To close with augmentation "
    "chosen on measured references (issue 9).",
)
def test_measured_cuo_is_square_planar(xdi_library: Path) -> None:
    pred = _measured(xdi_library, "CuO_tenorite_13K_01.xdi")
    assert pred["cn"].value == 4
    assert pred["environment"].value == "CN4-square co-planar"


@pytest.mark.parametrize(
    ("name", "flagged"),
    [
        ("Cu_Foil_rt_2016Foils.xdi", True),
        ("cu_metal_rt.xdi", True),
        ("cu_metal_10K.xdi", True),
        ("CuS_covellite_13K_01.xdi", True),
        ("CuO_tenorite_13K_01.xdi", False),
        ("Cu_azurite_13K_01.xdi", False),
    ],
)
def test_measured_metal_and_sulfide_are_out_of_domain_oxides_are_not(
    xdi_library: Path, name: str, flagged: bool
) -> None:
    """The bundle is trained on oxides: measured Cu metal and covellite are flagged, and
    measured Cu oxides are not (Cu2S is not flagged yet: see the issue 9 note)."""
    pred = _measured(xdi_library, name)
    assert pred.out_of_domain is flagged
    assert pred.ood_score is not None
