"""Flushing and closing :class:`~xasflow.adapters.tiled_store.AnalysisStore`: what they promise.

``flush()`` answers True once everything queued before it is committed or safe in the
journal (its rows are replayed at the next start), False once a row was given up for good
(counted in ``write_lost``: a failed append, a table that would not open, the catalog's
process down at the writer's end), while the store runs and while it closes: that row was
queued before the call too, and the loss is not forgotten (nor is an undelivered document
by the Kafka publisher's flush). ``close()`` writes everything queued and releases the
catalog; one called while another is under way waits for that one to end, so that either's
return means the same. :class:`StoreClosing` is a mixin only ``AnalysisStore`` uses.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from xasflow.adapters.store_journal import Journal
from xasflow.adapters.tiled_schema import StoreError

__all__ = ["FlushWait", "StoreClosing"]


@dataclass
class FlushWait:
    """A ``flush()`` waiting in the writer's queue until what came before it is settled."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False

    def settle(self, lost_now: int) -> None:
        """Everything queued before it has left the backlog (writer thread): ok unless rows
        were given up for good, ``lost_now`` (those queued after it are handled after this)."""
        self.ok = lost_now == 0
        self.done.set()


class StoreClosing:
    """``flush`` and ``close`` of the store; the attributes are ``AnalysisStore``'s."""

    _cond: threading.Condition
    _room: threading.Condition
    _items: deque[tuple[Any, ...]]
    _counts: dict[str, int]
    _backlog: int
    _closing: bool
    _closed: bool
    _calls: int
    _opening: int
    _writer: threading.Thread
    _journal: Journal | None
    _journal_w: Journal | None
    _close_ended = False  # the close() that began has returned or raised
    _close_ok = False  # ... and it returned

    def _release(self) -> None:  # AnalysisStore's: the catalog, the directory's lock
        raise NotImplementedError

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is committed, or safe in the
        journal; False on timeout, or when rows were given up for good (``write_lost`` > 0,
        from then on: see the module docstring). While the store closes it waits for the
        writer's end, rows given up there included."""
        with self._cond:
            closing = self._closed or self._closing
            if not closing:
                wait = FlushWait()
                self._items.append(("flush", wait))
                self._cond.notify()
        if closing:
            self._writer.join(timeout)
            return self._backlog == 0 and self._counts["write_lost"] == 0
        return wait.done.wait(timeout) and wait.ok

    def close(self) -> None:
        """Write everything queued, stop the writer thread and release the catalog. Called
        while another close() is under way it waits for that one to end (and raises
        StoreError if it failed); called after one ended it returns at once."""
        with self._cond:
            if self._closing:
                waited = not self._close_ended
                while not self._close_ended:
                    self._cond.wait()
                if waited and not self._close_ok:
                    raise StoreError("the analysis store's close in another thread failed")
                return
            self._closing = True
            self._room.notify_all()  # callers waiting for room learn that it closes
        ok = False
        try:
            self._close_writer()
            for journal in (self._journal, self._journal_w):
                if journal is not None:
                    journal.close()
            self._release()
            ok = True
        finally:  # a close() waiting for this one never hangs, whatever happened
            with self._cond:
                self._close_ended, self._close_ok = True, ok
                self._cond.notify_all()

    def _close_writer(self) -> None:
        """Queue the writer's stop behind what the calls under way accept, and wait for it."""
        with self._cond:
            while self._calls:  # what they accepted goes ahead of the stop, not behind it
                self._cond.wait()
            self._items.append(("stop",))
            self._cond.notify()
        self._writer.join()
        with self._cond:
            while self._opening:  # a start journalled meanwhile: withdrawn before the close
                self._cond.wait()
            self._closed = True
