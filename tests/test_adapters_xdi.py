"""XDI files, plain column files and the content-sniffing dispatcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import ENERGY, HEADER, I0, IR, IT, table, write

from xasflow.adapters.columns import ColumnFileError, read_spectrum_file, read_two_column
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


def test_kev_energy_is_converted(tmp_path: Path) -> None:
    text = HEADER.replace("Column.1: energy eV", "Column.1: energy keV")
    path = write(tmp_path / "kev.xdi", text + table(ENERGY / 1000.0, I0, IT, IR))
    s = xdi_to_spectrum(read_xdi(path))
    np.testing.assert_allclose(s.energy, ENERGY, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("header", "element"),
    [
        (HEADER.replace("Column.1: energy eV", "Column.1: energy"), None),
        ("\n".join(line for line in HEADER.splitlines() if "Column." not in line) + "\n", None),
        (HEADER.replace("Column.1: energy eV", "Column.1: energy").replace("Cu\n", "\n"), "Cu"),
    ],
)
def test_xdi_energy_without_unit_is_read_as_the_column_reader_reads_it(
    tmp_path: Path, header: str, element: str | None
) -> None:
    """An XDI energy column that declares no unit (a Column.1 field without one, or only
    the label line) over keV values holding the declared edge x 1000 is keV, as the column
    reader decides (it was read as eV: Cu's edge at "8.98 eV")."""
    path = write(tmp_path / "kev.xdi", header + table(ENERGY / 1000.0, I0, IT, IR))
    s = read_spectrum_file(path, element=element)
    np.testing.assert_allclose(s.energy, ENERGY, rtol=1e-12)
    assert str(s.meta["energy_unit"]).startswith("keV")
    ev = read_spectrum_file(write(tmp_path / "ev.xdi", header + table(ENERGY, I0, IT, IR)))
    np.testing.assert_array_equal(ev.energy, ENERGY)  # eV values stay eV
    assert "energy_unit" not in ev.meta


@pytest.mark.parametrize(
    ("symbol", "message"),
    [("", "no element was given"), ("Fe", "do not hold the Fe K edge at 7112.0 eV")],
)
def test_xdi_energy_without_unit_that_may_be_kev_is_refused(
    tmp_path: Path, symbol: str, message: str
) -> None:
    """Energies of a few "eV" with no unit and no edge they hold x 1000 are refused, naming
    the file and the remedy, as by the column reader: never read as eV."""
    header = HEADER.replace("Column.1: energy eV", "Column.1: energy")
    header = header.replace("Element.symbol: Cu", f"Element.symbol: {symbol}")
    path = write(tmp_path / "kev.xdi", header + table(ENERGY / 1000.0, I0, IT, IR))
    with pytest.raises(SpectrumError, match=message) as err:
        xdi_to_spectrum(read_xdi(path))
    assert err.value.reason == "units"
    assert str(path) in str(err.value)
    assert "energy keV" in str(err.value)


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


def test_two_column_whitespace_and_comments(tmp_path: Path) -> None:
    text = "# energy mu\n# from a reference\n8960.0 0.1 99\n\n8970.0 0.2 99\n8980.0 1.5 99\n"
    s = read_two_column(write(tmp_path / "ref.dat", text), element="cu")
    np.testing.assert_array_equal(s.energy, [8960.0, 8970.0, 8980.0])
    np.testing.assert_array_equal(s.mu, [0.1, 0.2, 1.5])
    assert (s.element, s.edge, s.meta["name"]) == ("Cu", "K", "ref")


def test_two_column_csv_with_header_row(tmp_path: Path) -> None:
    text = "energy,mu\n7100.0,0.5\n7110.0,0.7\n7120.0,1.2\n"
    s = read_two_column(write(tmp_path / "fe.csv", text), element="Fe", edge="k")
    np.testing.assert_array_equal(s.mu, [0.5, 0.7, 1.2])
    assert s.edge == "K"


@pytest.mark.parametrize(
    "text",
    [
        "energy;mu\n8960,0;0,1\n8970,5;-0,25\n8980,0;1,5e0\n",  # a European spreadsheet's CSV
        "8960,0\t0,1\n8970,5\t-0,25\n8980,0\t1,5e0\n",  # tab-separated, decimal commas
        "8960\t0,1\n8970,5\t-0,25\n8980\t1,5\n",  # whole numbers written without ",0"
        "8960 0,1 12\n8970,5 -0,25 7\n8980 1,5 3\n",  # and an integer counts column
        "8960.0,0.1\n8970.5,-0.25\n8980.0,1.5\n",  # plain CSV: commas separate
        "8960.0, 0.1, 12\n8970.5, -0.25, 7\n8980, 1.5, 3\n",  # CSV with spaces and integers
        "8960.0\t1e-1\n8970.5\t-2.5E-1\n8980\t1.5\n",  # tabs, points, exponents
    ],
)
def test_two_column_decimal_commas(tmp_path: Path, text: str) -> None:
    """Decimal commas are read as such, not as column separators (which once gave a mu of 0
    and an energy's integer part)."""
    s = read_two_column(write(tmp_path / "eu.csv", text), element="Cu")
    np.testing.assert_array_equal(s.energy, [8960.0, 8970.5, 8980.0])
    np.testing.assert_array_equal(s.mu, [0.1, -0.25, 1.5])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8960.0\n8970.0\n8980.0\n", "only 1 column"),
        ("8960.0 0.1\nabc def\n8980.0 0.3\n", r":2: not numeric"),
        ("# nothing\n", "no numeric data rows"),
    ],
)
def test_two_column_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ColumnFileError, match=message):
        read_two_column(write(tmp_path / "x.txt", text))


@pytest.mark.parametrize(
    ("header", "channels", "want"),
    [
        ("energy i0 itrans", (I0, IT), np.log(I0 / IT)),  # i0 was taken for mu
        ("Energy (eV),I0,It", (I0, IT), np.log(I0 / IT)),  # units; "it" for itrans
        ("energy\ti0\tifluor", (I0, IT), IT / I0),  # fluorescence
        ("E;mu(E);i0", (IT, I0), IT),  # mu named, an extra channel beside it
        ("# energy i0 itrans irefer", (I0, IT, IR), np.log(I0 / IT)),  # a commented label line
        ("#  omega  e  k  mu  mu0  chi  @#", (IT, I0, IR, IT, IR), IR),  # FEFF's xmu.dat
    ],
)
def test_two_column_header_names_the_columns(
    tmp_path: Path, header: str, channels: tuple[np.ndarray, ...], want: np.ndarray
) -> None:
    """A header naming the columns says which is mu: energy + mu, or i0 + itrans/it
    (ln(i0/it)), or i0 + ifluor (ifluor/i0), as the XDI reader takes them. The reader took
    the second column for mu whatever its name (i0, or FEFF's relative energy e)."""
    sep = ";" if ";" in header else "\t" if "\t" in header else "," if "," in header else " "
    rows = table(ENERGY, *channels).replace(" ", sep)
    s = read_two_column(write(tmp_path / "named.txt", header + "\n" + rows), element="Cu")
    np.testing.assert_array_equal(s.energy, ENERGY)
    np.testing.assert_allclose(s.mu, want, rtol=1e-12)


@pytest.mark.parametrize(
    ("header", "names"),
    [
        ("energy i0 irefer", "['energy', 'i0', 'irefer']"),  # no signal beside i0
        ("energy,intensity", "['energy', 'intensity']"),  # a name that is not mu
        ("x y", "['x', 'y']"),  # no energy named
    ],
)
def test_two_column_header_that_does_not_say_what_mu_is_is_refused(
    tmp_path: Path, header: str, names: str
) -> None:
    """Names that do not say what mu is are refused, naming them (the second column was
    taken for mu, and i0 refused later as a misleading "edge step is not positive")."""
    path = write(tmp_path / "unnamed.txt", header + "\n" + table(ENERGY, I0, IT))
    with pytest.raises(ColumnFileError, match="does not say what mu is") as err:
        read_two_column(path, element="Cu")
    assert names in str(err.value)


@pytest.mark.parametrize(
    "comments",
    [
        "# energy i0 itrans irefer\n# measured at 13 K\n",  # a note between it and the data
        "# energy i0 itrans irefer\n# ------\n",  # Athena's rule line below the labels
        "# sample CuO\n# energy i0 itrans irefer\n# two runs merged\n",
    ],
)
def test_a_label_line_above_other_comments_names_the_columns(tmp_path: Path, comments: str) -> None:
    """A comment line naming every column, energy first, and what mu is, is the header
    also with other comments between it and the data: mu is ln(i0/itrans). Only the line
    just above the data counted: i0 was read as mu, and refused as "mu never rises"."""
    text = comments + table(ENERGY, I0, IT, IR)
    s = read_two_column(write(tmp_path / "labels.txt", text), element="Cu")
    np.testing.assert_allclose(s.mu, np.log(I0 / IT), rtol=1e-12)
    assert s.meta["mu_from"] == "ln(i0/itrans)"


def test_two_column_without_a_header_is_read_by_position(tmp_path: Path) -> None:
    """No header (or a comment that names no columns): energy and mu are columns 1 and 2."""
    text = "# measured at 13 K\n# two runs merged\n" + table(ENERGY, IT, I0)
    s = read_two_column(write(tmp_path / "plain.txt", text))
    np.testing.assert_array_equal(s.mu, IT)


@pytest.mark.parametrize(
    ("header", "sep", "element"),
    [
        ("energy (keV) mu", " ", None),  # the unit on its own after a space
        ("Energy [keV],mu", ",", None),
        ("E/keV;mu", ";", None),
        ("energy_keV\tmu", "\t", None),
        ("keV mu", " ", None),
        ("# energy mu", " ", "Cu"),  # no unit: the declared Cu K edge lies in the values x 1000
        ("", " ", "cu"),  # no header at all
    ],
)
def test_two_column_energies_in_kev_are_converted(
    tmp_path: Path, header: str, sep: str, element: str | None
) -> None:
    """Energies in keV, said by the header's unit or by the values for the declared edge,
    are read in eV (they were read as eV: Cu's edge at "8.98 eV"); the spectrum says so."""
    rows = table(ENERGY / 1000.0, IT).replace(" ", sep)
    text = (header + "\n" if header else "") + rows
    s = read_two_column(write(tmp_path / "kev.txt", text), element=element)
    np.testing.assert_allclose(s.energy, ENERGY, rtol=1e-12)
    np.testing.assert_array_equal(s.mu, IT)
    assert str(s.meta["energy_unit"]).startswith("keV")
    assert "energy_unit" not in read_two_column(write(tmp_path / "ev.txt", table(ENERGY, IT))).meta


@pytest.mark.parametrize(
    ("element", "message"),
    [
        (None, "no element was given"),
        ("Fe", "do not hold the Fe K edge at 7112.0 eV"),  # keV, but not of the declared edge
    ],
)
def test_two_column_energies_that_may_be_kev_are_refused(
    tmp_path: Path, element: str | None, message: str
) -> None:
    """Energies of a few "eV" with no unit lie below every edge: without a declared edge
    they may only be keV, and they are refused with the remedy, never read as eV."""
    path = write(tmp_path / "kev.txt", table(ENERGY / 1000.0, IT))
    with pytest.raises(ColumnFileError, match=message) as err:
        read_two_column(path, element=element)
    assert "energy (keV)" in str(err.value)


def test_xdi_declared_ev_over_kev_values_is_refused(tmp_path: Path) -> None:
    """A file that says eV (``Column.1: energy eV``) over values that can only be keV
    (8.96 to 9: below every tabulated edge) contradicts itself: refused naming the file,
    the declared unit and the values, not converted (it was read as eV: E0 near 9 eV)."""
    path = write(tmp_path / "says_ev.xdi", HEADER + table(ENERGY / 1000.0, I0, IT, IR))
    with pytest.raises(SpectrumError) as err:
        xdi_to_spectrum(read_xdi(path))
    assert err.value.reason == "units"
    assert str(path) in str(err.value)
    assert "declared 'eV'" in str(err.value)
    assert "8.96 to 9" in str(err.value)


@pytest.mark.parametrize("header", ["Energy (eV),mu", "E/eV;mu", "# energy_eV mu"])
def test_two_column_declared_ev_over_kev_values_is_refused(tmp_path: Path, header: str) -> None:
    """A column header saying eV over values that can only be keV is refused, naming the
    file, the declared unit and the values, even with an element whose edge they hold x
    1000: the file contradicts itself and the reader does not pick a side."""
    sep = ";" if ";" in header else "," if "," in header else " "
    path = write(
        tmp_path / "says_ev.txt", header + "\n" + table(ENERGY / 1000.0, IT).replace(" ", sep)
    )
    with pytest.raises(ColumnFileError) as err:
        read_two_column(path, element="Cu")
    assert str(path) in str(err.value)
    assert "declared 'eV'" in str(err.value)
    assert "8.96 to 9" in str(err.value)
    s = read_two_column(
        write(tmp_path / "ev.txt", header + "\n" + table(ENERGY, IT).replace(" ", sep))
    )
    np.testing.assert_array_equal(s.energy, ENERGY)


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
    reference: the weakest edge of the 273 library spectra is 28 times its point noise."""
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
    assert err.value.reason == "not_finite" and "2 energies" in str(err.value)


def test_declared_kev_over_ev_values_is_refused(tmp_path: Path) -> None:
    """The mirror case: keV said of values that can only be eV (8960 to 9000 keV is far above
    every absorption edge) is refused naming the file, the unit and the values, in both
    readers (it was multiplied by 1000: E0 near 9 MeV)."""
    xdi = write(
        tmp_path / "says_kev.xdi",
        HEADER.replace("Column.1: energy eV", "Column.1: energy keV") + table(ENERGY, I0, IT, IR),
    )
    with pytest.raises(SpectrumError) as err:
        xdi_to_spectrum(read_xdi(xdi))
    assert err.value.reason == "units"
    assert str(xdi) in str(err.value) and "declared 'keV'" in str(err.value)
    assert "8960 to 9000" in str(err.value)
    two = write(
        tmp_path / "says_kev.txt", "Energy (keV),mu\n" + table(ENERGY, IT).replace(" ", ",")
    )
    with pytest.raises(ColumnFileError) as col:
        read_two_column(two, element="Cu")
    assert str(two) in str(col.value) and "declared 'keV'" in str(col.value)
    s = read_two_column(
        write(
            tmp_path / "kev.txt", "Energy (keV),mu\n" + table(ENERGY / 1000, IT).replace(" ", ",")
        )
    )
    np.testing.assert_allclose(s.energy, ENERGY)


EDGE_SCAN = np.arange(8880.0, 9605.0, 5.0)  # a Cu K scan, eV
EDGE_MU = 0.2 + 0.0001 * (EDGE_SCAN - 8880.0) + np.arctan((EDGE_SCAN - 8980.0) / 4.0) / np.pi


@pytest.mark.parametrize("end", [0, -1])
@pytest.mark.parametrize("reader", ["xdi", "columns"])
def test_kev_column_without_unit_padded_with_zeros_is_read_as_kev(
    tmp_path: Path, reader: str, end: int
) -> None:
    """A keV column with no unit whose first or last row is a DAQ's padding (``0 0``) is
    keV by its bulk (8.88 to 9.6), the padding set apart as the spectra code sets apart
    stray ends: it was read as eV (0 to 9.6) and refused as ``no_edge`` at "9.6 eV"."""
    at = 0 if end == 0 else EDGE_SCAN.size
    energy, mu = np.insert(EDGE_SCAN / 1000.0, at, 0.0), np.insert(EDGE_MU, at, 0.0)
    if reader == "xdi":
        head = "# XDI/1.0\n# Column.1: energy\n# Column.2: mutrans\n# Element.symbol: Cu\n#---\n"
        path = write(tmp_path / "padded.xdi", head + table(energy, mu))
    else:
        path = write(tmp_path / "padded.txt", "# energy mu\n" + table(energy, mu))
    s = read_spectrum_file(path, element="Cu")
    assert str(s.meta["energy_unit"]).startswith("keV (the Cu K edge")
    np.testing.assert_allclose(s.energy, np.insert(EDGE_SCAN, 0, 0.0), rtol=1e-12)
    np.testing.assert_array_equal(s.mu, np.insert(EDGE_MU, 0, 0.0))
    from xasflow.spectra import PrepParams, prepare

    assert abs(prepare(s, PrepParams()).e0 - 8980.0) < 5.0  # the padding is no pre-edge


def test_kev_column_padded_with_zeros_is_refused_with_the_units_message(tmp_path: Path) -> None:
    """Padded keV values with no edge to tell, or declared eV, are refused as ``units`` on
    their bulk's range, as unpadded ones are (they were read as eV from 0)."""
    energy, mu = np.insert(EDGE_SCAN / 1000.0, 0, 0.0), np.insert(EDGE_MU, 0, 0.0)
    plain = write(tmp_path / "padded.txt", "# energy mu\n" + table(energy, mu))
    with pytest.raises(ColumnFileError, match="no element was given") as err:
        read_two_column(plain)
    assert "energies 8.88 to 9.6 with no unit" in str(err.value)
    head = "# XDI/1.0\n# Column.1: energy eV\n# Column.2: mutrans\n# Element.symbol: Cu\n#---\n"
    says_ev = write(tmp_path / "says_ev.xdi", head + table(energy, mu))
    with pytest.raises(SpectrumError, match="declared 'eV'") as xdi:
        xdi_to_spectrum(read_xdi(says_ev))
    assert xdi.value.reason == "units" and "8.88 to 9.6" in str(xdi.value)
