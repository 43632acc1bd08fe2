"""Plain column files: separators, decimal commas, headers that name mu, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import ENERGY, I0, IR, IT, table, write

from xasflow.adapters.columns import ColumnFileError, read_two_column


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
