"""Measured spectra a beamline really produces, at the edges of what preparation accepts: a
scan that starts above its edge, a survey scan with almost no point in the model window, a
short measured scan taken for a calculation, an XDI file with a byte-order mark, a legacy
normalisation with an undetermined step, an edge outside the E0 search window.

Each test failed before its fix (a read-only review of bd69e6a); where a docstring says what
preparation does wrong, it tells what it did then. The single path and the page path
(``prepare_batch``) are checked alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import ENERGY, HEADER, I0, IR, IT, table

from xasflow.adapters.columns import read_spectrum_file
from xasflow.adapters.xdi import XdiError
from xasflow.spectra import PrepParams, Spectrum, SpectrumError, mu_from_channels, prepare
from xasflow.spectra.batch import prepare_batch
from xasflow.spectra.e0 import find_e0

pytestmark = pytest.mark.usefixtures("matrix_rows")  # the matrix path, small pages too

LARCH = PrepParams()


def _cut_xdi(src: Path, dst: Path, emin: float) -> Path:
    """``src`` with the data rows below ``emin`` eV removed: a scan that started later."""
    out = []
    for line in src.read_text().splitlines():
        text = line.strip()
        if text and not text.startswith("#") and float(text.split()[0]) < emin:
            continue
        out.append(line)
    dst.write_text("\n".join(out) + "\n")
    return dst


def _page(s: Spectrum, params: PrepParams, n: int = 6) -> list:
    return prepare_batch(
        s.energy, np.tile(s.mu, (n, 1)), params, s.element, s.edge, metas=[dict(s.meta)] * n
    )


# --- 1. a scan that starts above the edge is prepared with a post-edge wiggle as E0 -------


@pytest.mark.shared_data
@pytest.mark.parametrize("after", [5.0, 10.0, 30.0])
def test_scan_starting_above_the_edge_is_refused(
    xdi_library: Path, tmp_path: Path, after: float
) -> None:
    """Cu metal (E0 8980.5 eV with the whole scan): the same file with its scan starting
    ``after`` eV above E0 holds no edge at all, yet prepare() finds an "E0" 11-37 eV too
    high (a post-edge rise; the 1.5 eV margin of the E0 search plus the 2 eV allowed
    extrapolation make any late start pass the window check) and returns a model input."""
    full = read_spectrum_file(xdi_library / "Cu" / "cu_metal_rt.xdi")
    e0 = prepare(full, LARCH).e0
    cut = read_spectrum_file(
        _cut_xdi(xdi_library / "Cu" / "cu_metal_rt.xdi", tmp_path / "late.xdi", e0 + after)
    )
    assert cut.energy[0] > e0 + after - 1e-9
    with pytest.raises(SpectrumError):
        got = prepare(cut, LARCH)
        print(f"prepared with E0 {got.e0:.2f} (true {e0:.2f}), step {got.edge_step:.3g}")
    assert all(isinstance(r, SpectrumError) for r in _page(cut, LARCH))


# --- 2. very sparse / very short scans are prepared by interpolating across the window ---


@pytest.mark.shared_data
@pytest.mark.parametrize("points", [3, 10])
def test_a_scan_with_no_point_in_the_model_window_is_refused(
    xdi_library: Path, points: int
) -> None:
    """``points`` measured points spread over 8779-10146 eV (a scan aborted after a few
    points, or a coarse survey): none (3 points) or two (10 points) lie in the 60 eV model
    window, the SNR check is skipped (fewer than 7 points; "noise not measurable" counts as
    a pass), the max_norm check sees no window point, and the gridded spectrum is a straight
    line between points 150-700 eV apart, which prepare() hands to the model."""
    full = read_spectrum_file(xdi_library / "Cu" / "cu_metal_rt.xdi")
    idx = np.linspace(0, full.energy.size - 1, points).round().astype(int)
    sparse = Spectrum(full.energy[idx], full.mu[idx], "Cu", "K")
    with pytest.raises(SpectrumError):
        got = prepare(sparse, LARCH)
        inside = np.count_nonzero(
            (sparse.energy >= got.e0 + LARCH.window_start)
            & (sparse.energy <= got.e0 + LARCH.window_stop)
        )
        print(f"prepared: E0 {got.e0:.2f}, {inside} data point(s) in the model window")


# --- 3. a measured scan that starts 24 eV below E0 is normalised as a FEFF calculation ---


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["S/FeSO4_7H2O_rt_01.xdi", "S/jarosite_rt_01.xdi"])
def test_a_measured_xanes_scan_starting_24_ev_below_e0_keeps_its_background(
    xdi_library: Path, tmp_path: Path, name: str
) -> None:
    """A fluorescence XDI scan (measured by definition) whose first point is E0-24 eV and
    under 8 % of its maximum passes ``is_calculated``'s heuristic: no pre-edge line is
    subtracted and the step comes out 30 % (FeSO4.7H2O) / 52 % (jarosite) above the full
    scan's. Declared measured (meta calculated=False) the same cut agrees with the full
    scan to 0.1 % / 1.7 %: the misclassification is the error. Neither the XDI adapter nor
    the daemon declares measured data as measured."""
    src = xdi_library / name
    full = prepare(read_spectrum_file(src), LARCH)
    cut = read_spectrum_file(_cut_xdi(src, tmp_path / "cut.xdi", full.e0 - 24.0))
    got = prepare(cut, LARCH)
    assert got.edge_step == pytest.approx(full.edge_step, rel=0.05)


# --- 4. an XDI file with a UTF-8 byte-order mark is read as a two-column file ------------


def test_xdi_with_a_byte_order_mark_is_not_read_as_energy_and_i0(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM. ``is_xdi`` then misses the ``# XDI/`` line,
    the dispatcher falls back to ``read_two_column``, which skips the first line as a header
    row and takes columns 1-2: mu becomes I0, silently (no error, element from the caller)."""
    path = tmp_path / "CuO_bom.xdi"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + table(ENERGY, I0, IT, IR)).encode())
    try:
        s = read_spectrum_file(path, element="Cu")
    except (XdiError, SpectrumError):
        return  # refused with a reason: acceptable
    assert not np.array_equal(s.mu, I0), "mu is the I0 column"
    np.testing.assert_allclose(s.mu, mu_from_channels("transmission", I0, IT))


# --- 5. legacy normalisation hands steps of ~0.1 % of the edge to the model -------------


@pytest.mark.shared_data
def test_legacy_normalisation_refuses_an_undetermined_step(xdi_library: Path) -> None:
    """Se K Na2SeO4 (transmission, E0-156..+741 eV): the legacy post-edge fit (degree 2,
    +40..+110 eV) gives a step of 0.00108 where Larch conventions give 0.161, and the
    normalised spectrum reaching 650 goes to a legacy bundle's model: the larch path's
    ``max_norm`` guard (|y| <= 10 in the window) has no counterpart in the legacy path."""
    s = read_spectrum_file(xdi_library / "Se" / "Se_Na2SeO4_rt_01.xdi")
    legacy = PrepParams(method="legacy")
    try:
        got = prepare(s, legacy)
    except SpectrumError:
        return
    assert float(np.abs(got.y).max()) <= legacy.max_norm, (got.edge_step, np.abs(got.y).max())


# --- 6. an edge just outside the +-40 eV search window gives E0 at the window's edge -----


@pytest.mark.shared_data
@pytest.mark.parametrize("offset", [42.0, 45.0])
def test_an_edge_outside_the_search_window_is_not_pinned_to_its_border(
    xdi_library: Path, offset: float
) -> None:
    """Cu metal with the energy axis ``offset`` eV high (a mono calibration off by that
    much): the true edge (8980.5 + offset) lies beyond tab+40 = 9018.9 eV, and find_e0
    returns 9017.3, the first grid point past the 1.5 eV masked margin, i.e. the border of
    the search window, not a maximum of the derivative. The spectrum is prepared with E0
    5-8 eV below its edge instead of being refused (no_edge) for an edge outside the window."""
    s = read_spectrum_file(xdi_library / "Cu" / "cu_metal_rt.xdi")
    true_e0 = prepare(s, LARCH).e0 + offset
    shifted = s.with_(energy=s.energy + offset)
    try:
        got = prepare(shifted, LARCH)
    except SpectrumError:
        return
    assert got.e0 == pytest.approx(true_e0, abs=2.0)


def test_a_scan_too_narrow_for_e0_says_so_without_an_element() -> None:
    """Before: a scan under 2 eV wide with no element was refused as "no data near the None K
    edge". The reason now names the span and what E0 needs, and names no element it lacks;
    with an element whose edge the data reach, the edge is named."""
    energy = np.linspace(8979.0, 8980.5, 16)
    mu = np.linspace(0.0, 1.0, 16)
    with pytest.raises(SpectrumError) as bare:
        find_e0(Spectrum(energy, mu, None, "K"))
    assert bare.value.reason == "no_edge"
    assert "None" not in str(bare.value)
    assert "1.5 eV" in str(bare.value) and "at least 2 eV" in str(bare.value)
    with pytest.raises(SpectrumError) as named:
        find_e0(Spectrum(energy, mu, "Cu", "K"))
    assert "Cu K edge" in str(named.value) and "None" not in str(named.value)
