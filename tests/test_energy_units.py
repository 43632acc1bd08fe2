"""The energy unit rule (:mod:`xasflow.adapters.energy_units`) on a column a DAQ padded with a
``0 0`` row: the padding decides nothing, in either reader, whatever the header declares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xdi_helpers import table, write

from xasflow.adapters.columns import ColumnFileError, read_two_column
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra.core import SpectrumError

SCAN = np.arange(8880.0, 9605.0, 5.0)  # a Cu K scan, eV
MU = 0.2 + 0.0001 * (SCAN - 8880.0) + np.arctan((SCAN - 8980.0) / 4.0) / np.pi


@pytest.mark.parametrize("end", [0, -1])
def test_ev_values_declared_kev_padded_with_zeros_are_refused_on_their_bulk(
    tmp_path: Path, end: int
) -> None:
    """An eV column whose header says keV, with a padding row (``0 0``) first or last, is
    refused as ``units`` in both readers, naming the file, the unit and the bulk's range
    (8880 to 9600): the padding is set apart, as for the other unit rules, so the 0 neither
    passes the column off as keV (0 to 9600 does not lie above 200 keV) nor shows in the
    range."""
    at = 0 if end == 0 else SCAN.size
    energy, mu = np.insert(SCAN, at, 0.0), np.insert(MU, at, 0.0)
    head = "# XDI/1.0\n# Column.1: energy keV\n# Column.2: mutrans\n# Element.symbol: Cu\n#---\n"
    xdi = write(tmp_path / "says_kev.xdi", head + table(energy, mu))
    with pytest.raises(SpectrumError) as err:
        xdi_to_spectrum(read_xdi(xdi))
    assert err.value.reason == "units"
    assert str(xdi) in str(err.value) and "8880 to 9600 declared 'keV'" in str(err.value)
    two = write(
        tmp_path / "says_kev.txt", "Energy (keV),mu\n" + table(energy, mu).replace(" ", ",")
    )
    with pytest.raises(ColumnFileError) as col:
        read_two_column(two, element="Cu")
    assert str(two) in str(col.value) and "8880 to 9600 declared 'keV'" in str(col.value)
