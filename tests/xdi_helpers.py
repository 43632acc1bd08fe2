"""A small XDI file's pieces (Cu K, CuO) that the XDI and spectra-edge tests write files from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ENERGY = np.array([8960.0, 8970.0, 8980.0, 8990.0, 9000.0])
I0 = np.array([1000.0, 1010.0, 1020.0, 1030.0, 1040.0])
IT = np.array([500.0, 490.0, 300.0, 250.0, 260.0])
IR = np.array([400.0, 380.0, 200.0, 150.0, 160.0])

HEADER = """\
# XDI/1.0 GSE/1.0
# Column.1: energy eV
# Column.2: i0
# Column.3: itrans
# Column.4: irefer
# Element.symbol: Cu
# Element.edge: K
# Sample.formula: CuO
# Sample.name: copper oxide, tenorite
# Scan.edge_energy: 8979.0
# ///
# a free comment line: with a colon
#----
# energy i0 itrans irefer
"""


def table(*cols: np.ndarray) -> str:
    """Columns as the text rows of a data table (floats written exactly)."""
    return "\n".join(" ".join(repr(float(v)) for v in row) for row in np.column_stack(cols)) + "\n"


def write(path: Path, text: str) -> Path:
    """``text`` written to ``path``; the path back."""
    path.write_text(text)
    return path
