"""Column labels written the ways beamline software writes them, in plain-text files: a
label line with a word before a colon, or XDI-style ``Column.N`` lines in a file that is not
XDI (no ``# XDI/`` version line). Each was read by position, i0 taken as mu."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import ENERGY, I0, IR, IT, table, write

from xasflow.adapters.columns import read_two_column


@pytest.mark.parametrize(
    "comments",
    [
        "# columns: energy i0 itrans irefer\n",
        "# Column labels: energy i0 itrans irefer\n# measured at 13 K\n",
        "# Column.1: energy eV\n# Column.2: i0\n# Column.3: itrans\n# Column.4: irefer\n",
        "# Column.1 = energy\n# Column.2 = i0\n# Column.3 = itrans\n# Column.4 = irefer\n",
    ],
)
def test_column_labels_after_a_word_or_as_column_lines_name_the_columns(
    tmp_path: Path, comments: str
) -> None:
    """mu is ln(i0/itrans), taken by name."""
    s = read_two_column(write(tmp_path / "labels.txt", comments + table(ENERGY, I0, IT, IR)))
    np.testing.assert_allclose(s.mu, np.log(I0 / IT), rtol=1e-12)
    assert s.meta["mu_from"] == "ln(i0/itrans)"


def test_a_note_with_a_colon_names_no_columns(tmp_path: Path) -> None:
    """A note that happens to hold a colon and as many words as columns is no label line:
    read by position as before."""
    text = "# sample: CuO pellet at 13K\n" + table(ENERGY, IT, I0, IR)
    s = read_two_column(write(tmp_path / "note.txt", text))
    np.testing.assert_array_equal(s.mu, IT)
