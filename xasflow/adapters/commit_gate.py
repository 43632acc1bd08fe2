"""Publish nothing the store does not hold: a gate between the processing thread and the bus.

With ``output.after_store`` the daemon hands each analysis document to :class:`CommitGate`
instead of the publisher. The gate remembers how many store rows had been submitted when the
document came, and its own thread (``xasflow-publish``, the only user of the publisher's
socket) sends the document once that many rows are *resolved*: committed (the store's
``on_stored``), refused by the store (counted there as dropped or unstored) or accepted and
then given up (``on_lost``, counted as lost). Documents keep their order.

Latency: a document waits for its rows' commit. With ``commit_now`` (the daemon passes a
non-blocking "commit what you hold" of the store) the gate asks for that commit as soon as a
document waits for rows not yet covered by an earlier request, instead of waiting for the
store's own ``flush_interval``: one transaction per request, holding every row submitted by
then (under load, requests come once per commit, so transactions grow with the rate).

Timeouts and shutdown: a document held for ``timeout_s`` (a store that stopped committing) is
sent anyway and counted in ``released_unstored``, so the bus never goes silent. Held time is
read on a :class:`~xasflow.adapters.live_clock.LiveClock`: a process that was stopped
(SIGSTOP) or starved does not release documents unstored just because the wall clock moved;
the store gets its time to commit once the process runs again. ``close`` sends what is held
(waiting for the store as above); documents it cannot send in time are counted in
``dropped_on_close``, and documents the publisher refused in ``publish_errors``.

:meth:`CommitGate.drained` waits until every document handed over so far has left the gate:
the Kafka input commits its offsets only after that and the publisher's flush, so a result
still held here (or released but not yet produced) is never covered by a commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from xasflow.adapters.live_clock import LiveClock

__all__ = ["CommitGate"]

logger = logging.getLogger(__name__)


class CommitGate:
    """Holds each document until every store row submitted before it has committed."""

    def __init__(
        self,
        publish: Callable[[str, dict[str, Any]], None],
        timeout_s: float = 5.0,
        *,
        commit_now: Callable[[], Any] | None = None,
        clock: LiveClock | None = None,
    ) -> None:
        """``publish(name, doc)``: the publisher; ``commit_now()``: ask the store to commit
        what it holds, without blocking; ``clock``: the live clock for ``timeout_s``."""
        self.publish = publish
        self.timeout_s = float(timeout_s)
        self.commit_now = commit_now
        self.clock = clock if clock is not None else LiveClock()
        self._cond = threading.Condition()
        self._held: deque[tuple[int, float, str, dict[str, Any]]] = deque()
        self._submitted = 0  # store rows handed to the store so far
        self._resolved = 0  # ... committed or refused
        self._requested = 0  # rows covered by the last commit request
        self._taken = 0  # documents handed to the gate (under _cond)
        self._left = 0  # ... that have left it: published or refused (under _out)
        self._out = threading.Condition()
        self._closing = False
        self.published = 0
        self.released_unstored = 0
        self.commit_requests = 0
        self.publish_errors = 0
        self.dropped_on_close = 0
        self._thread = threading.Thread(target=self._run, name="xasflow-publish", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ store side

    def row_submitted(self) -> None:
        """A row was handed to the store (processing thread, before its document comes)."""
        with self._cond:
            self._submitted += 1

    def row_resolved(self) -> None:
        """A row committed or was given up (store writer thread), or was refused (processing
        thread)."""
        with self._cond:
            self._resolved += 1
            if self._held and self._resolved >= self._held[0][0]:
                self._cond.notify()  # only when the head can go: journalled rows resolve
                # before their document arrives, and a wake-up per row costs the GIL

    # ------------------------------------------------------------------ documents

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Hold ``doc`` until the rows submitted so far are resolved (never blocks)."""
        with self._cond:
            self._held.append((self._submitted, self.clock(), name, doc))
            self._taken += 1
            self._cond.notify()

    def drained(self, timeout: float) -> bool:
        """Whether every document handed over before this call has left the gate (passed to
        the publisher: sent, or refused and counted) within ``timeout`` seconds."""
        with self._cond:
            target = self._taken
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._out:
            while self._left < target:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return False
                self._out.wait(left_s)
        return True

    def _next(self) -> tuple[str, dict[str, Any], bool] | None:
        """Wait for the head document to be due; it, and whether it goes out unstored (None:
        closed and empty). Asks for a commit (outside the lock) when the head needs one."""
        while True:
            request = False
            with self._cond:
                if not self._held:
                    if self._closing:
                        return None
                    self._cond.wait()
                    self.clock.tick(counts=False)  # nothing was held: idle time need not count
                    continue
                needed, since, name, doc = self._held[0]
                held_s = self.clock() - since
                if self._resolved >= needed or held_s >= self.timeout_s:
                    self._held.popleft()
                    return name, doc, self._resolved < needed
                if self.commit_now is not None and needed > self._requested:
                    self._requested = self._submitted
                    self.commit_requests += 1
                    request = True
                else:  # short waits: a stall during one counts as one short wait
                    wait_s = min(self.timeout_s - held_s, self.clock.max_step_s)
                    self._cond.wait(wait_s)
                    self.clock.tick(expected_s=wait_s)
            if request:
                self._request_commit()

    def _request_commit(self) -> None:
        assert self.commit_now is not None
        try:
            self.commit_now()
        except Exception:  # the timeout still releases what waits for it
            logger.exception("cannot ask the store to commit")

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            name, doc, unstored = item
            if unstored:
                self.released_unstored += 1
                if self.released_unstored % 1000 == 1:  # the first of each thousand
                    logger.warning(
                        "a result waited %.1f s for the store: published unstored (%d so far)",
                        self.timeout_s,
                        self.released_unstored,
                    )
            try:
                self.publish(name, doc)
                self.published += 1
            except Exception:
                self.publish_errors += 1
                logger.exception("cannot publish %s document", name)
            with self._out:
                self._left += 1
                self._out.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Send what is held (waiting for the store up to ``timeout_s`` each), then stop;
        what is still held after ``timeout`` is dropped and counted (``dropped_on_close``)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            if self._held:
                self.dropped_on_close += len(self._held)
                logger.error("%d analysis documents never published", len(self._held))
                self._held.clear()

    def stats(self) -> dict[str, int]:
        """Documents published, held now, released without their rows committed, commit
        requests made, publish errors and documents dropped at close."""
        with self._cond:
            held = len(self._held)
        return {
            "published": self.published,
            "held": held,
            "released_unstored": self.released_unstored,
            "commit_requests": self.commit_requests,
            "publish_errors": self.publish_errors,
            "dropped_on_close": self.dropped_on_close,
        }
