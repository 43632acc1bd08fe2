"""Operator limits on the HTTP side: at most N concurrent event streams, refusals counted.

An event stream (the dashboard's ``/events``) holds a connection and a task for as long as
the page is open, so 1,000 clients cost 1,000 of each. :class:`StreamLimit` admits a
stream only while fewer than ``maximum`` are open; the next one is answered 503 with
``Retry-After`` and counted (``on_refused``, e.g. ``Counters.refused_by_limit``, exported
as ``xasflow_limit_refused_total{limit}``). A slot is held from admission until the
response ends, whatever ends it (client gone, server stopping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

__all__ = ["StreamLimit"]


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
