"""Back-pressure of :class:`~xasflow.adapters.tiled_store.AnalysisStore`: callers waiting for room.

At most ``max_queue`` rows may be accepted but not yet committed. With ``full_wait_s`` a
caller first waits that long for the writer to make room (counted in ``full_waits`` and
``full_wait_ms``); once a row was refused anyway, or :meth:`Backpressure.stop_waiting` was
called, nobody waits any more. Kept apart from the caller side so that module stays in one
sitting; :class:`Backpressure` is a mixin only ``AnalysisStore`` uses.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Backpressure"]


class Backpressure:
    """Waiting for room in the store's backlog; every method but :meth:`stop_waiting` and
    :attr:`refused` is called with the store's lock held."""

    _cond: threading.Condition
    _room: threading.Condition  # on _cond's lock: notified as rows leave the backlog
    _counts: dict[str, int]
    _backlog: int
    _full_wait: float  # seconds callers waited for room
    full_wait_s: float
    max_queue: int

    def _check_open(self) -> None:  # AnalysisStore's: raises StoreError once it closes
        raise NotImplementedError

    def _may_wait(self) -> bool:
        """Whether callers wait for room: ``full_wait_s`` is set, nothing was refused yet
        (after a refusal the results after it are redelivered anyway, so waiting would only
        stall the input), and :meth:`stop_waiting` was not called."""
        return self.full_wait_s > 0 and self._counts["dropped"] == 0

    def _wait_for_room(self, n: int) -> None:
        """Wait (lock held) up to ``full_wait_s`` until ``n`` rows fit the backlog (or it is
        empty, for a page larger than ``max_queue``); raises StoreError if the store closes."""
        self._counts["full_waits"] += 1
        start = time.monotonic()
        while self._backlog > 0 and self._backlog + n > self.max_queue:
            remaining = start + self.full_wait_s - time.monotonic()  # stop_waiting cuts it
            if remaining <= 0:
                break
            self._room.wait(remaining)
            self._check_open()
        self._full_wait += time.monotonic() - start

    def stop_waiting(self) -> None:
        """Callers wait for room no more, those waiting now included (a daemon stopping:
        what does not fit is refused and counted, and a Kafka input holds its commits)."""
        with self._cond:
            self.full_wait_s = 0.0
            self._room.notify_all()

    @property
    def refused(self) -> int:
        """Rows refused so far because the store was full (``stats()['dropped']``, lock-free)."""
        return self._counts["dropped"]

    @property
    def write_lost(self) -> int:
        """Rows accepted and then given up because the catalog would not take them (a failed
        append or table, the catalog down at the end), with no copy in the journal, with or
        without callbacks: a redelivery may store them (``stats()['write_lost']``,
        lock-free); ``flush()`` answers False once there is one. Rows that do not fit their
        run's columns are not among them: they would fail the same way again."""
        return self._counts["write_lost"]
