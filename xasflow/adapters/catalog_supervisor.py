"""Keeps the analysis store's catalog child running: a dead child is replaced, with back-off.

The catalog's child process (:mod:`xasflow.adapters.tiled_server`) can die under the daemon
(the kernel's OOM killer, a stray SIGKILL). The store's writer thread calls
:meth:`CatalogSupervisor.poll` every step and at least once a second: once the child is found
dead, a new one is started on the same directory (new port, new API key) and its tiled client
handed back, so the writer can reattach its runs and replay the journal
(:meth:`~xasflow.adapters.writer_outage.CatalogOutage._recover`). The first try is at once;
while children keep dying or failing to start, the tries wait 1 s, doubling up to 30 s, so a
child that dies at once never spins. A child that stayed up for ``max_delay`` seconds counts
as healthy again: its death is retried at once. Everything here runs on the writer thread;
the daemon's processing thread never waits for it (its rows go on into the journal).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from xasflow.adapters.tiled_server import ChildLiveness, serve_in_child

__all__ = ["FIRST_DELAY_S", "MAX_DELAY_S", "POLL_S", "CatalogSupervisor"]

logger = logging.getLogger("xasflow.adapters.tiled_store")

#: How often (seconds) an idle writer thread looks at the child.
POLL_S = 1.0
#: The back-off of the tries after a catalog failure (seconds): the first, and the most it
#: doubles to (also that of a stop the catalog refused, :mod:`xasflow.adapters.writer_stops`).
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 30.0


class CatalogSupervisor:
    """The catalog's child process and its tiled client (``root``), restarted when it dies.

    ``first_delay`` / ``max_delay``: the back-off between tries (seconds, doubling);
    ``start_timeout``: how long a child may take to listen; ``python``: the interpreter that
    runs the child (default: this one).
    """

    def __init__(
        self,
        directory: Path,
        table_uris: list[str],
        *,
        first_delay: float = FIRST_DELAY_S,
        max_delay: float = MAX_DELAY_S,
        start_timeout: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        if not 0 < first_delay <= max_delay:
            raise ValueError("the back-off needs 0 < first_delay <= max_delay")
        self.directory = directory
        self.table_uris = list(table_uris)
        self.first_delay = float(first_delay)
        self.max_delay = float(max_delay)
        self.start_timeout = float(start_timeout)
        self.python = python
        self.root: Any = None  # the running child's client; None while it is down
        self.restarts = 0  # children started after one died
        self.failures = 0  # tries that did not bring a child up
        self.delay = 0.0  # the wait before the next try, once the child is down
        self._liveness = ChildLiveness()
        self._serving: contextlib.ExitStack | None = None
        self._next_try: float | None = None  # while down: when the next try is due
        self._up_since = 0.0

    def __call__(self) -> bool:
        """Whether the catalog answers: a child runs and its client is connected."""
        return self.root is not None and self._liveness()

    def start(self, now: float) -> Any:
        """Start the first child and return its client (CatalogServerError if it fails)."""
        self.root = self._spawn()
        self._up_since = now
        return self.root

    def poll(self, now: float) -> Any:
        """The new client once a dead child has been replaced, else None (the child runs, or
        the next try is not due, or it failed: logged and counted in ``failures``)."""
        if self():
            return None
        if self._next_try is None:  # found dead just now
            code = self._liveness.proc.poll() if self._liveness.proc is not None else None
            logger.error("analysis store: the catalog's process died (exit code %s)", code)
            self.root = None
            self._close_serving()
            if now - self._up_since >= self.max_delay:
                self.delay = 0.0  # it had been healthy: no back-off
            self._next_try = now + self.delay
        if now < self._next_try:
            return None
        self.delay = min(max(2 * self.delay, self.first_delay), self.max_delay)
        try:
            root = self._spawn()
        except Exception as exc:
            self.failures += 1
            self._next_try = now + self.delay
            logger.error(
                "analysis store: the catalog's process did not restart (%s); next try in %.0f s",
                exc,
                self.delay,
            )
            return None
        self.root, self._next_try, self._up_since = root, None, now
        self.restarts += 1
        logger.warning("analysis store: the catalog's process was restarted")
        return root

    def next_check(self, now: float) -> float:
        """When the writer thread should call :meth:`poll` next, at the latest."""
        if self():
            return now + POLL_S
        return now if self._next_try is None else self._next_try

    def close(self) -> None:
        """Stop the child (it exits when its stdin closes) and close its client."""
        self.root = None
        self._close_serving()

    def _spawn(self) -> Any:
        stack = contextlib.ExitStack()
        try:
            served = serve_in_child(
                self.directory,
                self.table_uris,
                timeout=self.start_timeout,
                liveness=self._liveness,
                python=self.python,
            )
            root = stack.enter_context(served)
        except BaseException:
            stack.close()
            raise
        self._serving = stack
        return root

    def _close_serving(self) -> None:
        serving, self._serving = self._serving, None
        if serving is not None:
            with contextlib.suppress(Exception):  # a dead child's client: nothing to save
                serving.close()
