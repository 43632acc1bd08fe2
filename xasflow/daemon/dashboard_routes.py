"""The dashboard's routes on the daemon's Starlette app (:func:`install_dashboard`)::

    GET /              the page (``static/index.html``; every asset local, no CDN)
    GET /static/x.js   its scripts, ES modules (their imports carry the page's ``?token=``)
    GET /static/x.css  its style sheet
    GET /api/state     the current state as one JSON object (503 while its build hangs)
    GET /events        server-sent events: ``event: state`` with that JSON, pushed on change;
                       ``event: stale`` once no newer state comes (a part hangs in the build)
    GET /api/dashboard the dashboard's own counters (documents, dropped, messages, clients)

No folder is served: each file answers at its own name only, through the route that fills
its placeholders (a folder's server resolved ``/static/..%2Fstatic%2Fapp.js`` inside it and
served the template, its imports without the token). The page is read-only; access control
(loopback by default, ``http.token`` otherwise) is the app's
:class:`xasflow.daemon.http.TokenAuth`. What the page shows, and how the state it reads is
built and throttled: :mod:`xasflow.daemon.dashboard`.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from xasflow.daemon.dashboard import Dashboard
from xasflow.daemon.limits import SharedRead, StreamLimit

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from xasflow.daemon.view import DaemonView

__all__ = ["STATIC_DIR", "install_dashboard"]

#: The page's files (HTML, JS, CSS), served under ``/static``.
STATIC_DIR = Path(__file__).with_name("static")

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


#: A script's or style sheet's name under ``/static``, its suffix apart (no dots, no slashes:
#: nothing outside the folder, and one spelling a file).
_ASSET_NAME = re.compile(r"[a-z][a-z0-9_]*")

#: Said, not guessed from the platform's table (Windows often maps ``.js`` to text/plain,
#: and a browser refuses an ES module served so); never sniffed as anything else (the style
#: sheet's too).
_SCRIPT_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _query(token: str | None) -> str:
    """``?token=...`` (percent-encoded: safe in a URL, an HTML attribute, a JS string) or ``""``."""
    return "?token=" + urllib.parse.quote(token, safe="") if token else ""


def _index_html(token: str | None) -> str:
    """The page, its asset URLs carrying ``?token=`` when the request came with one."""
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return text.replace("{{query}}", html.escape(_query(token), quote=True))


def _asset(name: str, suffix: str) -> str | None:
    """The text of ``static/<name><suffix>``; None if there is no such file (or ``name`` is
    no plain name)."""
    if not _ASSET_NAME.fullmatch(name):
        return None
    try:
        return (STATIC_DIR / f"{name}{suffix}").read_text(encoding="utf-8")
    except OSError:
        return None


def _script(name: str, token: str | None) -> str | None:
    """The module ``static/<name>.js``, its imports carrying ``?token=`` as the page's assets
    do (a module's imports drop the query of its own URL); None if there is no such file."""
    text = _asset(name, ".js")
    return None if text is None else text.replace("{{query}}", _query(token))


def install_dashboard(
    app: Starlette,
    view: DaemonView,
    rate_hz: float = 5.0,
    max_clients: int = 64,
    wait_s: float = 10.0,
) -> Dashboard:
    """Add the dashboard's routes to ``app`` and start the dashboard (``app.state.dashboard``).

    At most ``max_clients`` event streams at once (``app.state.sse_limit``; beyond: 503, counted).
    ``/api/state`` and each new stream's first state are one shared build at a time, in a
    thread of its own (:class:`~xasflow.daemon.limits.SharedRead`): once it is ``wait_s`` old
    (a part hangs in the health report) ``/api/state`` answers 503 and a stream the last
    state, marked stale, instead of each taking a thread of the event loop's shared pool.

    The caller feeds it (:meth:`Dashboard.listener`, :meth:`Dashboard.offer_latest`); it is
    stopped by ``app.state.on_stop`` (see :class:`~xasflow.daemon.http.HttpServer`).
    """
    dash = Dashboard(view, rate_hz=rate_hz)
    build = SharedRead("dashboard-state", dash.message, wait_s)
    limit = StreamLimit(max_clients, on_refused=view.counters.refused_by_limit)

    async def index(request: Request) -> Response:
        try:
            page = _index_html(request.query_params.get("token"))
        except OSError:  # an install without the package data
            return PlainTextResponse(
                f"dashboard assets missing from {STATIC_DIR}; reinstall xasflow", status_code=503
            )
        return HTMLResponse(page, headers=_SECURITY_HEADERS)

    async def script(request: Request) -> Response:
        text = _script(request.path_params["name"], request.query_params.get("token"))
        if text is None:
            return PlainTextResponse("Not Found", status_code=404)
        return Response(text, media_type="text/javascript", headers=_SCRIPT_HEADERS)

    async def style(request: Request) -> Response:
        text = _asset(request.path_params["name"], ".css")
        if text is None:
            return PlainTextResponse("Not Found", status_code=404)
        return Response(text, media_type="text/css", headers=_SCRIPT_HEADERS)

    async def state(request: Request) -> Response:
        built = await build.read()
        if built is None:  # the build in flight hangs: no state to give as current
            return build.refusal()
        return Response(
            built[1], media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    def events(request: Request) -> Response:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            dash.stream(build.read), media_type="text/event-stream", headers=headers
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(dash.stats())

    app.router.routes.extend(
        [
            Route("/", index, methods=["GET"]),
            Route("/api/state", state, methods=["GET"]),
            Route("/api/dashboard", stats, methods=["GET"]),
            Route("/events", limit.wrap(events), methods=["GET"]),
            Route("/static/{name}.js", script, methods=["GET"]),
            Route("/static/{name}.css", style, methods=["GET"]),
        ]
    )
    app.state.dashboard = dash
    app.state.sse_limit = limit
    on_stop = getattr(app.state, "on_stop", None)
    if on_stop is None:
        on_stop = app.state.on_stop = []
    on_stop.append(dash.stop)
    dash.start()
    return dash
