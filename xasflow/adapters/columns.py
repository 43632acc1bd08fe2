"""Plain-text spectra: two (or more) numeric columns, energy in eV then mu; and a dispatcher.

The text is UTF-8, with or without a byte-order mark (Notepad's and Excel's "CSV UTF-8" write
one; read as data it would glue onto the first number and cost that row). Comment lines
start with ``#``; values may be separated by whitespace, commas or semicolons
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
#: A field that is a number in either convention (digits, signs, exponent, point or comma).
_NUMERIC = re.compile(r"^[+-]?[\d.,]+(?:[eE][+-]?\d+)?$")


def _decimal_commas(lines: list[str]) -> bool:
    """Whether the file writes decimal commas, decided once for the whole file: fields
    separated by ``;`` (a European spreadsheet's CSV), or whitespace-separated numbers with
    a comma (``8979,5  1,23``) and no decimal point anywhere. Per line it went wrong on
    whole numbers, which such files write without ``,0`` (``8980  0,1``)."""
    if any(";" in line for line in lines):
        return True
    numbers = [t for line in lines if len(fields := line.split()) > 1 for t in fields]
    numbers = [t for t in numbers if _NUMERIC.match(t)]
    return any(_DECIMAL_COMMA.match(t) for t in numbers) and not any("." in t for t in numbers)


def _split(line: str, decimal_commas: bool) -> list[str]:
    """A data line's fields: separated by whitespace, ``;`` or ``,`` (with decimal commas,
    by whitespace or ``;`` only, the commas becoming points)."""
    if decimal_commas:
        return [t.replace(",", ".") for t in line.replace(";", " ").split()]
    return line.replace(",", " ").split()


def read_two_column(path: str | Path, element: str | None = None, edge: str = "K") -> Spectrum:
    """Read energy (eV) and mu from the first two columns of a text file as a Spectrum."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8-sig", errors="replace")  # -sig: drop a BOM
    energy: list[float] = []
    mu: list[float] = []
    header_allowed = True
    lines = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    commas = _decimal_commas([line for _, line in lines])
    for lineno, line in lines:
        tokens = _split(line, commas)
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
            line = raw.strip().removeprefix(b"\xef\xbb\xbf").strip()  # a UTF-8 BOM
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
