"""The packaged FEFF10 demo spectra load and look like Cu K-edge XANES (FEFF is not run)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from xasflow.sim.feff_demo import (
    COMPOUNDS,
    DEFAULT_SETTINGS,
    DEMO_RESOURCE,
    DemoSpectrum,
    FeffSettings,
    build_cluster,
    feff_input_text,
    load_demo_spectra,
)
from xasflow.spectra.core import Spectrum
from xasflow.spectra.process import find_e0
from xasflow.training.labels import MOTIFS

#: name -> (CN, motif in the label vocabulary, Cu oxidation state)
EXPECTED = {
    "CuO": (4, "square co-planar", 2),
    "Cu2O": (2, "linear", 1),
    "CuCl": (4, "tetrahedral", 1),
    "CuAl2O4": (4, "tetrahedral", 2),
    "Cu_MgO": (6, "octahedral", 2),
}


@pytest.fixture(scope="module")
def demos() -> dict[str, DemoSpectrum]:
    """The packaged demo spectra keyed by name."""
    return {d.name: d for d in load_demo_spectra()}


def test_compounds_with_expected_labels(demos: dict[str, DemoSpectrum]) -> None:
    assert set(demos) == set(EXPECTED) == {c.name for c in COMPOUNDS}
    for name, (cn, motif, ox) in EXPECTED.items():
        d = demos[name]
        assert (d.expected_cn, d.expected_motif, d.expected_oxidation_state) == (cn, motif, ox)
        assert d.labels == {"cn": cn, "motif": motif, "oxidation_state": ox}
        assert (d.element, d.edge) == ("Cu", "K")
        assert d.formula
        assert (cn, motif) in MOTIFS  # the vocabulary the models are trained on


def test_files_small_and_loaded_without_feff_or_pymatgen() -> None:
    root = resources.files("xasflow").joinpath(*DEMO_RESOURCE)
    files = [e for e in root.iterdir() if e.name.endswith(".json")]
    assert len(files) == len(EXPECTED)
    for entry in files:
        assert len(entry.read_bytes()) < 100_000, entry.name
        assert json.loads(entry.read_text(encoding="utf-8"))["schema"] == "xasflow.demo_spectrum/1"
    code = (
        "import sys; from xasflow.sim.feff_demo import load_demo_spectra; "
        "n = len(load_demo_spectra()); "
        "print(n, 'feff10' in sys.modules, 'pymatgen.core' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(EXPECTED)), "False", "False"]


def test_arrays_finite_and_increasing(demos: dict[str, DemoSpectrum]) -> None:
    for d in demos.values():
        assert d.energy.ndim == 1 and d.energy.shape == d.mu.shape
        assert d.energy.size >= 100
        assert np.all(np.isfinite(d.energy)) and np.all(np.isfinite(d.mu))
        assert np.all(np.diff(d.energy) > 0), d.name
        # Cu K edge (8979 eV) on FEFF's absolute scale, XANES range around it
        assert 8960 < d.energy[0] < 8995 < d.energy[-1] < 9200, d.name


def test_edge_step(demos: dict[str, DemoSpectrum]) -> None:
    for d in demos.values():
        pre = d.mu[d.energy < d.energy[0] + 3].mean()
        post = d.mu[(d.energy > 9020) & (d.energy < 9080)].mean()
        assert post > 0.5 and post > 3 * pre, d.name
        # FEFF's mu is normalised to an edge step of about one
        assert 0.7 < d.mu[d.energy > 9080].mean() < 1.3, d.name


def test_edge_position_and_white_line(demos: dict[str, DemoSpectrum]) -> None:
    """E0 (steepest rise) lies where FEFF puts the Cu K edge (a few eV above the 8979 eV of
    experiment), and a white line or 4p peak above one edge step follows it."""
    for d in demos.values():
        e0 = find_e0(d.to_spectrum())
        assert 8985.0 < e0 < 9005.0, (d.name, e0)
        near = (d.energy > e0 - 2) & (d.energy < e0 + 20)
        assert 1.05 < d.mu[near].max() < 2.0, d.name


def test_to_spectrum(demos: dict[str, DemoSpectrum]) -> None:
    for d in demos.values():
        s = d.to_spectrum()
        assert isinstance(s, Spectrum)
        assert (s.element, s.edge) == ("Cu", "K")
        assert s.label == d.name
        assert s.meta["expected"]["cn"] == d.expected_cn
        np.testing.assert_array_equal(s.energy, d.energy)


def test_provenance_recorded(demos: dict[str, DemoSpectrum]) -> None:
    for d in demos.values():
        assert "feff10_rs" in d.meta["feff"]
        assert d.meta["structure"]["source"]
        inp = d.meta["feff_inp"]
        assert "EDGE" in inp and "ATOMS" in inp and "POTENTIALS" in inp and "FMS" in inp


@pytest.mark.parametrize("compound", COMPOUNDS, ids=lambda c: c.name)
def test_structures_give_expected_first_shell(compound) -> None:
    """The textbook structures put the expected number of ligands round Cu (needs pymatgen)."""
    pytest.importorskip("pymatgen")
    cluster = build_cluster(compound.build(), compound.absorber_element, 4.0)
    d1 = cluster[1].distance
    first_shell = [a for a in cluster[1:] if a.distance < d1 + 0.1]
    assert len(first_shell) == compound.expected_cn
    assert cluster[0].symbol == "Cu" and cluster[0].distance == 0.0


def test_feff_input_matches_packaged(demos: dict[str, DemoSpectrum]) -> None:
    """The generator still writes the feff.inp stored with each spectrum, with the settings
    the code would use today (defaults plus the compound's overrides; needs pymatgen)."""
    pytest.importorskip("pymatgen")
    names = {f.name for f in dataclasses.fields(FeffSettings)}
    for compound in COMPOUNDS:
        meta = demos[compound.name].meta
        stored = {k: v for k, v in meta["cluster"].items() if k in names}
        settings = dataclasses.replace(DEFAULT_SETTINGS, **stored)
        assert settings == compound.settings(), compound.name
        assert feff_input_text(compound, compound.build(), settings) == meta["feff_inp"]


@pytest.mark.parametrize("compound", COMPOUNDS, ids=lambda c: c.name)
def test_expected_labels_are_what_the_training_labels_give(compound) -> None:
    """xasflow.training.labels, the labeller of the training data, agrees with each compound's
    expected CN, top motif and oxidation state (needs pymatgen)."""
    pytest.importorskip("pymatgen")
    from xasflow.training.labels import SiteLabels, label_sites

    structure, index = compound.absorber_structure()
    assert structure[index].specie.symbol == "Cu"
    result = label_sites(structure, [index], compound.name)[0]
    assert isinstance(result, SiteLabels), result
    cn, motif = compound.expected_cn, compound.expected_motif
    assert result.dominant_cn == cn
    assert result.environment_ranking[0] == f"CN{cn}-{motif}"
    assert result.oxidation_state == compound.expected_oxidation_state
    first = build_cluster(compound.build(), compound.absorber_element, 4.0)[1].distance
    assert result.mean_nn_distance == pytest.approx(first, abs=0.02)
