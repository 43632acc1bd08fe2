"""Plain-text spectra: two (or more) numeric columns, energy in eV then mu; and a dispatcher.

Comment lines start with ``#``; values may be separated by whitespace, commas or semicolons
(with semicolons, or numbers like ``8979,5``, commas are decimal commas);
one non-numeric header row (``energy,mu``) at the top is allowed. Extra columns are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra.core import Spectrum, SpectrumError


class ColumnFileError(ValueError):
    """A text file that does not hold an energy column and a mu column."""


#: A number written with a decimal comma, as spreadsheets in many locales export it.
_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+(?:[eE][+-]?\d+)?$")


def _split(line: str) -> list[str]:
    """A data line's fields: separated by whitespace, ``;`` or ``,``.

    With ``;`` between the fields, or fields that are whitespace-separated numbers each with
    one comma and no point (``8979,5  1,2345``), the commas are decimal commas (a European
    spreadsheet's export), not separators: read as such, never as extra columns (which made
    ``8779,000;-1,30705`` an energy of 8779 and a mu of 0).
    """
    if ";" in line:
        return [t.replace(",", ".") for t in line.replace(";", " ").split()]
    fields = line.split()
    if len(fields) > 1 and all(_DECIMAL_COMMA.match(t) for t in fields):
        return [t.replace(",", ".") for t in fields]
    return line.replace(",", " ").split()


def read_two_column(path: str | Path, element: str | None = None, edge: str = "K") -> Spectrum:
    """Read energy (eV) and mu from the first two columns of a text file as a Spectrum."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    energy: list[float] = []
    mu: list[float] = []
    header_allowed = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = _split(line)
        try:
            values = [float(t) for t in tokens[:2]]
        except ValueError:
            if header_allowed:
                header_allowed = False
                continue
            raise ColumnFileError(
                f"{path}:{lineno}: not numeric: {line[:60]!r} (expected energy and mu columns)"
            ) from None
        header_allowed = False
        if len(values) < 2:
            raise ColumnFileError(
                f"{path}:{lineno}: only {len(values)} column(s), need energy and mu"
            )
        energy.append(values[0])
        mu.append(values[1])
    if not energy:
        raise ColumnFileError(f"{path}: no numeric data rows")
    return Spectrum(
        energy=np.asarray(energy),
        mu=np.asarray(mu),
        element=element,
        edge=edge,
        meta={"name": path.stem, "source": str(path)},
    )


def is_xdi(path: str | Path) -> bool:
    """True when the file's first non-blank line is an XDI version line (``# XDI/``)."""
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.strip()
            if line:
                return line.startswith(b"#") and b"XDI/" in line.upper()
    return False


def read_spectrum_file(path: str | Path, element: str | None = None) -> Spectrum:
    """Read an XDI or a plain column file, chosen by content, as a Spectrum.

    ``element`` fills in the element when the file does not name one; if the file names a
    different element, SpectrumError("element_mismatch") is raised rather than guessing.
    """
    if not is_xdi(path):
        return read_two_column(path, element=element)
    spectrum = xdi_to_spectrum(read_xdi(path))
    if element is None:
        return spectrum
    wanted = element.strip().capitalize()
    if spectrum.element is None:
        return spectrum.with_(element=wanted)
    if spectrum.element != wanted:
        raise SpectrumError("element_mismatch", f"the file names {spectrum.element}, not {wanted}")
    return spectrum
