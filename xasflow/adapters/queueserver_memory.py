"""The plans this daemon queued, remembered across its restarts (beside its store).

Before each submission the queueserver's queue and history are asked whether the raw run's
plan is there (:mod:`xasflow.adapters.queueserver`), but a plan an operator removed from the
queue is in neither, nor is one whose history was cleared: after a restart, a run that Kafka
replays would be queued again. :class:`SubmittedRuns` keeps the submission keys (``(raw uid,
what)``, :func:`~xasflow.adapters.queueserver_plan.submission_key`) of the plans the server
took or already held, the newest ``limit``, in a JSON-lines file: one ``[raw_uid, what]`` a
line, appended, rewritten once it holds twice the limit. A missing, unreadable or torn file
is read as far as it goes and a failed write is logged: the server's own record stays the
first check, this one only covers what it has forgotten.

A plan given up (its tries all failed, so it reached no queue as far as the server said) is
recorded apart, with what rebuilds it: ``{"gave_up": [raw_uid, what], "rec": {...},
"rescan_only": false, "at": <time.time()>, "rounds": 0}``. It does not count as queued, and
the next daemon may try it again (:meth:`SubmittedRuns.revive`), a bounded number of restarts
(``rounds``) and only while it is recent (a stale plan would scan whatever sample is in the
beam now). A later ``[raw_uid, what]`` line (the plan went in, or was found on the server)
supersedes it; the submitter asks the server's queue and history before each try, so a plan
whose last reply was lost after the server took it is not queued twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SUBMITTED_FILE", "GivenUp", "SubmittedRuns"]

logger = logging.getLogger(__name__)

#: The file's name in the store's directory (``storage.directory``).
SUBMITTED_FILE = "queueserver-submitted.jsonl"

#: A submission key: ``(raw uid, what)``.
Key = tuple[str, str]


@dataclass
class GivenUp:
    """A plan whose tries all failed: what rebuilds it, when it was given up (``time.time``)
    and in how many restarts it was tried again since (``rounds``)."""

    key: Key
    rec: dict[str, Any]
    rescan_only: bool
    at: float
    rounds: int = 0

    def line(self) -> str:
        """Its line in the file."""
        return json.dumps(
            {
                "gave_up": list(self.key),
                "rec": self.rec,
                "rescan_only": self.rescan_only,
                "at": self.at,
                "rounds": self.rounds,
            },
            default=_plain,
        )


class SubmittedRuns:
    """Submission keys of queued plans, the newest ``limit``, kept in ``path`` (None: in this
    process only)."""

    def __init__(
        self, path: Path | None, limit: int = 4096, wall: Callable[[], float] = time.time
    ) -> None:
        """Read what ``path`` holds (nothing if it does not exist); ``wall`` dates the plans
        given up (a clock that outlives the process)."""
        self.path = path
        self.limit = limit
        self._wall = wall
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Plans given up, not queued since, the newest ``limit // 2`` (keyed like _keys)
        self._given_up: OrderedDict[Key, GivenUp] = OrderedDict()
        self._revivable: set[Key] = set()  # read from the file: a previous daemon's
        self._lines = 0  # lines in the file: rewritten at twice the limit
        self._torn = False  # the file ends in a torn line: the next one starts a new line
        self._lock = threading.Lock()
        if path is not None:
            self._read(path)

    def keys(self) -> list[tuple[str, str]]:
        """The remembered keys, oldest first."""
        with self._lock:
            return list(self._keys)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys

    def given_up(self) -> list[GivenUp]:
        """The plans given up and not queued since, oldest first."""
        with self._lock:
            return list(self._given_up.values())

    def add(self, key: tuple[str, str]) -> None:
        """Remember that ``key``'s plan is queued (appended to the file at once)."""
        with self._lock:
            if key in self._keys:
                return
            self._keep(key)
            self._append(json.dumps(list(key)), key)

    def give_up(self, key: Key, rec: dict[str, Any], rescan_only: bool) -> None:
        """Remember that ``key``'s plan was given up, with ``rec`` (a JSON-able
        recommendation) to rebuild it. One given up again after :meth:`revive` keeps its
        line (its date, and the restart it was tried in, are recorded already)."""
        with self._lock:
            if key in self._keys or key in self._given_up:
                return
            entry = GivenUp(key, rec, rescan_only, self._wall())
            try:
                line = entry.line()
            except (TypeError, ValueError) as exc:  # not JSON: it cannot be rebuilt later
                logger.warning("cannot remember the given-up plan of %r: %s", key[0], exc)
                return
            self._keep_given_up(entry)
            self._append(line, key)

    def revive(self, rounds: int, max_age_s: float, most: int) -> list[GivenUp]:
        """The plans a previous daemon gave up, to try again once in this one: tried in fewer
        than ``rounds`` restarts so far and given up less than ``max_age_s`` ago, the newest
        ``most``, oldest first. Each is recorded as tried once more before it is returned, so
        a daemon that dies while trying does not try it for ever; the rest are forgotten
        (logged). Only the first call returns any (a plan this daemon gave up waits for the
        next daemon)."""
        with self._lock:
            now, out, forgot = self._wall(), list[GivenUp](), False
            for key in list(reversed(self._given_up)):
                if key not in self._revivable:
                    continue
                entry = self._given_up[key]
                if entry.rounds >= rounds:
                    why = f"tried again in {entry.rounds} restarts (restart_retries {rounds})"
                elif now - entry.at > max_age_s:
                    why = f"given up {now - entry.at:.0f} s ago (more than {max_age_s:g} s)"
                elif len(out) >= most:
                    why = f"the {most} newer ones are tried"
                else:
                    out.append(entry)
                    continue
                logger.warning(
                    "the queueserver plan %r of run %r is not tried again: %s", key[1], key[0], why
                )
                del self._given_up[key]
                forgot = True
            self._revivable.clear()
            for entry in out:
                entry.rounds += 1
            if forgot and self.path is not None:  # the file anew, without the forgotten ones
                try:
                    self._rewrite(self.path)
                except OSError as exc:
                    logger.warning("cannot rewrite %s: %s", self.path, exc)
            else:
                for entry in reversed(out):
                    self._append(entry.line(), entry.key)
            return out[::-1]

    def _append(self, line: str, key: Key) -> None:
        """One line at the end of the file (or the file rewritten at twice the limit)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._lines + 1 >= 2 * self.limit:
                self._rewrite(self.path)
            else:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n" * self._torn + line + "\n")
                self._lines += 1
                self._torn = False
        except OSError as exc:
            logger.warning(
                "cannot remember the queued plan of %r in %s: %s", key[0], self.path, exc
            )

    def _keep(self, key: tuple[str, str]) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        self._given_up.pop(key, None)
        self._revivable.discard(key)

    def _keep_given_up(self, entry: GivenUp) -> None:
        self._given_up[entry.key] = entry
        self._given_up.move_to_end(entry.key)
        while len(self._given_up) > max(1, self.limit // 2):
            self._revivable.discard(self._given_up.popitem(last=False)[0])

    def _read(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("cannot read the queued plans remembered in %s: %s", path, exc)
            return
        lines = text.splitlines()
        self._lines = len(lines)
        self._torn = bool(text) and not text.endswith("\n")
        for line in lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if isinstance(value, dict):
                entry = _given_up(value)
                if entry is not None and entry.key not in self._keys:
                    self._keep_given_up(entry)
                continue
            key = _key(value)
            if key is not None:
                self._keep(key)
        self._revivable = set(self._given_up)

    def _rewrite(self, path: Path) -> None:
        """The file anew with the remembered keys only (atomically: a crash keeps the old)."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(list(key)) + "\n" for key in self._keys)
            f.writelines(entry.line() + "\n" for entry in self._given_up.values())
        os.replace(tmp, path)
        self._lines = len(self._keys) + len(self._given_up)
        self._torn = False


def _key(value: Any) -> Key | None:
    """The submission key a line's ``[raw_uid, what]`` holds (None: not one)."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


def _given_up(value: dict[str, Any]) -> GivenUp | None:
    """The given-up plan a line's object holds (None: not one, or not ours)."""
    key, rec = _key(value.get("gave_up")), value.get("rec")
    at, rounds = value.get("at"), value.get("rounds", 0)
    if key is None or not isinstance(rec, dict) or not isinstance(at, int | float):
        return None
    if not isinstance(rounds, int) or isinstance(rounds, bool):
        return None
    return GivenUp(key, rec, bool(value.get("rescan_only")), float(at), rounds)


def _plain(value: Any) -> Any:
    """A number JSON can write for a numpy scalar (``TypeError`` for anything else)."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON")
