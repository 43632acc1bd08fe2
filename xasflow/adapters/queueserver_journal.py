"""The queueserver memory's file as written (:mod:`~.queueserver_memory`): one daemon a file,
each write durable, and no write under the lock on what is remembered.

:func:`hold_file` takes the file for this process (:class:`MemoryInUseError` when another
daemon, or this process, holds it). :class:`Journal` writes it: the memory records each
line under its own lock (:attr:`Journal.pending`, in the order of its changes) and one
writer at a time, holding :attr:`Journal.io` and not that lock, appends them, flushed and
``os.fsync``'d (the directory too when the file is new), or rewrites the file whole
(:meth:`Journal.replace`: atomically, a crash keeps the old file or the new). So a look at
the memory, the daemon's processing thread's at enqueue, never waits on the disk, and a
call that changed it still returns only once its line is on disk: a line recorded during
another's write goes with the next, which its caller waits for.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from xasflow.adapters.file_lock import HeldElsewhere, hold, release
from xasflow.adapters.queueserver_records import Key, fsync_dir

__all__ = ["Journal", "MemoryInUseError", "hold_file", "let_go"]

#: The memory files open in this process (a second one is refused with a message saying so).
_OPEN: set[Path] = set()
_OPEN_LOCK = threading.Lock()


class MemoryInUseError(RuntimeError):
    """The memory file is held by another daemon (or already open in this process)."""


class Journal:
    """The writes of one memory file, ``path``, rewritten at twice ``limit`` lines or twice
    what the last rewrite wrote, whichever is more (amortised, a line costs a few)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        #: held by the one writer, across its fsync (taken before the memory's lock)
        self.io = threading.Lock()
        #: lines recorded, not written yet, and whether the file is to be rewritten whole
        #: (plans forgotten, or a write failed): under the memory's lock
        self.pending: list[tuple[str, Key | None]] = []
        self.anew = False
        #: under ``io``: lines in the file, lines the last rewrite wrote (0: none in this
        #: process), and whether the file ends in a torn line (the next starts a new line)
        self.lines = 0
        self.kept = 0
        self.torn = False

    def due(self, count: int) -> bool:
        """Whether ``count`` more lines call for a rewrite instead of an append."""
        return self.anew or self.lines + count >= 2 * max(self.limit, self.kept)

    def append(self, lines: list[str]) -> None:
        """``lines`` at the end of the file, on disk when this returns (holding ``io``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as f:
            f.write("\n" * self.torn + "".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path.parent)
        self.lines += sum(line.count("\n") + 1 for line in lines)
        self.torn = False

    def replace(self, lines: list[str]) -> None:
        """The file anew with ``lines``, on disk when this returns (holding ``io``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.lines = self.kept = sum(line.count("\n") + 1 for line in lines)
        self.torn = False


def hold_file(path: Path) -> int:
    """An exclusive flock on ``path``'s lock file (:mod:`~xasflow.adapters.file_lock`), for
    this process's life or until :func:`let_go` (the returned descriptor);
    :class:`MemoryInUseError` when another holds it."""
    key = path.resolve()
    with _OPEN_LOCK:
        if key in _OPEN:
            raise MemoryInUseError(
                f"{path} is already open in this process (one queueserver submitter a file)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = hold(path.with_name(path.name + ".lock"))
        except HeldElsewhere as held:
            raise MemoryInUseError(
                f"{path} is held by another xasflow daemon (pid {held.pid}): two daemons "
                "on one store directory would both queue the same plans; give each its own "
                "storage.directory (the lock goes when that process ends, even killed)"
            ) from None
        _OPEN.add(key)
        return fd


def let_go(path: Path, fd: int) -> None:
    """Release what :func:`hold_file` took, for another daemon (or this process again)."""
    with _OPEN_LOCK:
        _OPEN.discard(path.resolve())
    release(fd)
