"""Operator limits on the HTTP side: at most N concurrent event streams, refusals counted.

An event stream (the dashboard's ``/events``) holds a connection and a task for as long as
the page is open, so 1,000 clients cost 1,000 of each. :class:`StreamLimit` admits a
stream only while fewer than ``maximum`` are open; the next one is answered 503 with
``Retry-After`` and counted (``on_refused``, e.g. ``Counters.refused_by_limit``, exported
as ``xasflow_limit_refused_total{limit}``). A slot is held from admission until the
response ends, whatever ends it (client gone, server stopping).

:class:`SharedRead` bounds what a blocking read (``/metrics``, ``/health``) can take: one
read at a time per endpoint, in a daemon thread of its own (not the event loop's shared
pool), its answer shared by the requests that arrive while it runs, each of which waits at
most until ``wait_s`` after the read began. A part that blocks for good then holds one
thread, and every later request is answered 503 at once instead of taking another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

__all__ = ["SharedRead", "StreamLimit"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StreamLimit:
    """A cap on concurrent streaming responses; used on the HTTP event loop only."""

    def __init__(
        self,
        maximum: int,
        name: str = "sse_clients",
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """``maximum`` streams at once; ``on_refused(name)`` is called for each refusal."""
        if maximum < 1:
            raise ValueError("maximum must be >= 1")
        self.maximum = maximum
        self.name = name
        self.on_refused = on_refused
        self.open = 0
        self.refused = 0

    def stats(self) -> dict[str, int]:
        """The limit, the streams open now and the refusals since start."""
        return {"max": self.maximum, "open": self.open, "refused": self.refused}

    def wrap(self, endpoint: Callable[[Request], Response]) -> _Limited:
        """An ASGI app serving ``endpoint``'s response within the limit (503 beyond it).

        An object, not a function, so Starlette's ``Route`` mounts it as ASGI as it is.
        """
        return _Limited(self, endpoint)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(self.name)
        response = PlainTextResponse(
            f"503: at most {self.maximum} event streams at once (http.max_sse_clients); "
            "close another page or raise the limit\n",
            status_code=503,
            headers={"Retry-After": "5"},
        )
        await response(scope, receive, send)


class _Limited:
    """ASGI app: one slot of a :class:`StreamLimit` held while the response runs."""

    def __init__(self, limit: StreamLimit, endpoint: Callable[[Request], Response]) -> None:
        self.limit = limit
        self.endpoint = endpoint

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = self.limit
        if limit.open >= limit.maximum:
            await limit._refuse(scope, receive, send)
            return
        limit.open += 1  # no await between the check and this: the count is exact
        try:
            await self.endpoint(Request(scope, receive))(scope, receive, send)
        finally:
            limit.open -= 1


class SharedRead(Generic[T]):
    """One blocking read at a time, shared by its concurrent callers; used on one event
    loop. :meth:`read` gives None (answer 503) once the read in flight is ``wait_s`` old."""

    def __init__(self, name: str, read: Callable[[], T], wait_s: float) -> None:
        """``read`` runs in a daemon thread named ``xasflow-<name>``; ``wait_s``: how long
        after it began its callers wait for it (Prometheus's scrape timeout is 10 s)."""
        self.name = name
        self._read = read
        self.wait_s = wait_s
        self.refused = 0  # callers answered None: the read in flight outlived wait_s
        self._flight: _Flight | None = None

    @property
    def running_s(self) -> float | None:
        """How long the read in flight has run (None: none runs)."""
        flight = self._flight
        return None if flight is None or flight.answered else time.monotonic() - flight.began

    async def read(self) -> T | None:
        """The read's value (a fresh read, or the one in flight when this call came), or
        None when it has run ``wait_s`` without answering; raises what the read raised."""
        flight = self._flight
        if flight is None or flight.answered:  # answered: its callers have their value
            flight = self._flight = self._start(asyncio.get_running_loop())
        left = flight.began + self.wait_s - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            value, error = await asyncio.wait_for(asyncio.shield(flight.future), left)
        except TimeoutError:
            self.refused += 1
            flight.refused += 1
            if flight.refused == 1:
                logger.warning(
                    "%s: its read has not answered in %.1f s; later requests get 503 until it does",
                    self.name,
                    time.monotonic() - flight.began,
                )
            return None
        if error is not None:
            raise error
        return value

    def refusal(self) -> Response:
        """The 503 for a caller :meth:`read` gave None."""
        return PlainTextResponse(
            f"503: the previous {self.name} read has not answered in "
            f"{self.running_s or 0.0:.1f} s (a part of the daemon does not answer)\n",
            status_code=503,
            headers={"Retry-After": "5"},
        )

    def _start(self, loop: asyncio.AbstractEventLoop) -> _Flight:
        flight = _Flight(loop.create_future())

        def run() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (self._read(), None)
            except BaseException as exc:  # handed to the callers, raised there
                outcome = (None, exc)
            flight.answered = True  # the next call reads afresh, landed or not
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(flight.land, outcome)

        threading.Thread(target=run, name=f"xasflow-{self.name}", daemon=True).start()
        return flight


class _Flight:
    """One :class:`SharedRead` read: when it began, its callers' future, whether it answered."""

    def __init__(self, future: asyncio.Future[tuple[Any, BaseException | None]]) -> None:
        self.began = time.monotonic()
        self.future = future
        self.answered = False  # set by the read's thread
        self.refused = 0

    def land(self, outcome: tuple[Any, BaseException | None]) -> None:
        """On the loop: hand the read's outcome to the callers still waiting."""
        if not self.future.done():
            self.future.set_result(outcome)
