"""A measured scan must start on its pre-edge: :data:`~xasflow.spectra.scan_start.MIN_PRE_EDGE`
eV below the E0 found and :data:`~xasflow.spectra.scan_start.MIN_TAB_PRE_EDGE` below the
tabulated edge, on the single path and the batch path alike. A scan that starts above its edge puts the E0 search on a later post-edge rise, from
which the data seem to start far enough below "E0"; the tabulated edge does not move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra import Prepared, PrepParams, Spectrum, SpectrumError, edge_energy, prepare
from xasflow.spectra.batch import BATCH_MIN_ROWS, prepare_batch

CU = edge_energy("Cu")


def _both(spectrum: Spectrum) -> list[Prepared | SpectrumError]:
    """``prepare`` of the spectrum, and row 0 of ``prepare_batch`` of enough copies of it
    to take the matrix path."""
    try:
        single: Prepared | SpectrumError = prepare(spectrum, PrepParams())
    except SpectrumError as exc:
        single = exc
    n = BATCH_MIN_ROWS
    batch = prepare_batch(
        spectrum.energy,
        np.tile(spectrum.mu, (n, 1)),
        PrepParams(),
        spectrum.element,
        spectrum.edge,
        metas=[dict(spectrum.meta)] * n,
    )
    return [single, batch[0]]


def _edge_then_rise(start: float, calculated: bool | None = False) -> Spectrum:
    """A Cu K edge at the tabulated energy and a second rise 35 eV up, the data starting at
    ``start`` (eV above the tabulated edge)."""
    e = np.arange(CU - 60.0, CU + 400.0, 0.5)
    mu = 0.8 + np.arctan((e - CU) / 1.0) / np.pi
    mu += 0.5 * (0.5 + np.arctan((e - CU - 35.0) / 1.5) / np.pi)
    keep = e >= CU + start
    return Spectrum(e[keep], mu[keep], "Cu", meta={"calculated": calculated})


def test_a_synthetic_scan_starting_above_its_edge_is_refused() -> None:
    """Cut 5 or 10 eV above the edge, E0 is found on the rise 35 eV up, 25-30 eV above the
    data's start: accepted before, E0 35 eV high. Refused ``no_pre_edge`` now, naming the
    tabulated edge; from 20 eV below it, prepared with E0 at the edge."""
    for start in (5.0, 10.0):
        for got in _both(_edge_then_rise(start)):
            assert isinstance(got, SpectrumError), start
            assert got.reason == "no_pre_edge"
            assert f"data start {start:.1f} eV above the tabulated edge" in got.message
    for got in _both(_edge_then_rise(-20.0)):
        assert not isinstance(got, SpectrumError)
        assert got.e0 == pytest.approx(CU, abs=0.5)


def test_calculated_spectra_are_not_held_to_the_tabulated_edge() -> None:
    """A calculation (FEFF: declared, or guessed from its near-zero start) has no pre-edge:
    the check is for measured spectra only."""
    for calculated in (True, None):
        for got in _both(_edge_then_rise(5.0, calculated)):
            assert not isinstance(got, SpectrumError), calculated


def test_the_aligned_axis_is_held_to_the_tabulated_edge() -> None:
    """A row shifted by a foil alignment is held to the tabulated edge on its aligned axis:
    data 20 eV below the edge on a monochromator reading 25 eV low are 5 eV above it once
    aligned (refused); data 5 eV above the edge on a monochromator reading 25 eV high are
    20 eV below it once aligned (prepared, E0 at the edge)."""
    n = BATCH_MIN_ROWS
    for spectrum, mono, reason in (
        (_edge_then_rise(5.0), -25.0, "no_pre_edge"),
        (_edge_then_rise(-20.0), 25.0, None),
    ):
        rows = prepare_batch(
            spectrum.energy + mono,
            np.tile(spectrum.mu, (n, 1)),
            PrepParams(),
            "Cu",
            shifts=np.full(n, -mono),
            metas=[{"calculated": False}] * n,
        )
        assert getattr(rows[0], "reason", None) == reason, mono
        if reason is None:
            assert rows[0].e0 == pytest.approx(CU, abs=0.5)  # type: ignore[union-attr]


def test_fe_foil_cut_above_its_edge_is_refused(xdi_library: Path) -> None:
    """The library's Fe foil cut to start at 7130.9 eV (18.9 eV above the tabulated edge):
    accepted before with E0 7147.0 (36 eV high) and a fifth of the step."""
    spectrum = xdi_to_spectrum(read_xdi(xdi_library / "Fe" / "Fe_Foil_rt_2016Foils.xdi"))
    keep = spectrum.energy >= 7130.9 - 0.05
    assert spectrum.energy[keep][0] == pytest.approx(7130.9, abs=0.05)
    cut = spectrum.with_(energy=spectrum.energy[keep], mu=spectrum.mu[keep])
    for got in _both(cut):
        assert isinstance(got, SpectrumError)
        assert got.reason == "no_pre_edge"
        assert "18.9 eV above the tabulated edge" in got.message
    assert prepare(spectrum, PrepParams()).e0 == pytest.approx(7110.8, abs=0.5)


@pytest.mark.parametrize(
    ("name", "shift", "from_e0"),
    [("Mn/Mn2O3_rt_01", 5.0, None), ("Cr/cr2o3_100K_001", 0.0, -30.0)],
)
def test_good_scans_near_the_tabulated_edge_are_prepared(
    xdi_library: Path, name: str, shift: float, from_e0: float | None
) -> None:
    """Mn2O3 on a monochromator reading 5 eV high (no foil), and Cr2O3 as a XANES scan from
    30 eV below its E0 (which its chemical shift puts 10-20 eV above the tabulated edge):
    both start on a pre-edge, 15 eV or more below E0, and are prepared (before, a 15 eV
    margin below the tabulated edge refused them ``no_pre_edge``)."""
    s = xdi_to_spectrum(read_xdi(xdi_library / f"{name}.xdi"))
    s = s.with_(energy=s.energy + shift)
    if from_e0 is not None:
        keep = s.energy >= prepare(s, PrepParams()).e0 + from_e0
        s = s.with_(energy=s.energy[keep], mu=s.mu[keep])
    single, batch = _both(s)
    assert isinstance(single, Prepared), single
    assert isinstance(batch, Prepared) and batch.e0 == pytest.approx(single.e0)
