"""Parse one FEFF ``xmu.dat``: the omega and mu columns, the absorption edge and the energies.

The header lines start with ``#`` and precede the data; the numbers are parsed in one call
(numpy's C ``loadtxt``), and only a broken file takes the slower path that says what is wrong.
Problems carry the reason tags that :mod:`xasflow.adapters.feff` reports for a site
(``empty_xmu``, ``truncated_xmu``, ``bad_xmu``); the header's energies go to
:mod:`xasflow.adapters.feff_energy`.
"""

from __future__ import annotations

import io
import re

import numpy as np

from xasflow.adapters.feff_energy import FeffEnergies, parse_xmu_energies

#: An xmu.dat with fewer data rows than this is treated as a truncated run.
MIN_ROWS = 10
#: xmu.dat columns: omega e k mu mu0 chi; we use omega (absolute eV) and mu.
OMEGA_COL, E_COL, MU_COL = 0, 1, 3

_ABS_EDGE = re.compile(r"^#.*\bAbs\b.*?\s([KLMN][1-5]?)\s+shell", re.MULTILINE)


class _XmuProblem(Exception):
    """Internal: why an xmu.dat is unusable, as a reason tag and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_xmu(raw: bytes) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse xmu.dat bytes into (omega, mu, edge); raises ValueError with a reason tag.

    Header lines start with ``#`` and precede the data; the numbers are parsed in one call (numpy's C ``loadtxt``; broken files take a slower path that says what is wrong).
    """
    try:
        return _parse_xmu(raw)[:3]
    except _XmuProblem as exc:
        raise ValueError(f"{exc.reason}: {exc.detail}") from None


def _parse_xmu(raw: bytes) -> tuple[np.ndarray, np.ndarray, str, FeffEnergies]:
    text = raw.decode("latin-1")
    start = 0
    last_hash = text.rfind("\n#")
    if last_hash >= 0:
        end = text.find("\n", last_hash + 1)
        start = len(text) if end < 0 else end + 1
    elif text.startswith("#"):
        end = text.find("\n")
        start = len(text) if end < 0 else end + 1
    header, block = text[:start], text[start:]
    if not block.strip():
        raise _XmuProblem("empty_xmu", "no data rows")
    try:
        table = np.loadtxt(io.StringIO(block), dtype=np.float64, comments="#", ndmin=2)
    except ValueError:
        raise _diagnose(block) from None
    nrows, ncols = table.shape
    if ncols <= MU_COL:
        raise _XmuProblem("bad_xmu", f"{ncols} columns, expected omega e k mu mu0 chi")
    if nrows < MIN_ROWS:
        raise _XmuProblem("truncated_xmu", f"only {nrows} data rows (< {MIN_ROWS})")
    if not np.all(np.isfinite(table[:, [OMEGA_COL, MU_COL]])):
        raise _XmuProblem("bad_xmu", "NaN or infinite values")
    match = _ABS_EDGE.search(header)
    edge = match.group(1) if match else "K"
    energies = parse_xmu_energies(header, table[:, OMEGA_COL], table[:, E_COL])
    return (
        np.ascontiguousarray(table[:, OMEGA_COL]),
        np.ascontiguousarray(table[:, MU_COL]),
        edge,
        energies,
    )


def _diagnose(block: str) -> _XmuProblem:
    """Say why a data block did not parse (slow path, only for broken files)."""
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    ncols = len(lines[0].split())
    for i, line in enumerate(lines):
        tokens = line.split()
        numeric = _is_numeric_row(tokens)
        if numeric and len(tokens) == ncols:
            continue
        if i == len(lines) - 1 and len(tokens) <= ncols:
            return _XmuProblem(
                "truncated_xmu", f"last row cut short ({len(tokens)} of {ncols} columns)"
            )
        if not numeric:
            return _XmuProblem("bad_xmu", f"non-numeric data row {i + 1}: {line.strip()[:60]!r}")
        return _XmuProblem(
            "bad_xmu", f"ragged columns: row {i + 1} has {len(tokens)}, row 1 has {ncols}"
        )
    return _XmuProblem("bad_xmu", "unparseable data block")


def _is_numeric_row(tokens: list[str]) -> bool:
    try:
        [float(tok) for tok in tokens]
    except ValueError:
        return False
    return True
