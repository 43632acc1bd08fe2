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
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

__all__ = ["SUBMITTED_FILE", "SubmittedRuns"]

logger = logging.getLogger(__name__)

#: The file's name in the store's directory (``storage.directory``).
SUBMITTED_FILE = "queueserver-submitted.jsonl"


class SubmittedRuns:
    """Submission keys of queued plans, the newest ``limit``, kept in ``path`` (None: in this
    process only)."""

    def __init__(self, path: Path | None, limit: int = 4096) -> None:
        """Read what ``path`` holds (nothing if it does not exist)."""
        self.path = path
        self.limit = limit
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()
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

    def add(self, key: tuple[str, str]) -> None:
        """Remember that ``key``'s plan is queued (appended to the file at once)."""
        with self._lock:
            if key in self._keys:
                return
            self._keep(key)
            if self.path is None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self._lines + 1 >= 2 * self.limit:
                    self._rewrite(self.path)
                else:
                    with self.path.open("a", encoding="utf-8") as f:
                        f.write("\n" * self._torn + json.dumps(list(key)) + "\n")
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
                raw_uid, what = json.loads(line)
            except (ValueError, TypeError):
                continue  # a line torn by a crash, or not ours
            if isinstance(raw_uid, str) and isinstance(what, str):
                self._keep((raw_uid, what))

    def _rewrite(self, path: Path) -> None:
        """The file anew with the remembered keys only (atomically: a crash keeps the old)."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(list(key)) + "\n" for key in self._keys)
        os.replace(tmp, path)
        self._lines = len(self._keys)
        self._torn = False
