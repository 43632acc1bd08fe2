"""Measured reference spectra with labels, read from a small CSV table (``--data refs.csv``).

Columns: ``file`` (XDI or two-column, relative to the table or else to the shared data
directory), ``element``, and any of ``cn``, ``motif`` (a name from :data:`labels.MOTIFS`,
e.g. ``square co-planar``, or as ``xasflow predict`` prints it, ``CN4-square co-planar``),
``valence``, ``distance``; empty cells mean unknown.

The table is UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one, which
would otherwise become part of the first column's name). Any other encoding (Latin-1,
Windows-1252: Excel's plain "CSV" on Windows) is refused with the line it fails on, not
guessed: a guess that decodes a file name wrongly fails later and less clearly.

A dataset is one element's K edge, so each row must be of the element wanted (the bundle's,
or else the first usable row's): its ``element`` cell, or, where that is empty, the file's
own (XDI ``Element.symbol``). A row of another element, of another edge, or of no known
element is an issue of the table, never scored by a bundle of another element.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from xasflow import paths
from xasflow.adapters.feff import ReadIssue
from xasflow.errors import os_problem
from xasflow.spectra import Spectrum, SpectrumError
from xasflow.training import labels as L

__all__ = ["REFERENCE_COLUMNS", "ReferenceTableError", "is_reference_table", "reference_rows"]

REFERENCE_COLUMNS = ("file", "element", "cn", "motif", "valence", "distance")
#: The edge every reference dataset is of (``Dataset.edge``).
EDGE = "K"

#: One accepted row as ``dataset._assemble`` takes it: (key, multiplicity, complete, spectrum,
#: labels, formula).
Row = tuple[tuple[str, int], int, bool, Spectrum, L.SiteLabels, str]


class ReferenceTableError(ValueError):
    """A table that cannot be read at all (unreadable, not UTF-8, no ``file`` column)."""


def is_reference_table(path: str | Path) -> bool:
    """Whether ``path`` names a reference table: a ``.csv`` suffix in any case (``REFS.CSV``)."""
    return Path(path).suffix.lower() == ".csv"


def read_table(table: Path) -> list[dict[str, str]]:
    """The table's rows as dicts by column name; ReferenceTableError when it cannot be read."""
    try:
        data = table.read_bytes()
    except OSError as exc:
        raise ReferenceTableError(f"{table}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM is no part of the first column's name
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ReferenceTableError(
            f"{table}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the table as "
            "UTF-8 (Excel: 'CSV UTF-8'): other encodings are refused rather than guessed"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"file", "element"} - set(reader.fieldnames or [])
    if missing:
        raise ReferenceTableError(
            f"{table}: missing columns {sorted(missing)}; need {REFERENCE_COLUMNS}"
        )
    return list(reader)


#: An environment label as ``xasflow predict`` prints it (``CN4-square co-planar``).
_ENVIRONMENT = re.compile(r"CN\s*(\d+)\s*-\s*(.+)", re.IGNORECASE)


def _motif(cell: str, cn: int | None, motif_index: dict[str, int]) -> int:
    """The MOTIFS index of a ``motif`` cell: a name, or predict's ``CN4-`` prefixed label.

    ValueError for an unknown name, or a CN (the prefix's, or the motif's own) that the motif
    or the ``cn`` cell contradicts (a table saying two things of one row is not guessed between).
    """
    label = _ENVIRONMENT.fullmatch(cell)
    name = label[2].strip() if label and cell not in motif_index else cell
    if name not in motif_index:
        raise ValueError(
            f"unknown motif {cell!r}: give a name of xasflow.training.labels.MOTIFS "
            "('square co-planar') or the label predict prints ('CN4-square co-planar')"
        )
    index = motif_index[name]
    own = L.MOTIFS[index][0]
    if name != cell and label:
        said = int(label[1])
        if said != own:
            raise ValueError(f"motif {cell!r}: {name} is a CN{own} motif, not CN{said}")
        if cn is not None and cn != said:
            raise ValueError(f"motif {cell!r} says CN{said} but the cn cell says {cn}")
    if cn is not None and cn != own:  # a bare name: its motif's own CN
        raise ValueError(f"motif {cell!r} is a CN{own} motif but the cn cell says {cn}")
    return index


def _labels(entry: dict[str, str], motif_index: dict[str, int]) -> L.SiteLabels:
    """A row's labels (ValueError for a CN outside 1..CN_MAX or an unknown motif)."""
    cn = int(entry["cn"]) if (entry.get("cn") or "").strip() else None
    if cn is not None and not 1 <= cn <= L.CN_MAX:  # 0 became CN 12, 13+ a crash
        raise ValueError(f"cn {cn} is outside 1..{L.CN_MAX}")
    cn_vec = np.zeros(L.CN_MAX)
    if cn is not None:
        cn_vec[cn - 1] = 1.0
    motif = (entry.get("motif") or "").strip()
    motif_vec = np.full(len(L.MOTIFS), np.nan)
    if motif:
        motif_vec = np.zeros(len(L.MOTIFS))
        motif_vec[_motif(motif, cn, motif_index)] = 1.0
    val = (entry.get("valence") or "").strip()
    dist = (entry.get("distance") or "").strip()
    return L.SiteLabels(
        cn_vector=cn_vec if cn is not None else np.full(L.CN_MAX, np.nan),
        motif_vector=motif_vec,
        mean_nn_distance=float(dist) if dist else float("nan"),
        oxidation_state=int(val) if val else None,
        bvs=None,
    )


def _other_element(name: str, found: str, wanted: str) -> str:
    return f"{name} is a {found} spectrum, not {wanted}: only a {found} bundle may score it"


def reference_rows(
    table: Path, element: str | None = None
) -> tuple[str | None, list[Row], list[ReadIssue]]:
    """(the element, the usable rows, the issues) of a reference table.

    ``element``: the element wanted (None: the first usable row's). Rows that cannot be read
    or labelled, and rows of another element or edge, are issues (reasons ``bad_reference``,
    ``other_element``, ``no_element``, ``other_edge``). ReferenceTableError when the table
    itself cannot be read.
    """
    from xasflow.adapters.columns import read_spectrum_file

    entries = read_table(table)
    wanted = element.strip().capitalize() if element else None
    motif_index = {name: i for i, (_, name) in enumerate(L.MOTIFS)}
    rows: list[Row] = []
    issues: list[ReadIssue] = []
    for n, entry in enumerate(entries, start=2):
        item = f"{table.name}:{n}"
        name = (entry.get("file") or "").strip()
        cell = (entry.get("element") or "").strip().capitalize()
        if wanted and cell and cell != wanted:  # not read at all: it is not this dataset's
            issues.append(ReadIssue(item, "other_element", _other_element(name, cell, wanted)))
            continue
        try:
            where = table.parent / name
            if not where.exists():  # tables may name files inside the shared data tree
                where = paths.shared_data_dir() / name
            spectrum = read_spectrum_file(where, element=cell or None)
            found = spectrum.element
            if found is None:
                issues.append(
                    ReadIssue(
                        item,
                        "no_element",
                        f"{name}: the element cell is empty and the file does not name one "
                        "(XDI Element.symbol); say which element it is",
                    )
                )
                continue
            if wanted and found != wanted:
                issues.append(ReadIssue(item, "other_element", _other_element(name, found, wanted)))
                continue
            if spectrum.edge != EDGE:
                issues.append(
                    ReadIssue(
                        item,
                        "other_edge",
                        f"{name} is a {found} {spectrum.edge}-edge spectrum, not {EDGE}",
                    )
                )
                continue
            lab = _labels(entry, motif_index)
        except OSError as exc:  # the path's problem in words, not Python's errno text
            issues.append(ReadIssue(item, "bad_reference", f"{name}: {os_problem(exc)}"))
            continue
        except (ValueError, SpectrumError) as exc:
            issues.append(ReadIssue(item, "bad_reference", str(exc)))
            continue
        wanted = found
        rows.append(((name, 0), 1, True, spectrum, lab, ""))
    return wanted, rows, issues
