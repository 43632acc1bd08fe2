"""A clock of the time a thread actually ran: for timeouts that a stalled process must not trip.

A daemon stopped by SIGSTOP, swapped out or starved for seconds wakes up to find every
wall-clock timeout expired, although nothing it waits for could have arrived meanwhile (its
input was queued behind the stall). :class:`LiveClock` is ticked once per pass of a loop and
counts each pass's wall time only up to what the pass could reasonably have taken, so a stall
counts as one short pass and a run or a held document is never timed out by it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LiveClock"]


class LiveClock:
    """Seconds counted by :meth:`tick`; read it by calling it (a drop-in ``clock``)."""

    def __init__(self, max_step_s: float = 0.25, wall: Callable[[], float] = time.monotonic):
        if not max_step_s > 0:
            raise ValueError("max_step_s must be > 0")
        self.max_step_s = float(max_step_s)
        self.wall = wall
        self._last = wall()
        self._now = 0.0
        self.discounted_s = 0.0  # wall time not counted (stalls, passes that did not count)

    def __call__(self) -> float:
        """The live time so far, in seconds."""
        return self._now

    def tick(self, expected_s: float = 0.0, counts: bool = True) -> float:
        """End a pass that was meant to take ``expected_s`` (e.g. a wait's timeout): count its
        wall time up to ``expected_s + max_step_s``, or nothing unless ``counts``; the live time."""
        wall = self.wall()
        step, self._last = max(0.0, wall - self._last), wall
        counted = min(step, max(0.0, expected_s) + self.max_step_s) if counts else 0.0
        self._now += counted
        self.discounted_s += step - counted
        return self._now
