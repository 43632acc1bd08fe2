"""One process at a time: an exclusive ``flock`` on a lock file, naming its holder.

The analysis store (its writer, :mod:`xasflow.adapters.tiled_store`) and the queueserver
submitter's memory (:mod:`xasflow.adapters.queueserver_memory`) each allow one holder: a
second process refuses to start rather than write beside the first. :func:`hold` takes the
lock without waiting and writes the holder's pid into the file; :class:`HeldElsewhere`
says which pid holds it when another process does. The kernel drops the lock when its
descriptor is closed (:func:`release`) or its process ends, even by SIGKILL: there is no
stale lock to clear. A lock file is never replaced (a new inode would be a new lock).
A flock belongs to an open file, so a second :func:`hold` in the same process fails too:
callers that can tell "already open here" apart check that first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["HeldElsewhere", "hold", "release"]


class HeldElsewhere(Exception):
    """Another process holds the lock; ``pid`` is the one it wrote there ("?" if unknown)."""

    def __init__(self, lock: Path, pid: str) -> None:
        super().__init__(f"{lock} is held by pid {pid}")
        self.lock = lock
        self.pid = pid


def hold(lock: Path) -> int:
    """Take the exclusive flock on ``lock`` (made if missing) without waiting, write this
    process's pid in it, and return its descriptor (held until :func:`release` or the
    process ends); :class:`HeldElsewhere` when another process holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = ""
        with contextlib.suppress(OSError):
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise HeldElsewhere(lock, pid or "?") from None
    with contextlib.suppress(OSError):  # the pid is a courtesy to the next one refused
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(fd: int) -> None:
    """Drop the lock :func:`hold` returned (closing its descriptor)."""
    os.close(fd)
