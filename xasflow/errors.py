"""Errors shared by the command-line verbs (offline and online halves).

``CliError`` lives here, not in :mod:`xasflow.cli`, so the verbs of ``xasflow.daemon`` and
``xasflow.sim`` can raise it without importing the CLI that imports them (no cycle).
"""

from __future__ import annotations

__all__ = ["CliError", "os_problem"]


class CliError(RuntimeError):
    """An error the user can fix; printed without a traceback."""


def os_problem(exc: OSError) -> str:
    """What was wrong with a path, in plain words ("no such file", "is a directory"): a
    message for the user, not Python's exception name and ``[Errno 2] ...`` text."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, NotADirectoryError):
        return "not a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror.lower() if exc.strerror else str(exc) or type(exc).__name__
