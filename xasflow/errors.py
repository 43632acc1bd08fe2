"""Errors shared by the command-line verbs (offline and online halves).

``CliError`` lives here, not in :mod:`xasflow.cli`, so the verbs of ``xasflow.daemon`` and
``xasflow.sim`` can raise it without importing the CLI that imports them (no cycle).
"""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(RuntimeError):
    """An error the user can fix; printed without a traceback."""
