"""A run's record in the store's journal read back, and what becomes of one that is damaged.

A record is damaged when its start, descriptor or stop is not JSON, or is JSON but not a run
the store can open (the store's check, :func:`~xasflow.adapters.tiled_writer.journalled_run`):
a torn or hand-edited file. It is never replayed; it is kept for a person, with its rows, and
said at each start (:meth:`~xasflow.adapters.store_journal.Journal.pending`). While it is
under its run's raw_uid the store leaves it as it is (a finish or close of the run does not
write into it or forget it). A later copy of the run does not take it over: a run opened
again (a redelivered raw start, the next analysis copy), or an older copy dropped as
superseded, first sets it aside, with its rows, under ``<raw_uid>/damaged-<n>`` (``/`` is in
no tiled key, so no run has that key): the new copy gets a record of its own, whose
acknowledged rows a crash replays, and the damaged one stays as it was.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ASIDE", "JournalRun", "aside_line", "read_record", "set_aside"]

#: What joins a raw_uid and a number in the key of a damaged record set aside.
ASIDE = "/damaged-"


@dataclass
class JournalRun:
    """A run the catalog may not hold in full: its documents and the rows not yet moved."""

    raw_uid: str
    start: dict[str, Any]
    descriptor: dict[str, Any]
    stop: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)


def read_record(
    raw_uid: str,
    start: str,
    descriptor: str,
    stop: str | None,
    check: Callable[[JournalRun], object] | None = None,
) -> tuple[JournalRun | None, str | None]:
    """A record's columns read back as a run (no rows yet), or why they cannot be: None and
    the reason (the JSON decoder's, or ``check``'s, message)."""
    try:
        run = JournalRun(
            raw_uid, json.loads(start), json.loads(descriptor), json.loads(stop) if stop else None
        )
        if check is not None:
            check(run)
    except Exception as exc:  # any failure of the check: not a run the replay can open
        return None, str(exc)
    return run, None


def aside_line(raw_uid: str, key: str, reason: str) -> str:
    """What the replay says of a damaged record set aside (the same at each start)."""
    return f"run {raw_uid}'s record ({reason}), and its rows, set aside as {key}"


def set_aside(
    db: sqlite3.Connection, raw_uid: str, check: Callable[[JournalRun], object] | None
) -> str | None:
    """In the caller's transaction: move the run's record, if it is damaged, and its rows to
    a key of their own; returns what the replay will say of them (:func:`aside_line`), or
    None (no record, or a readable one)."""
    found = db.execute(
        "SELECT start, descriptor, stop FROM runs WHERE raw_uid = ?", (raw_uid,)
    ).fetchone()
    if found is None:
        return None
    start, descriptor, stop = found
    reason = read_record(raw_uid, start, descriptor, stop, check)[1]
    if reason is None:
        return None
    n = 1
    while db.execute(  # a key neither a record nor a row has (a person may have moved some)
        "SELECT 1 FROM runs WHERE raw_uid = ?1 UNION ALL SELECT 1 FROM rows WHERE raw_uid = ?1",
        (f"{raw_uid}{ASIDE}{n}",),
    ).fetchone():
        n += 1
    key = f"{raw_uid}{ASIDE}{n}"
    db.execute("UPDATE runs SET raw_uid = ? WHERE raw_uid = ?", (key, raw_uid))
    db.execute("UPDATE rows SET raw_uid = ? WHERE raw_uid = ?", (key, raw_uid))
    return aside_line(raw_uid, key, reason)
