"""The daemon's HTTP side: ``/metrics`` (Prometheus) and ``/health`` (JSON), served by uvicorn.

``create_app(view, http_config)`` returns a plain Starlette app, so more routes (the dashboard) can be
added with ``app.router.routes.append(...)`` or ``app.mount(...)`` before the server starts.
:class:`HttpServer` runs uvicorn in a thread of its own on a socket bound up front, so the
port is known (``port=0`` picks a free one) and ``start()`` returns only once it accepts.

With ``http.dashboard`` (default) the app also serves the operators' page
(:mod:`xasflow.daemon.dashboard`, ``app.state.dashboard``; the caller feeds it), with at most
``http.max_sse_clients`` event streams at once (:class:`xasflow.daemon.limits.StreamLimit`). With ``http.token`` set (required off loopback),
:class:`TokenAuth` answers 401 to every request lacking it (``?token=`` or
``Authorization: Bearer``), Prometheus scrapes included. ``app.state.on_stop`` callables run
when :class:`HttpServer` stops, before uvicorn is told to exit (open event streams end).

Metrics come from a ``CollectorRegistry`` built per scrape: the outcome counters
(:func:`xasflow.daemon.counters.register_prometheus`) plus :class:`AdapterCollector`, which
reads the 0MQ input, the publisher and the analysis store at scrape time. Gauges (queue
depth, open runs, store backlog) are the counters' gauges, refreshed by
``DaemonView.read_stats()`` before each scrape from the same read the collector reports
(one read of the store's counts per scrape).

Nothing here holds the daemon: the app reads a :class:`~xasflow.daemon.view.DaemonView`.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from xasflow.daemon.limits import SharedRead

if TYPE_CHECKING:
    from xasflow.daemon.config import HttpConfig
    from xasflow.daemon.view import DaemonView, StatsReading

__all__ = [
    "LIVEZ",
    "OPEN_PATHS",
    "READYZ",
    "AdapterCollector",
    "HttpServer",
    "TokenAuth",
    "add_route",
    "create_app",
    "metrics_registry",
]

logger = logging.getLogger(__name__)

#: Input counters exported as ``xasflow_input_<name>_total`` (ZmqDocumentSource.stats keys).
_INPUT_COUNTERS: dict[str, str] = {
    "received": "0MQ messages received",
    "bytes_received": "bytes received on the 0MQ input",
    "decoded": "messages decoded into documents",
    "enqueued": "documents queued for analysis",
    "delivered": "documents taken from the queue by the processing thread",
    "backpressure_waits": "times the receive thread waited for room in the queue",
    "receive_errors": "0MQ receive errors",
}
#: Input losses exported as ``xasflow_input_dropped_total{cause}``.
_INPUT_DROPS = ("dropped_overflow", "dropped_on_close")


class AdapterCollector:
    """Prometheus collector over the daemon's adapters (input, output, store), read at scrape
    (``reading``: the input's and the store's stats the scrape already read, else read here)."""

    def __init__(self, view: DaemonView, reading: StatsReading | None = None) -> None:
        self.view = view
        self.reading = reading

    def describe(self) -> list[Any]:
        return []  # unchecked: families are produced at collect time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        d = self.view
        src = d.input_stats() if self.reading is None else self.reading.input
        for key, text in _INPUT_COUNTERS.items():
            yield CounterMetricFamily(f"xasflow_input_{key}", text, value=src.get(key, 0))
        fam = CounterMetricFamily(
            "xasflow_input_dropped", "decoded documents dropped by the input", labels=["cause"]
        )
        for key in _INPUT_DROPS:
            fam.add_metric([key.removeprefix("dropped_")], src.get(key, 0))
        fam.add_metric(["own_output"], src.get("ignored", 0))  # DaemonView.echo_dropped
        yield fam
        fam = CounterMetricFamily(
            "xasflow_input_documents", "documents received, by name", labels=["name"]
        )
        for key, value in sorted(src.items()):
            if key.startswith("documents."):
                fam.add_metric([key.split(".", 1)[1]], value)
        yield fam
        out = d.output_stats()
        yield CounterMetricFamily(
            "xasflow_output_documents", "analysis documents published", value=out.get("sent", 0)
        )
        yield CounterMetricFamily(
            "xasflow_output_bytes",
            "bytes of analysis documents published",
            value=out.get("bytes_sent", 0),
        )
        yield from _output_losses(out)
        store = d.store_stats() if self.reading is None else self.reading.store
        if store:
            fam = CounterMetricFamily(
                "xasflow_store_rows", "analysis rows by store outcome", labels=["outcome"]
            )
            for key in ("stored", "duplicates", "dropped", "unstored", "lost"):
                fam.add_metric([key], store.get(key, 0))
            yield fam
            for counter, name, text, key in _STORE_SCALARS:
                family = CounterMetricFamily if counter else GaugeMetricFamily
                yield family(name, text, value=store.get(key, 0))
            yield CounterMetricFamily(
                "xasflow_store_full_wait_seconds",
                "time results waited for room in the full store, in all",
                value=store.get("full_wait_ms", 0) / 1e3,
            )
            yield GaugeMetricFamily(  # a hung catalog write or journal fsync: XasflowStoreStalled
                "xasflow_store_stalled_seconds",
                "seconds results have waited for the store with none written (0: none wait)",
                value=store.get("stalled_ms", 0) / 1e3,
            )
        refused = GaugeMetricFamily(  # lasts while the bundle stays: the refusal counter
            "xasflow_model_refused_current",  # moved once, maybe before the first scrape
            "bundle directories refused now (1 each), by directory and reason",
            labels=["directory", "reason"],
        )
        for name, reason in d.models_refused_now().items():
            refused.add_metric([name, reason], 1)
        yield refused
        yield GaugeMetricFamily(
            "xasflow_up",
            "1 once started (a bundle serving or not: xasflow_model_info), 0 while stopping",
            value=int(d.ready),
        )
        yield GaugeMetricFamily("xasflow_uptime_seconds", "seconds since start", value=d.uptime)
        yield from _liveness(d)


def _liveness(d: DaemonView) -> Iterator[Any]:
    """When the processing loop last passed (an idle one passes every 50 ms, so an old one
    is a stall) and when the input last decoded a document (absent before its first)."""
    from prometheus_client.core import GaugeMetricFamily

    now = time.time()
    for name, text, age in (
        ("processing_last_turn", "the processing loop's last pass", d.last_turn_age()),
        ("input_last_document", "the input's last decoded document", d.last_document_age()),
    ):
        family = GaugeMetricFamily(f"xasflow_{name}_timestamp_seconds", f"Unix time of {text}")
        if age is not None:
            family.add_metric([], now - age)
        yield family


#: The store's single-valued metrics: (counter?, name, help, its key in the store's stats).
_STORE_SCALARS = (
    (True, "xasflow_store_batches", "store write transactions", "batches"),
    (True, "xasflow_store_errors", "store write errors", "errors"),
    (
        False,
        "xasflow_store_catalog_up",
        "1 while the analysis catalog answers (its child process runs)",
        "catalog_up",
    ),
    (
        True,
        "xasflow_store_catalog_restarts",
        "catalog child processes the store started after one died",
        "catalog_restarts",
    ),
    (
        True,
        "xasflow_store_catalog_restart_failures",
        "tries to restart the catalog's child process that did not bring it up",
        "catalog_restart_failures",
    ),
    (
        True,
        "xasflow_store_full_waits",
        "result batches that waited for room in the full store (storage.full_wait_s)",
        "full_waits",
    ),
    (
        False,
        "xasflow_store_journal_rows",
        "results acknowledged in the store's journal, not yet in its catalog",
        "journal_rows",
    ),
)


def _output_losses(out: dict[str, int]) -> Iterator[Any]:
    """What did not go out as it should: documents dropped by cause, published before their
    rows were stored, and held for the store now (publish-after-store, ``output.after_store``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fam = CounterMetricFamily(
        "xasflow_output_dropped", "analysis documents never published, by cause", labels=["cause"]
    )
    refused = out.get("after_store.publish_errors", 0) + out.get("publish_errors", 0)
    fam.add_metric(["publish_error"], refused)  # by the gate's thread, or the loop's
    fam.add_metric(["held_at_close"], out.get("after_store.dropped_on_close", 0))
    fam.add_metric(["delivery_failure"], out.get("delivery_failures", 0))  # Kafka's reports
    yield fam
    yield CounterMetricFamily(
        "xasflow_output_released_unstored",
        "analysis documents published before the store acknowledged their rows",
        value=out.get("after_store.released_unstored", 0),
    )
    yield GaugeMetricFamily(
        "xasflow_output_held",
        "analysis documents waiting for the store before they are published",
        value=out.get("after_store.held", 0),
    )


def metrics_registry(view: DaemonView, reading: StatsReading | None = None) -> Any:
    """A fresh ``CollectorRegistry`` with the daemon's counters and adapter stats (those in
    ``reading`` where given: one scrape reads the store's counts once)."""
    from prometheus_client import CollectorRegistry

    from xasflow.daemon.counters import register_prometheus

    registry = CollectorRegistry(auto_describe=False)
    register_prometheus(view.counters, registry)
    registry.register(AdapterCollector(view, reading))
    return registry


def create_app(view: DaemonView, http_config: HttpConfig | None = None) -> Starlette:
    """The Starlette app with ``GET /metrics``, ``/health`` and the open probes ``/livez`` and
    ``/readyz``; add routes to extend it.

    With ``http_config.dashboard`` the operators' page is installed too
    (``app.state.dashboard``: feed it with its ``listener`` and ``offer_latest``).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    def render_metrics() -> bytes:
        # the stats read once: the gauges refreshed from them and the adapters' families
        return generate_latest(metrics_registry(view, view.read_stats()))

    # both off the event loop: they read the parts' stats (the store's without waiting on a
    # hung write, AnalysisStore.stats), and a part that blocks anyway must not hold /livez,
    # /readyz and the dashboard's stream back with them, nor take a thread per scrape
    metrics_read = SharedRead("metrics", render_metrics, SCRAPE_WAIT_S)
    health_read = SharedRead("health", lambda: view.health(), SCRAPE_WAIT_S)  # looked up per read

    async def metrics(request: Request) -> Response:
        body = await metrics_read.read()
        if body is None:  # the previous scrape's read still runs
            return metrics_read.refusal()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        body = await health_read.read()
        if body is None:
            return health_read.refusal()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def livez(request: Request) -> JSONResponse:
        return JSONResponse({"alive": True})  # the event loop answers: nothing more is said

    async def readyz(request: Request) -> JSONResponse:
        # ready to give answers: started, and at least one bundle loaded (a daemon without
        # one rejects every spectrum no_model; /health and the logs say why)
        ready = bool(view.ready) and bool(view.counters.snapshot()["models"])
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    app = Starlette(
        routes=[
            Route("/metrics", metrics, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route(LIVEZ, livez, methods=["GET"]),
            Route(READYZ, readyz, methods=["GET"]),
        ]
    )
    app.state.on_stop = []
    app.state.scrapes = {"/metrics": metrics_read, "/health": health_read}
    app.state.dashboard = None
    if http_config is not None and http_config.dashboard:
        from xasflow.daemon.dashboard_routes import install_dashboard

        install_dashboard(
            app,
            view,
            rate_hz=http_config.dashboard_rate_hz,
            max_clients=http_config.max_sse_clients,
            wait_s=SCRAPE_WAIT_S,
        )
    if http_config is not None and http_config.token is not None:
        app.add_middleware(TokenAuth, token=http_config.token.get_secret_value())
    return app


#: How long after a /metrics or /health read began its requests wait for it (Prometheus's
#: default scrape timeout); once past, 503 until it answers (a part blocked for good).
SCRAPE_WAIT_S = 10.0


#: Probe endpoints for an orchestrator (k8s httpGet, systemd, load balancers): answered without
#: the token, and saying only whether the process answers and whether it is ready.
LIVEZ = "/livez"
READYZ = "/readyz"
OPEN_PATHS = frozenset({LIVEZ, READYZ})


class TokenAuth:
    """ASGI middleware: a request passes only with the access token, else 401.

    The token comes as ``?token=...`` (what a browser and ``EventSource`` can send) or as
    ``Authorization: Bearer ...`` (scripts, Prometheus ``authorization`` settings).
    """

    def __init__(self, app: Any, token: str) -> None:
        if not token:
            raise ValueError("an empty access token protects nothing")
        self.app = app
        self._token = token.encode("utf-8")

    def authorised(self, scope: dict[str, Any]) -> bool:
        """Whether the request in ``scope`` carries the token (constant-time compare)."""
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        offered = [v.encode("utf-8") for v in query.get("token", [])]
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                offered.append(value[7:].strip())
        return any(hmac.compare_digest(o, self._token) for o in offered)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)  # probes: one boolean each, no token
            return
        if scope["type"] in ("http", "websocket") and not self.authorised(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            response = PlainTextResponse(
                "401: an access token is required (?token=... or Authorization: Bearer ...)\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="xasflow"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class HttpServer:
    """uvicorn serving an ASGI app from a background thread on a pre-bound socket."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port: int = port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8620``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def serving(self) -> bool:
        """Whether uvicorn has started serving (and not been stopped)."""
        return self._server is not None and bool(self._server.started) and self._thread is not None

    def bind(self) -> None:
        """Bind and listen now (idempotent), so a taken port is refused before anything else
        starts (a socket bound but not listening would not hold the port against another
        SO_REUSEADDR socket); :meth:`start` serves on it, and clients wait until then."""
        if self._socket is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"cannot serve HTTP on {self.host}:{self._requested_port}: {exc.strerror}",
            ) from None
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        self.port = sock.getsockname()[1]

    def start(self, timeout: float = 10.0) -> None:
        """Bind (unless :meth:`bind` did), serve in a thread, return once uvicorn accepts
        connections."""
        import uvicorn

        self.bind()
        sock = self._socket
        assert sock is not None
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # reported to start()
                failure.append(exc)

        self._thread = threading.Thread(target=run, name="xasflow-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if failure or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"HTTP server did not start: {failure[:1]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"HTTP server did not start within {timeout} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Run ``app.state.on_stop``, ask uvicorn to exit, join its thread, close the socket
        (idempotent)."""
        state = getattr(self.app, "state", None)
        for callback in getattr(state, "on_stop", None) or []:
            try:
                callback()
            except Exception:
                logger.exception("HTTP on_stop callback failed")
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("HTTP server thread did not stop within %.1f s", timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def add_route(app: Starlette, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
    """Append a route to ``app`` (for the dashboard and other extensions)."""
    app.router.routes.append(Route(path, endpoint, **kwargs))
