"""Plain-text spectra: two (or more) numeric columns, energy (eV or keV) then mu; a dispatcher.

The text is UTF-8, with or without a byte-order mark (Notepad's and Excel's "CSV UTF-8" write
one; read as data it would glue onto the first number and cost that row). Comment lines
start with ``#``; values may be separated by whitespace, commas or semicolons
(with semicolons, or numbers like ``8979,5``, commas are decimal commas).
One non-numeric header row at the top names the columns (so may a comment line just above
the data that names each column, the first an energy, as XDI's label line and FEFF's
``xmu.dat`` do, or one further up that also says what mu is, or XDI-style ``Column.N``
lines; a label line may start with a word and a colon, ``# columns: energy i0 it``): mu is
then taken by name, as the XDI reader takes it (i0 and itrans or it: ln(i0/it); i0 and
ifluor: ifluor/i0; else a mu column), and names that do not say what mu is are refused
with the names found. Without one, energy and mu are columns 1 and 2; extra columns are
ignored. Mu from detector channels is a measurement (``meta["calculated"]`` False, as the XDI
reader's), held to a measured scan's pre-edge; a mu column is left to the per-spectrum guess
(:func:`xasflow.spectra.normalization.is_calculated`). Energies are eV, or keV where the
header's unit says so ("Energy (keV)", "E/keV") or, with no unit, where all lie below 200
and the declared edge lies in their range times 1000; below 200 without that, or under an
eV unit (the file contradicts itself), they are refused, never read as eV
(:mod:`xasflow.adapters.energy_units`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np

from xasflow.adapters.energy_units import EV_PER_UNIT, energy_in_ev
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra.channels import mu_from_channels
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


Layout = Literal["transmission", "fluorescence", "mu"]  # how mu comes from the columns

#: Column names a header may give (lower case, a bracketed unit and punctuation dropped:
#: "Energy (eV)" is energy, "mu(E)" mu, "I_0" i0), in the order they are preferred.
_ENERGY = ("energy", "omega", "e", "ev", "en", "enrg", "kev")
_MU = ("mutrans", "mufluor", "mu", "xmu", "absorption", "absorbance", "norm", "flat")
_I0 = ("i0", "io")
_ITRANS = ("itrans", "it")
_IFLUOR = ("ifluor", "if")
_NAMES_HELP = (
    "name the columns energy and mu, or energy, i0 and itrans (or it), or energy, i0 and "
    "ifluor; or start the line with '#' to read energy and mu from columns 1 and 2"
)


def _name(token: str) -> str:
    """A header token as a column name: lower case, no bracketed unit nor ``/eV`` (``_keV``),
    letters and digits only ("" for a token that is only a unit or punctuation, as ``(eV)``)."""
    bare = re.sub(r"[(\[{].*?[)\]}]", "", token).lower().strip()
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\s*[/_-]\s*k?ev$", "", bare))


def _unit(token: str) -> str:
    """The energy unit a header token gives (a key of ``EV_PER_UNIT``, or ""): bracketed
    ("Energy (keV)", "E [eV]"), after ``/``, ``_`` or ``-`` ("E/keV", "energy_keV"), or the
    token itself ("keV")."""
    low = token.lower().strip()
    found = re.search(r"[(\[{](.*?)[)\]}]", low) or re.search(r"[/_-]\s*([a-z]+)$", low)
    unit = re.sub(r"[^a-z]", "", found.group(1) if found else low)
    return unit if unit in EV_PER_UNIT else ""


def _header_fields(line: str, decimal_commas: bool) -> list[tuple[str, str]]:
    """(name, energy unit or "") of each column a header line names: fields separated by
    ``;``, tabs or (without decimal commas) commas when it has any, else by whitespace; a
    unit on its own (``Energy (keV)`` split at the space) belongs to the name before it."""
    body = line.lstrip("#").strip()
    seps = ";\t" if decimal_commas else ";\t,"
    fields = re.split(f"[{seps}]", body) if any(c in body for c in seps) else body.split()
    out: list[tuple[str, str]] = []
    for field in fields:
        name, unit = _name(field), _unit(field)
        if name:
            out.append((name, unit))
        elif unit and out and not out[-1][1]:
            out[-1] = (out[-1][0], unit)
    return out


def _first(names: list[str], wanted: tuple[str, ...]) -> int | None:
    """Index of the first column named one of ``wanted`` (in ``wanted``'s order), or None."""
    for name in wanted:
        if name in names:
            return names.index(name)
    return None


def _says(names: list[str]) -> tuple[tuple[int, ...], Layout] | None:
    """Which columns ``names`` say hold (energy, mu) or (energy, i0, signal), and how mu
    comes from them; None when they do not say."""
    energy = _first(names, _ENERGY)
    i0, itrans, ifluor = _first(names, _I0), _first(names, _ITRANS), _first(names, _IFLUOR)
    mu = _first(names, _MU)
    if energy is not None:
        if i0 is not None and itrans is not None:
            return (energy, i0, itrans), "transmission"
        if i0 is not None and ifluor is not None:
            return (energy, i0, ifluor), "fluorescence"
        if mu is not None:
            return (energy, mu), "mu"
    return None


def _layout(path: Path, names: list[str]) -> tuple[tuple[int, ...], Layout]:
    """:func:`_says` of a header's ``names``; ColumnFileError, naming them, when they do not
    say what mu is."""
    found = _says(names)
    if found is not None:
        return found
    raise ColumnFileError(
        f"{path}: the header names the columns {names}, which does not say what mu is "
        f"({_NAMES_HELP})"
    )


#: XDI's column lines (``# Column.2: i0``, or ``=``), also outside an XDI file
_COLUMN_LINE = re.compile(r"^#\s*column\.(\d+)\s*[:=]\s*(.+)$", re.IGNORECASE)
#: a word or two and a colon before a label line's names (``# columns: energy i0 itrans``)
_LABEL_PREFIX = re.compile(r"^#?\s*[A-Za-z][A-Za-z ]{0,20}:\s*")


def _column_lines(comments: list[str], width: int, decimal_commas: bool) -> list[tuple[str, str]]:
    """The columns ``Column.N`` comment lines name, when they name 1..``width`` ([]: not)."""
    named: dict[int, tuple[str, str]] = {}
    for line in comments:
        found = _COLUMN_LINE.match(line)
        if found is not None:
            fields = _header_fields(found.group(2), decimal_commas)
            if fields:
                named[int(found.group(1))] = fields[0]
    if sorted(named) != list(range(1, width + 1)):
        return []
    return [named[k] for k in range(1, width + 1)]


def _label_line(comments: list[str], width: int, decimal_commas: bool) -> list[tuple[str, str]]:
    """The columns a comment line above the data names ([]: none does): the line just above
    when it names all ``width`` columns, energy first; else the last line further up that
    does and says what mu is (:func:`_says`), or ``Column.N`` lines that do. A label line may
    start with a word and a colon (``# columns:``). A note or a rule line (Athena's ``# ---``)
    may lie between the labels and the data: the file was read by position, i0 as mu."""
    for k, line in enumerate(reversed(comments)):
        for text in dict.fromkeys([line, _LABEL_PREFIX.sub("", line, count=1)]):
            labels = _header_fields(text, decimal_commas)
            if len(labels) != width or labels[0][0] not in _ENERGY:
                continue
            if k == 0 or _says([name for name, _ in labels]) is not None:
                return labels
    labels = _column_lines(comments, width, decimal_commas)
    if labels and labels[0][0] in _ENERGY and _says([name for name, _ in labels]) is not None:
        return labels
    return []


def read_two_column(path: str | Path, element: str | None = None, edge: str = "K") -> Spectrum:
    """Read energy (in eV: keV converted) and mu from a text file as a Spectrum: the columns
    a header names (see the module docstring), else the first two."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\x1f\x8b"):  # read as text, its bytes made a nonsense header
        raise ColumnFileError(
            f"{path}: a gzip archive, not a text file: unpack it (gunzip) and give the file inside"
        )
    if b"\x00" in raw:  # UTF-16 (Windows' "Unicode text") or binary: no UTF-8 text has one
        raise ColumnFileError(
            f"{path}: not UTF-8 text (it holds NUL bytes: UTF-16, as Windows saves "
            '"Unicode text", or a binary file): save it as UTF-8 text'
        )
    text = raw.decode("utf-8-sig", errors="replace")  # -sig: drop a BOM
    numbered = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), start=1)]
    numbered = [(n, line) for n, line in numbered if line]
    lines = [(n, line) for n, line in numbered if not line.startswith("#")]
    commas = _decimal_commas([line for _, line in lines])
    fields: list[tuple[str, str]] = []
    if lines:
        try:
            [float(t) for t in _split(lines[0][1], commas)[:2]]
        except ValueError:  # the one header row allowed
            fields = _header_fields(lines[0][1], commas)
            lines = lines[1:]
    if not fields and lines:  # a comment naming every column of the data, energy first
        above = [line for n, line in numbered if n < lines[0][0] and line.startswith("#")]
        fields = _label_line(above, len(_split(lines[0][1], commas)), commas)
    names = [name for name, _ in fields] or None
    cols, mode = _layout(path, names) if names else ((0, 1), "mu")  # no names: by position
    expected = " and ".join(names[c] for c in cols) if names else "energy and mu"
    rows: list[list[float]] = []
    for lineno, line in lines:
        tokens = _split(line, commas)
        if len(tokens) <= max(cols):
            raise ColumnFileError(f"{path}:{lineno}: only {len(tokens)} column(s), need {expected}")
        try:
            rows.append([float(tokens[c]) for c in cols])
        except ValueError:
            raise ColumnFileError(
                f"{path}:{lineno}: not numeric: {line[:60]!r} (expected {expected} columns)"
            ) from None
    if not rows:
        raise ColumnFileError(f"{path}: no numeric data rows")
    data = np.asarray(rows)
    meta: dict[str, object] = {"name": path.stem, "source": str(path)}
    unit = fields[cols[0]][1] if fields else ""
    energy, how = _energy_ev(path, data[:, 0], unit, element, edge)
    if how is not None:
        meta["energy_unit"] = how
    mu = data[:, 1]
    if names:
        meta["mu_from"] = names[cols[1]]
    if mode != "mu" and names:
        i0, signal = names[cols[1]], names[cols[2]]
        try:
            mu = mu_from_channels(mode, data[:, 1], data[:, 2], (i0, signal), energy)
        except SpectrumError as exc:
            raise SpectrumError(exc.reason, f"{path}: {exc.message}") from None
        meta["mode"] = mode
        meta["mu_from"] = f"ln({i0}/{signal})" if mode == "transmission" else f"{signal}/{i0}"
        # detector channels are a measurement, never a calculation: held to a measured scan's
        # pre-edge as the XDI reader's spectra are (a scan starting on its edge is refused,
        # not given an E0 on a later rise)
        meta["calculated"] = False
    return Spectrum(energy=energy, mu=mu, element=element, edge=edge, meta=meta)


def _energy_ev(
    path: Path, values: np.ndarray, unit: str, element: str | None, edge: str
) -> tuple[np.ndarray, str | None]:
    """The energy column in eV, and what said its unit was not eV (None: read as eV), by
    :func:`~xasflow.adapters.energy_units.energy_in_ev` (keV is never read as eV)."""
    remedy = "Name the unit in the header (energy (keV), or energy (eV)) or give the element"
    try:
        return energy_in_ev(str(path), values, unit, element, edge, remedy)
    except SpectrumError as exc:
        raise ColumnFileError(exc.message) from None


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
    spectrum = xdi_to_spectrum(read_xdi(path), element=element)
    if element is None:
        return spectrum
    wanted = element.strip().capitalize()
    if spectrum.element is None:
        return spectrum.with_(element=wanted)
    if spectrum.element != wanted:
        raise SpectrumError("element_mismatch", f"the file names {spectrum.element}, not {wanted}")
    return spectrum
