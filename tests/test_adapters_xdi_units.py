"""Energy units in XDI and column files: keV converted, or refused where the file is unclear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import ENERGY, HEADER, I0, IR, IT, table, write

from xasflow.adapters.columns import ColumnFileError, read_spectrum_file, read_two_column
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra.core import SpectrumError


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
