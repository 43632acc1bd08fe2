"""Publish nothing the store does not hold: a gate between the processing thread and the bus.

With ``output.after_store`` the daemon hands each analysis document to :class:`CommitGate`
instead of the publisher. The gate remembers how many store rows had been submitted when the
document came, and its own thread (``xasflow-publish``, the only user of the publisher's
socket) sends the document once that many rows are *resolved*: committed (the store's
``on_stored``) or refused by the store (counted there as dropped). Documents keep their
order. A document still held after ``timeout_s`` (a store that stopped committing) is sent
anyway and counted in ``released_unstored``, so the bus never goes silent.

The price is latency: results wait for the store's next commit (``storage.flush_interval_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["CommitGate"]

logger = logging.getLogger(__name__)


class CommitGate:
    """Holds each document until every store row submitted before it has committed."""

    def __init__(self, publish: Callable[[str, dict[str, Any]], None], timeout_s: float = 5.0):
        self.publish = publish
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._held: deque[tuple[int, float, str, dict[str, Any]]] = deque()
        self._submitted = 0  # store rows handed to the store so far
        self._resolved = 0  # ... committed or refused
        self._closing = False
        self.published = 0
        self.released_unstored = 0
        self._thread = threading.Thread(target=self._run, name="xasflow-publish", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ store side

    def row_submitted(self) -> None:
        """A row was handed to the store (processing thread, before its document comes)."""
        with self._cond:
            self._submitted += 1

    def row_resolved(self) -> None:
        """A row committed (store writer thread) or was refused (processing thread)."""
        with self._cond:
            self._resolved += 1
            self._cond.notify()

    # ------------------------------------------------------------------ documents

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Hold ``doc`` until the rows submitted so far are resolved (never blocks)."""
        with self._cond:
            self._held.append((self._submitted, time.monotonic(), name, doc))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._held:
                        needed, since, _, _ = self._held[0]
                        waited = time.monotonic() - since
                        if self._resolved >= needed or waited >= self.timeout_s:
                            break
                        self._cond.wait(self.timeout_s - waited)
                    elif self._closing:
                        return
                    else:
                        self._cond.wait()
                needed, _, name, doc = self._held.popleft()
                unstored = self._resolved < needed
            if unstored:
                self.released_unstored += 1
                logger.warning("store has not committed for %.1f s: publishing", self.timeout_s)
            try:
                self.publish(name, doc)
                self.published += 1
            except Exception:
                logger.exception("cannot publish %s document", name)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is held (waiting for the store up to ``timeout_s`` each), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Documents published, held now, and released without their rows committed."""
        with self._cond:
            held = len(self._held)
        return {
            "published": self.published,
            "held": held,
            "released_unstored": self.released_unstored,
        }
