"""How a bench ends: its JSON report written (indented 2, a trailing newline, the folder made)
and the report, or a summary of it, printed; one helper instead of the same lines in each.

The benches are scripts, not a package: ``python bench/<name>.py`` has ``bench/`` on
``sys.path``, so they import this as ``from report import write_report``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_json", "write_report"]


def write_json(path: str | Path, data: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` to ``path`` as JSON indented 2 with a trailing newline, making its
    folder; ``default`` as ``json.dumps``'s (``str`` for paths and the like)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=default) + "\n")
    return out


def write_report(
    path: str | Path | None,
    report: dict[str, Any],
    summary: dict[str, Any] | None = None,
    default: Callable[[Any], Any] | None = None,
) -> Path | None:
    """Write ``report`` to ``path`` (:func:`write_json`; none or ``""``: not written) and
    print ``summary``, or the whole report without one, as indented JSON; returns the file."""
    out = write_json(path, report, default) if path else None
    print(json.dumps(report if summary is None else summary, indent=2, default=default))
    return out
