"""XDI files: fields, columns, modes, malformed files, HERFD, the dispatcher, the library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import ENERGY, HEADER, I0, IR, IT, table, write

from xasflow.adapters.columns import read_spectrum_file
from xasflow.adapters.xdi import XdiError, read_xdi, xdi_to_spectrum
from xasflow.spectra.core import SpectrumError


@pytest.fixture
def cu_xdi(tmp_path: Path) -> Path:
    return write(tmp_path / "CuO_test.xdi", HEADER + table(ENERGY, I0, IT, IR))


def test_read_xdi_fields_and_columns(cu_xdi: Path) -> None:
    x = read_xdi(cu_xdi)
    assert x.columns == ["energy", "i0", "itrans", "irefer"]
    assert x.fields["Element.symbol"] == "Cu"
    assert x.fields["Sample.name"] == "copper oxide, tenorite"
    assert "a free comment line" not in x.fields  # comments after /// are not fields
    assert (x.element, x.edge) == ("Cu", "K")
    assert x.data.shape == (5, 4)
    np.testing.assert_array_equal(x.column("ITRANS"), IT)
    with pytest.raises(KeyError, match=r"no column 'ifluor'.*'energy', 'i0', 'itrans', 'irefer'"):
        x.column("ifluor")


def test_transmission_mu_and_reference(cu_xdi: Path) -> None:
    s = xdi_to_spectrum(read_xdi(cu_xdi))
    np.testing.assert_array_equal(s.energy, ENERGY)
    np.testing.assert_array_equal(s.mu, np.log(I0 / IT))
    np.testing.assert_array_equal(s.meta["reference_mu"], np.log(IT / IR))
    assert (s.element, s.edge, s.e0) == ("Cu", "K", None)
    assert s.meta["name"] == "CuO_test"
    assert s.meta["source"] == str(cu_xdi)
    assert s.meta["sample"] == "CuO"
    assert s.meta["mode"] == "transmission"
    assert s.meta["nominal_edge_energy"] == 8979.0


def test_unsorted_energies_keep_reference_aligned(tmp_path: Path) -> None:
    order = np.array([3, 0, 4, 1, 2])
    path = write(
        tmp_path / "shuffled.xdi", HEADER + table(ENERGY[order], I0[order], IT[order], IR[order])
    )
    s = xdi_to_spectrum(read_xdi(path))
    np.testing.assert_array_equal(s.energy, ENERGY)
    np.testing.assert_array_equal(s.mu, np.log(I0 / IT))
    np.testing.assert_array_equal(s.meta["reference_mu"], np.log(IT / IR))


def test_fluorescence_and_label_line_columns(tmp_path: Path) -> None:
    # no Column.N fields and no "# ///": names come from the last comment line
    text = "#XDI/1.1\n# Element.symbol:  Fe\n# Element.edge: K\n#---\n#  energy  ifluor  i0\n"
    path = write(tmp_path / "fe.xdi", text + table(ENERGY - 1868.0, IT, I0))
    x = read_xdi(path)
    assert x.columns == ["energy", "ifluor", "i0"]
    s = xdi_to_spectrum(x)
    assert s.meta["mode"] == "fluorescence"
    assert s.element == "Fe"
    np.testing.assert_array_equal(s.mu, IT / I0)
    assert "reference_mu" not in s.meta


def test_stored_mu_column_and_forced_modes(tmp_path: Path) -> None:
    mu = np.array([0.1, 0.2, 1.1, 1.3, 1.2])
    text = "# XDI/1.0\n# Column.1: energy eV\n# Column.2: mutrans\n# Column.3: i0\n#---\n"
    path = write(tmp_path / "mu.xdi", text + table(ENERGY, mu, I0))
    x = read_xdi(path)
    s = xdi_to_spectrum(x)
    assert s.meta["mode"] == "mu"
    assert s.element is None
    np.testing.assert_array_equal(s.mu, mu)
    with pytest.raises(SpectrumError) as err:
        xdi_to_spectrum(x, mode="transmission")
    assert err.value.reason == "no_channel"
    with pytest.raises(ValueError, match="mode must be one of"):
        xdi_to_spectrum(x, mode="xmcd")


def test_forced_mu_mode_ignores_raw_channels(tmp_path: Path) -> None:
    mu = np.array([0.1, 0.2, 1.1, 1.3, 1.2])
    text = "# XDI/1.0\n# Column.1: energy eV\n# Column.2: i0\n# Column.3: itrans\n# Column.4: mutrans\n#---\n"
    path = write(tmp_path / "both.xdi", text + table(ENERGY, I0, IT, mu))
    x = read_xdi(path)
    np.testing.assert_array_equal(xdi_to_spectrum(x).mu, np.log(I0 / IT))
    np.testing.assert_array_equal(xdi_to_spectrum(x, mode="mu").mu, mu)


def test_non_positive_intensity_is_bad_channel(tmp_path: Path) -> None:
    bad_it = IT.copy()
    bad_it[2] = 0.0
    path = write(tmp_path / "bad.xdi", HEADER + table(ENERGY, I0, bad_it, IR))
    with pytest.raises(SpectrumError) as err:
        xdi_to_spectrum(read_xdi(path))
    assert err.value.reason == "bad_channel"
    assert "itrans has 1 non-positive" in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("energy mu\n1 2\n", "not an XDI file"),
        (HEADER, "no data rows"),
        (HEADER + "1 2 3 4\n5 6 7\n", "data row 2 .* has 3 values, the first row has 4"),
        (HEADER + "1 2 3 4\n5 6 x 8\n", "non-numeric data row 2"),
        (
            "# XDI/1.0\n# Element.symbol: Cu\n#---\n# energy mu\n1 2 3\n",
            "cannot name 3 data columns",
        ),
    ],
)
def test_malformed_xdi(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "broken.xdi", text)
    with pytest.raises(XdiError, match=message):
        read_xdi(path)


def test_read_spectrum_file_dispatches_on_content(tmp_path: Path, cu_xdi: Path) -> None:
    plain = write(tmp_path / "plain.xdi", "8960 0.1\n8970 0.2\n8980 0.9\n")  # name lies
    assert read_spectrum_file(plain, element="Cu").meta["name"] == "plain"
    assert "reference_mu" in read_spectrum_file(cu_xdi).meta
    assert read_spectrum_file(cu_xdi, element="cu").element == "Cu"
    with pytest.raises(SpectrumError) as err:
        read_spectrum_file(cu_xdi, element="Fe")
    assert err.value.reason == "element_mismatch"
    no_element = write(
        tmp_path / "anon.xdi",
        HEADER.replace("# Element.symbol: Cu\n", "") + table(ENERGY, I0, IT, IR),
    )
    assert read_spectrum_file(no_element, element="Cu").element == "Cu"


@pytest.mark.shared_data
def test_every_cu_file_in_library(xdi_library: Path) -> None:
    files = sorted((xdi_library / "Cu").glob("*.xdi"))
    assert len(files) >= 7
    for path in files:
        s = read_spectrum_file(path)
        assert s.element == "Cu", path
        assert s.edge == "K", path
        assert s.energy[0] < 8979.0 < s.energy[-1], path
        assert s.energy.size > 300, path
        assert np.all(np.isfinite(s.mu)), path


@pytest.mark.shared_data
def test_no_measured_cu_reference_is_refused_for_its_noise(xdi_library: Path) -> None:
    """The edge-against-noise check (``PrepParams.min_edge_snr``) keeps every measured Cu
    reference: the weakest edge of the library spectra the gate sees is 24.6 times its point
    noise (pentlandite, S K; see tests/test_weak_edge_gate.py), the Cu ones above 20."""
    from xasflow.spectra import PrepParams, prepare
    from xasflow.spectra.quality import edge_snr_rows

    for path in sorted((xdi_library / "Cu").glob("*.xdi")):
        s = read_spectrum_file(path)
        prep = prepare(s, PrepParams())
        snr = edge_snr_rows(s.energy - prep.e0, s.mu, np.array([prep.edge_step]))[0]
        assert snr > 4 * PrepParams().min_edge_snr, path


@pytest.mark.shared_data
def test_every_library_file_reads(xdi_library: Path) -> None:
    files = sorted(p for p in xdi_library.rglob("*") if p.is_file())
    assert len(files) >= 250
    modes = set()
    for path in files:
        s = read_spectrum_file(path)
        if path.parent != xdi_library:  # <El>/<name>.xdi: the directory names the element
            assert s.element == path.parent.name, path
        modes.add(s.meta["mode"])
    assert modes == {"transmission", "fluorescence", "mu"}


@pytest.mark.parametrize(
    ("where", "text", "herfd"),
    [
        ("comment", "compare with the HERFD data of the same sample", False),
        ("comment", "Cu K-edge HERFD, Kalpha1 analyser", False),  # free text: no declaration
        ("field", "# Sample.name: CuO, measured for a HERFD comparison", False),
        ("field", "# Beamline.notes: HERFD spectrometer parked", False),
        ("field", "# Detector.fluor: High Energy Resolution Fluorescence analyser", True),
        ("field", "# Detector.herfd: bent Laue analyzer, Si(331), Pilatus 100K", True),  # BLA's
        ("field", "# Scan.mode: HERFD", True),
        ("field", "# Detector.if: Vortex SDD, not HERFD", False),
        ("field", "# Detector.herfd: none", False),
        # an ion chamber's description: the HERFD analyser is the fluorescence detector
        ("field", "# Detector.I0: 10 cm N2 ion chamber, HERFD analysers parked", False),
        ("field", "# Detector.itrans: ion chamber (see the HERFD run for If)", False),
        ("field", "# Detector.irefer: Cu foil, as in the HERFD scans", False),
    ],
)
def test_herfd_is_declared_by_a_detector_or_mode_field(
    tmp_path: Path, where: str, text: str, herfd: bool
) -> None:
    """HERFD is declared where XDI describes the detection: a ``Detector.*`` field (BLA, the
    HERFD software, writes ``Detector.herfd: <analyser>``) or a ``*.mode`` field. Any mention
    anywhere made a spectrum HERFD (broadened: E0 +6.7 eV, another CN): a comment saying
    "compare with the HERFD data", a sample name, and still the description of an ion
    chamber (``Detector.I0``, ``.itrans``, ``.irefer``) mentioning HERFD in passing."""
    if where == "comment":
        header = HEADER.replace("a free comment line: with a colon", text)
    else:
        header = HEADER.replace("# ///", f"{text}\n# ///")
    x = read_xdi(write(tmp_path / "CuO.xdi", header + table(ENERGY, I0, IT, IR)))
    assert x.herfd is herfd
    assert xdi_to_spectrum(x).meta.get("herfd", False) is herfd


def test_herfd_is_not_declared_by_a_file_name(tmp_path: Path, cu_xdi: Path) -> None:
    """A file's name is no part of its header: ``Cu2O_herfd_rt.xdi`` (or a copy named for a
    comparison with HERFD data) is conventional unless a field says otherwise."""
    x = read_xdi(cu_xdi)
    assert x.comments == ("a free comment line: with a colon",)
    assert not x.herfd and "herfd" not in xdi_to_spectrum(x).meta
    named = write(tmp_path / "Cu2O_herfd_rt.xdi", HEADER + table(ENERGY, I0, IT, IR))
    assert not read_xdi(named).herfd


def test_mu_comes_from_mu_from_channels(cu_xdi: Path) -> None:
    from xasflow.spectra import mu_from_channels

    x = read_xdi(cu_xdi)
    spectrum = xdi_to_spectrum(x)
    np.testing.assert_array_equal(spectrum.mu, mu_from_channels("transmission", I0, IT))
    np.testing.assert_array_equal(
        spectrum.meta["reference_mu"], mu_from_channels("reference", IT, IR)
    )


def test_nan_energies_are_refused_not_dropped(tmp_path: Path) -> None:
    """Rows with a NaN energy were sorted last and dropped as "not increasing", so the file
    came out two points shorter and was predicted, where the daemon and the two-column reader
    refuse the same data as ``not_finite``."""
    energy = ENERGY.copy()
    energy[[1, 3]] = np.nan
    path = write(tmp_path / "nan.xdi", HEADER + table(energy, I0, IT, IR).replace("nan", "NaN"))
    with pytest.raises(SpectrumError) as err:
        xdi_to_spectrum(read_xdi(path))
    assert err.value.reason == "not_finite" and err.value.message.endswith(
        "2 energies are NaN or infinite, at points 2, 4"
    )
