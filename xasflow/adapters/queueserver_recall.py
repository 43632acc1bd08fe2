"""Reading the queueserver submitter's memory file back (:mod:`~.queueserver_memory`), when a
daemon starts: what the previous daemons' lines leave queued, given up, in doubt or given up
for good, and when the server last took a plan.

The lines are :mod:`~xasflow.adapters.queueserver_records`'; they are read in order, a later
line of a plan settling an earlier one, and a line that is none of them (torn by a crash, or
written by a later version) is skipped. :func:`recall` only reads: the memory holds what it
returns, and logs what needs saying.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from xasflow.adapters.queueserver_records import GivenUp, Key, given_up_of, key_of

__all__ = ["Recalled", "recall"]


@dataclass
class Recalled:
    """What a memory file holds, read back (see :func:`recall`)."""

    #: Keys held as queued (sent, found queued, or in doubt), oldest first, the newest ``limit``
    keys: OrderedDict[Key, None] = field(default_factory=OrderedDict)
    #: Plans given up and not queued since, the newest ``limit // 2`` (at least one)
    given_up: OrderedDict[Key, GivenUp] = field(default_factory=OrderedDict)
    #: Plans given up for good, with why, the newest ``limit``
    abandoned: OrderedDict[Key, str] = field(default_factory=OrderedDict)
    #: Intents without an outcome after them: held as queued (in ``keys`` too), to be logged
    doubt: list[Key] = field(default_factory=list)
    #: Tries whose reply was lost, nothing settled since (and not held as queued)
    lost: set[Key] = field(default_factory=set)
    slot: float | None = None  # when the server last took a plan (wall clock)
    lines: int = 0  # lines in the file
    torn: bool = False  # the file ends in a torn line
    error: OSError | None = None  # the file could not be read (nothing else is set)


def recall(path: Path, limit: int) -> Recalled:
    """What ``path`` holds (a missing file holds nothing; one that cannot be read, nothing
    and its ``error``), with the memory's bounds: ``limit`` keys and plans given up for good,
    ``limit // 2`` plans given up."""
    out = Recalled()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.error = exc
        return out
    lines = text.splitlines()
    out.lines = len(lines)
    out.torn = bool(text) and not text.endswith("\n")
    keys, given_up, abandoned = out.keys, out.given_up, out.abandoned
    doubt: dict[Key, None] = {}  # intents without an outcome after them
    lost: dict[Key, None] = {}  # lost replies without a settled outcome after them

    def keep(key: Key) -> None:  # held as queued, the newest: no longer given up
        keys[key] = None
        keys.move_to_end(key)
        given_up.pop(key, None)

    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if not isinstance(value, dict):
            key = key_of(value)
            if key is not None:
                keep(key)
                doubt.pop(key, None)
                lost.pop(key, None)
            continue
        entry = given_up_of(value)
        if entry is not None:
            doubt.pop(entry.key, None)
            # a key line before it is stale: a plan held as queued is never given up
            # (its key was trimmed from the held ones, its line left in the file)
            keys.pop(entry.key, None)
            if entry.key not in abandoned:
                given_up[entry.key] = entry
                given_up.move_to_end(entry.key)
                while len(given_up) > max(1, limit // 2):
                    given_up.popitem(last=False)
        elif (key := key_of(value.get("sending"))) is not None:
            doubt[key] = None
        elif (key := key_of(value.get("failed"))) is not None:
            doubt.pop(key, None)
            lost.pop(key, None)
        elif (key := key_of(value.get("lost_reply"))) is not None:
            doubt.pop(key, None)
            lost[key] = None
        elif isinstance(at := value.get("slot"), int | float) and not isinstance(at, bool):
            out.slot = max(float(at), out.slot or -math.inf)
        elif (key := key_of(value.get("abandoned"))) is not None:
            doubt.pop(key, None)
            lost.pop(key, None)
            given_up.pop(key, None)
            keys.pop(key, None)  # the line before it, for the previous release
            abandoned[key] = str(value.get("reason", ""))
    for key in doubt:  # at most once: the server may have it, an operator may have not
        keep(key)
    while len(keys) > limit:
        keys.popitem(last=False)
    out.doubt = list(doubt)
    out.lost = {key for key in lost if key not in keys}
    while len(abandoned) > limit:
        abandoned.popitem(last=False)
    return out
