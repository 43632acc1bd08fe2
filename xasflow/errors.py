"""Errors shared by the command-line verbs (offline and online halves).

``CliError`` lives here, not in :mod:`xasflow.cli`, so the verbs of ``xasflow.daemon`` and
``xasflow.sim`` can raise it without importing the CLI that imports them (no cycle).
"""

from __future__ import annotations

__all__ = ["CliError", "os_problem", "path_problem"]


class CliError(RuntimeError):
    """An error the user can fix; printed without a traceback."""


def os_problem(exc: Exception) -> str:
    """What was wrong with a path, in plain words ("no such file", "is a directory"): a
    message for the user, not Python's exception name and ``[Errno 2] ...`` text (another
    exception than an OSError: its own text)."""
    if not isinstance(exc, OSError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, NotADirectoryError):
        return "a folder on its path is a file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileExistsError):  # mkdir(exist_ok=True) raises it for a non-directory
        return "exists and is not a directory"
    return exc.strerror.lower() if exc.strerror else str(exc) or type(exc).__name__


def path_problem(exc: OSError, given: object = None) -> str:
    """:func:`os_problem` with the path it concerns where that is not ``given`` (a folder
    above it): "out: exists and is not a directory" for ``--json out/x.json``."""
    said = os_problem(exc)
    if exc.filename is None or str(exc.filename) == str(given):
        return said
    return f"{exc.filename}: {said}"
