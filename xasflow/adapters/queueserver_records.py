"""The lines of the queueserver submitter's memory file (:mod:`~.queueserver_memory`): what
each record holds, written and read back.

One JSON value a line: ``[raw_uid, what]`` (the plan is queued), ``{"sending": key}`` (a
try about to be sent), ``{"failed": key}`` and ``{"lost_reply": key}`` (its outcome when the
plan did not go in, or its reply never came), ``{"gave_up": key, ...}`` (:class:`GivenUp`),
``{"abandoned": key, "reason": ...}`` (given up for good, after the key's own line, see
:func:`abandoned_lines`) and ``{"slot": at}`` (when the
server last took a plan: the rate, kept across a restart). A line that is none of them (torn
by a crash, or written by a later version) is skipped by the reader.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GivenUp", "Key", "abandoned_lines", "fsync_dir", "given_up_of", "key_of", "slot_line"]

#: A submission key: ``(raw uid, what)``.
Key = tuple[str, str]


@dataclass
class GivenUp:
    """A plan whose tries all failed: what rebuilds it, when it was given up (``time.time``),
    in how many restarts it was tried again since (``rounds``) and for how many replays of
    its run (``replays``)."""

    key: Key
    rec: dict[str, Any]
    rescan_only: bool
    at: float
    rounds: int = 0
    replays: int = 0

    def line(self) -> str:
        """Its line in the file."""
        return json.dumps(
            {
                "gave_up": list(self.key),
                "rec": self.rec,
                "rescan_only": self.rescan_only,
                "at": self.at,
                "rounds": self.rounds,
                "replays": self.replays,
            },
            default=_plain,
        )


def fsync_dir(directory: Path) -> None:
    """Make a file's creation or renaming in ``directory`` durable (POSIX: fsync the
    directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_of(value: Any) -> Key | None:
    """The submission key a line's ``[raw_uid, what]`` holds (None: not one)."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


def abandoned_lines(key: Key, reason: str) -> str:
    """The two lines of a plan given up for good: its key, then ``{"abandoned": key}``. The
    key comes first for the release before (``d944cd9``), which skips the ``abandoned``
    line: without the key it kept the plan's earlier ``gave_up`` line and revived it after a
    rollback; with it, it holds the plan as queued and never sends it. This reader reads
    the pair as abandoned, not queued."""
    return json.dumps(list(key)) + "\n" + json.dumps({"abandoned": list(key), "reason": reason})


def given_up_of(value: dict[str, Any]) -> GivenUp | None:
    """The given-up plan a line's object holds (None: not one, or not ours)."""
    key, rec = key_of(value.get("gave_up")), value.get("rec")
    at, rounds, replays = value.get("at"), value.get("rounds", 0), value.get("replays", 0)
    if key is None or not isinstance(rec, dict) or not isinstance(at, int | float):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (rounds, replays)):
        return None
    return GivenUp(key, rec, bool(value.get("rescan_only")), float(at), rounds, replays)


def _plain(value: Any) -> Any:
    """A number JSON can write for a numpy scalar (``TypeError`` for anything else)."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def slot_line(at: float) -> str:
    """The line saying the server took a plan at ``at`` (``time.time``)."""
    return json.dumps({"slot": at})
