"""The command line's outputs: ``--json`` files, strict JSON (no NaN, which jq, JavaScript and
Go refuse), written where the path says and never over a file that holds something else; and
stdout, whose reader may stop before the command has done (``xasflow predict ... | head``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from xasflow.errors import CliError, path_problem

__all__ = ["QuietStdout", "json_safe", "json_target", "write_json"]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: JSON has no NaN (``json.dumps``
    writes a bare ``NaN`` that jq, JavaScript and Go refuse), and an undefined figure (r2
    of a single reference, a metric of an empty class) is ``null`` there."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | None, payload: Any) -> None:
    """Write ``payload`` to ``path`` (if given) as strict JSON: non-finite numbers as null."""
    if path:
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
        except OSError as exc:  # exit 2, not a traceback (1 means "a file was not predicted")
            raise CliError(f"cannot write --json {out}: {path_problem(exc, out)}") from None
        print(f"wrote {out}")


def json_target(path: str | None) -> None:
    """Refuse, before any work, a ``--json`` path whose file holds something other than JSON:
    ``predict --json a.xdi b.xdi`` took the spectrum a.xdi for the output and wrote over it."""
    if not path:
        return
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a BOM: still JSON
    except OSError:  # not there (to be made), or a path write_json says is wrong
        return
    if head and not head.startswith((b"{", b"[")):
        raise CliError(
            f"--json {path}: exists and is not a JSON file; not overwriting it (did --json "
            "take a spectrum file? give it a path of its own, e.g. --json out.json)"
        )


class QuietStdout:
    """stdout for a command whose reader may stop (``| head``): the first write or flush that
    finds the pipe closed points the descriptor at /dev/null, and the command goes on, its
    ``--json`` file written and its status its own. A BrokenPipeError ended the command there
    (a traceback, later exit 141 with no JSON written)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self.gone = False  # the reader has stopped

    def write(self, text: str) -> int:
        """Write to stdout while its reader reads; after that, nowhere."""
        if not self.gone:
            try:
                return self.inner.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        """Flush while the reader reads."""
        if not self.gone:
            try:
                self.inner.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.gone = True  # what is still buffered goes to /dev/null at exit, without an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.inner.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
