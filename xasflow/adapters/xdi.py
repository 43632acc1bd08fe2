"""Read XDI files (the XAS Data Interchange format) and turn them into :class:`Spectrum`.

An XDI file is ``# XDI/1.0 ...`` on the first line, then ``# Namespace.tag: value`` fields,
optionally ``# ///`` followed by free comments, a ``#----`` line, a ``# energy i0 ...`` column
label line and whitespace-separated numbers. Files in the wild often skip ``# ///``; field
names are matched case-insensitively, as the XDI spec says.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xasflow.adapters.energy_units import EV_PER_UNIT, energy_in_ev
from xasflow.spectra.channels import Mode, mu_from_channels
from xasflow.spectra.core import Spectrum, SpectrumError, nonfinite_detail

#: h*c in eV*Angstrom, to turn a monochromator angle into an energy.
HC_EV_ANGSTROM = 12398.419843320026

_VERSION = re.compile(r"^#\s*XDI/\S+", re.IGNORECASE)
_FIELD = re.compile(r"^#\s*([A-Za-z_][\w-]*\.[\w.-]+)\s*:\s?(.*)$")
_COLUMN_FIELD = re.compile(r"^column\.(\d+)$", re.IGNORECASE)
_MU_COLUMNS = ("mutrans", "mufluor", "mu")
MODES = ("auto", "transmission", "fluorescence", "mu")
_HERFD = re.compile(r"herfd|high[\s_-]*energy[\s_-]*resolution[\s_-]*fluorescence", re.IGNORECASE)
#: "not HERFD", "non-HERFD", "no HERFD": a field value that says the scan is not one. The
#: negation must not follow a letter ("piano HERFD" is no denial) but may follow "_", a digit
#: or anything else (``\b`` never matches after "_", a word character: ``Vortex_non-HERFD``
#: read as a declaration).
_NOT_HERFD = re.compile(
    r"(?<![a-z])(?:not|non|no)[\s_-]*(?:herfd|high[\s_-]*energy[\s_-]*resolution)",
    re.IGNORECASE,
)


#: ``Detector`` tags of the incident, transmitted and reference channels: ion chambers, whose
#: description declares nothing ("I0: ion chamber, HERFD analysers parked" is prose); the
#: HERFD analyser is the fluorescence detector.
_CHAMBERS = ("i0", "io", "itrans", "it", "irefer", "iref", "ir")

#: Values of a HERFD-naming field that declare nothing (XDI: an empty value is an empty string).
_NO_VALUE = ("", "none", "no", "false", "n/a", "0")


class XdiError(ValueError):
    """A file that is not valid XDI (the message says which file and what is wrong)."""


@dataclass(frozen=True, eq=False)
class XdiFile:
    """The parsed content of one XDI file; ``data`` has one column per name in ``columns``."""

    path: str
    fields: dict[str, str]
    columns: list[str]
    data: np.ndarray
    units: tuple[str, ...] = ()
    comments: tuple[str, ...] = ()

    @property
    def herfd(self) -> bool:
        """Whether the header declares HERFD where XDI describes the detection: a field of
        the ``Detector`` namespace or a ``mode`` field (``Scan.mode``) whose tag or value
        says "HERFD" or "high energy resolution fluorescence" (BLA, the HERFD software,
        writes ``Detector.herfd: <analyser>``), unless the value says it is not ("not
        HERFD", "non-HERFD") or is empty or "none". XDI has no fixed field for it; comments,
        other fields, an ion chamber's ``Detector`` field (:data:`_CHAMBERS`) and the file
        name are free text ("compare with the HERFD data") and declare nothing.
        ``xasflow predict --herfd/--no-herfd`` overrides it."""
        for key, value in self.fields.items():
            namespace, _, tag = key.lower().partition(".")
            if (namespace != "detector" or tag in _CHAMBERS) and tag != "mode":
                continue
            if value.strip().lower() in _NO_VALUE or _NOT_HERFD.search(value):
                continue
            if _HERFD.search(f"{tag} {value}"):
                return True
        return False

    def field(self, name: str, default: str | None = None) -> str | None:
        """Value of a header field, matching ``Namespace.tag`` case-insensitively."""
        wanted = name.lower()
        for key, value in self.fields.items():
            if key.lower() == wanted:
                return value
        return default

    @property
    def element(self) -> str | None:
        """The absorbing element from ``Element.symbol``, or None when the file does not say."""
        value = (self.field("Element.symbol") or "").strip()
        return value.capitalize() if value else None

    @property
    def edge(self) -> str:
        """The absorption edge from ``Element.edge``; K when the file does not say."""
        value = (self.field("Element.edge") or "").strip()
        return value.upper() if value else "K"

    def has(self, name: str) -> bool:
        """True when a column of that (case-insensitive) name exists."""
        return name.lower() in self.columns

    def column(self, name: str) -> np.ndarray:
        """One data column by name; KeyError lists the columns that do exist."""
        key = name.lower()
        if key not in self.columns:
            raise KeyError(f"{self.path}: no column {name!r}; columns are {self.columns}")
        return self.data[:, self.columns.index(key)]

    def energy_ev(self, element: str | None = None) -> np.ndarray:
        """The energy column in eV (converts keV, and mono angles in degrees via d-spacing)."""
        return self.energy_unit(element)[0]

    def energy_unit(self, element: str | None = None) -> tuple[np.ndarray, str | None]:
        """The energy column in eV, and what said its unit was not eV (None: it is eV).

        A column that declares no unit is read by the column reader's rule
        (:func:`~xasflow.adapters.energy_units.energy_in_ev`): values that may only be keV
        are keV where the file's edge (else ``element``'s) lies in them times 1000, and
        refused otherwise, never read as eV.
        """
        idx = self.columns.index("energy") if "energy" in self.columns else 0
        values = self.data[:, idx]
        unit = self.units[idx].lower() if idx < len(self.units) else ""
        if unit in ("", *EV_PER_UNIT):
            remedy = "Name the unit in the Column field (energy keV, or energy eV) or the element"
            found = self.element or element
            return energy_in_ev(self.path, values, unit, found, self.edge, remedy)
        if unit in ("deg", "degree", "degrees"):
            dspacing = self.field("Mono.d_spacing")
            try:
                d = float((dspacing or "").split()[0])
            except (ValueError, IndexError):
                raise SpectrumError(
                    "units", f"{self.path}: energy in degrees but no usable Mono.d_spacing"
                ) from None
            energy = HC_EV_ANGSTROM / (2.0 * d * np.sin(np.radians(values)))
            return energy, "degrees (the header's unit, by Mono.d_spacing)"
        raise SpectrumError("units", f"{self.path}: energy unit {unit!r} is not eV/keV/degrees")


def read_xdi(path: str | Path) -> XdiFile:
    """Parse an XDI file; raises :class:`XdiError` saying what is wrong for malformed files."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8-sig", errors="replace")  # a BOM (Windows editors)
    lines = text.splitlines()
    if not lines or not _VERSION.match(lines[0].strip()):
        first = lines[0][:60] if lines else ""
        raise XdiError(f"{path}: not an XDI file (first line {first!r} lacks '# XDI/')")

    fields: dict[str, str] = {}
    in_fields = True
    last_comment: str | None = None
    comments: list[str] = []
    rows: list[list[str]] = []
    first_data_line = 0
    for lineno, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if rows:
                continue  # a comment inside the data block: skip it
            body = line[1:].strip()
            if body.startswith("///"):
                in_fields = False
                continue
            if body.startswith("---"):
                in_fields = False
                if last_comment is not None:
                    comments.append(last_comment)
                last_comment = None
                continue
            match = _FIELD.match(line) if in_fields else None
            if match:
                fields[match.group(1)] = match.group(2).strip()
            else:
                if last_comment is not None:
                    comments.append(last_comment)
                last_comment = body
            continue
        if not rows:
            first_data_line = lineno
        rows.append(line.replace(",", " ").split())

    if not rows:
        raise XdiError(f"{path}: no data rows")
    ncols = len(rows[0])
    for offset, row in enumerate(rows):
        if len(row) != ncols:
            raise XdiError(
                f"{path}: data row {offset + 1} (near line {first_data_line + offset}) has "
                f"{len(row)} values, the first row has {ncols}"
            )
    try:
        data = np.array(rows, dtype=np.float64)
    except ValueError:
        bad = next(i for i, r in enumerate(rows) if not _numeric(r))
        raise XdiError(
            f"{path}: non-numeric data row {bad + 1}: {' '.join(rows[bad])[:60]!r}"
        ) from None

    columns, units = _column_names(path, fields, last_comment, ncols)
    return XdiFile(
        path=str(path),
        fields=fields,
        columns=columns,
        data=data,
        units=units,
        comments=tuple(comments),
    )


def _numeric(tokens: list[str]) -> bool:
    try:
        [float(t) for t in tokens]
    except ValueError:
        return False
    return True


def _column_names(
    path: Path, fields: dict[str, str], label_line: str | None, ncols: int
) -> tuple[list[str], tuple[str, ...]]:
    """Column names (lower case) and units from Column.N fields, else the label line."""
    named: dict[int, tuple[str, str]] = {}
    for key, value in fields.items():
        match = _COLUMN_FIELD.match(key)
        if match:
            words = value.split("||")[0].split()
            if words:
                named[int(match.group(1))] = (words[0].lower(), " ".join(words[1:]))
    labels = label_line.lower().split() if label_line else []
    if named:
        names, units = [], []
        for i in range(1, ncols + 1):
            if i in named:
                names.append(named[i][0])
                units.append(named[i][1])
            elif len(labels) == ncols:
                names.append(labels[i - 1])
                units.append("")
            else:
                raise XdiError(f"{path}: data has {ncols} columns but no Column.{i} field")
        return names, tuple(units)
    if len(labels) == ncols:
        return labels, tuple("" for _ in labels)
    raise XdiError(
        f"{path}: cannot name {ncols} data columns: no Column.N fields and the label line "
        f"{label_line!r} has {len(labels)} names"
    )


def _pick_mode(x: XdiFile, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if x.has("i0") and x.has("itrans"):
        return "transmission"
    if x.has("i0") and x.has("ifluor"):
        return "fluorescence"
    if any(x.has(c) for c in _MU_COLUMNS):
        return "mu"
    raise SpectrumError(
        "no_channel",
        f"{x.path}: cannot compute mu from columns {x.columns} "
        "(need i0+itrans, i0+ifluor, or a mutrans/mufluor/mu column)",
    )


def _require(x: XdiFile, mode: str, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not x.has(n)]
    if missing:
        raise SpectrumError(
            "no_channel", f"{x.path}: {mode} needs {missing}; columns are {x.columns}"
        )


def _channels(x: XdiFile, mode: Mode, i0: str, signal: str, energy: np.ndarray) -> np.ndarray:
    """mu from two columns by :func:`mu_from_channels`, its errors naming the file."""
    try:
        return mu_from_channels(mode, x.column(i0), x.column(signal), (i0, signal), energy)
    except SpectrumError as exc:
        raise SpectrumError(exc.reason, f"{x.path}: {exc.message}") from None


def _mu(x: XdiFile, mode: str, energy: np.ndarray) -> tuple[np.ndarray, str]:
    """mu for the chosen mode, and the name of what it came from (``energy``, eV, for
    saying where a channel's NaN is)."""
    if mode in ("transmission", "fluorescence"):
        _require(x, mode, ("i0", "itrans") if mode == "transmission" else ("i0", "ifluor"))
    if mode == "transmission":
        return _channels(x, "transmission", "i0", "itrans", energy), "ln(i0/itrans)"
    if mode == "fluorescence":
        return _channels(x, "fluorescence", "i0", "ifluor", energy), "ifluor/i0"
    for name in _MU_COLUMNS:
        if x.has(name):
            return x.column(name), name
    raise SpectrumError("no_channel", f"{x.path}: no mutrans/mufluor/mu column in {x.columns}")


def _reference(x: XdiFile) -> np.ndarray | None:
    """The reference-foil channel ln(itrans/irefer), else a murefer column, else None."""
    if x.has("irefer") and x.has("itrans"):
        try:
            return mu_from_channels("reference", x.column("itrans"), x.column("irefer"))
        except SpectrumError:
            return None  # an unusable reference channel only costs the alignment
    if x.has("murefer"):
        return x.column("murefer")
    return None


def xdi_to_spectrum(x: XdiFile, mode: str = "auto", element: str | None = None) -> Spectrum:
    """Compute mu(E) from an XDI file's channels as a :class:`Spectrum`.

    ``auto`` prefers transmission ln(i0/itrans), then fluorescence ifluor/i0, then a stored
    mutrans/mufluor/mu column. The reference channel, when present, goes to
    ``meta["reference_mu"]`` (aligned with the sorted energies). ``element`` (the caller's,
    for a file that names none) only tells keV from eV (:meth:`XdiFile.energy_unit`).
    """
    chosen = _pick_mode(x, mode)
    energy, how = x.energy_unit(element)
    mu, origin = _mu(x, chosen, energy)
    reference = _reference(x)
    if not np.all(np.isfinite(energy)):  # the sort below would drop them without a word
        detail = nonfinite_detail(~np.isfinite(energy), noun=("energy", "energies"))
        raise SpectrumError("not_finite", detail)
    order = np.argsort(energy, kind="stable")
    energy, mu = energy[order], mu[order]
    keep = np.concatenate(([True], np.diff(energy) > 0)) if energy.size else np.zeros(0, bool)
    energy, mu = energy[keep], mu[keep]
    meta: dict[str, object] = {
        "name": Path(x.path).stem,
        "source": x.path,
        "mode": chosen,
        "mu_from": origin,
        # measured: its pre-edge background is subtracted even when the scan starts within
        # calc_start of E0 (the calculation heuristic took 30 library scans cut that way for
        # FEFF output, edge steps up to 52 % off)
        "calculated": False,
    }
    sample = x.field("Sample.formula") or x.field("Sample.name")
    if sample:
        meta["sample"] = sample
    if how is not None:
        meta["energy_unit"] = how  # what said the energies were not eV
    if reference is not None:
        meta["reference_mu"] = reference[order][keep]
    if x.herfd:
        meta["herfd"] = True  # prepare() broadens it to the conventional resolution
    temperature = x.field("Sample.temperature")
    if temperature:
        meta["temperature"] = temperature
    nominal = _edge_energy(x)
    if nominal is not None:
        meta["nominal_edge_energy"] = nominal  # tabulated, not measured: e0 stays unset
    return Spectrum(energy=energy, mu=mu, element=x.element, edge=x.edge, meta=meta)


def _edge_energy(x: XdiFile) -> float | None:
    """The nominal edge energy the header gives (``Scan.edge_energy``), else None."""
    value = x.field("Scan.edge_energy")
    if not value:
        return None
    try:
        e0 = float(value.split()[0])
    except (ValueError, IndexError):
        return None
    return e0 if math.isfinite(e0) else None
