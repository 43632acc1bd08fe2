"""The operators' live dashboard: a read-only web page served by the daemon, fed by SSE.

Routes (added to the daemon's Starlette app by :func:`install_dashboard`)::

    GET /              the page (``static/index.html``; every asset local, no CDN)
    GET /static/...    its script and style sheet
    GET /api/state     the current state as one JSON object
    GET /events        server-sent events: ``event: state`` with that JSON, pushed on change
    GET /api/dashboard the dashboard's own counters (documents, dropped, messages, clients)

What it shows: the latest analysed spectrum (raw mu, normalised mu on the model grid, E0,
the model window) with the bundle's energy regions shaded by how much each prediction
task depends on them (manifest ``regions`` and per-task ``region_importance``, shared out
with :func:`xasflow.daemon.recommend.region_shares`); the prediction with its uncertainty
(class probabilities, conformal sets and intervals when the bundle gives them, held-out MAE
of the regressors) and the ranked motifs, and an OUT OF DOMAIN banner over it when the
bundle flags the spectrum as unlike its training data; the current
run's predictions over time (quick-XAS runs); the latest recommendation; and the daemon's
health (rates, rejects by reason, queue depth, models and their metrics).

Throttling, so a 500 spectra/s stream freezes neither the daemon nor the browser:

* the processing thread only calls :meth:`Dashboard.listener`, which appends the document
  to a bounded deque (O(1), no lock, never blocks; the oldest are dropped and counted when
  the dashboard falls behind), and :meth:`Dashboard.offer_latest`, which publishes the
  pipeline's latest spectrum to it by reference (one assignment);
* documents are digested by an event-model ``RunRouter`` (one callback per run's
  ``primary`` and ``recommendations`` stream), so no uid tables are kept here;
* a thread of its own (``xasflow-dashboard``) wakes ``rate_hz`` times a second, digests
  what came in (per-run counts and a bounded, decimated history) and, while a page is
  connected, renders one JSON message with the latest state and the aggregated history;
* each SSE connection sends at most the newest message once per interval: a slow client
  skips intermediate states instead of queueing them; the browser draws on animation frames.

The page is read-only; access control (loopback by default, ``http.token`` otherwise) is
the app's :class:`xasflow.daemon.http.TokenAuth`.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from xasflow.adapters.routing import SafeRouter, StreamCallback, stream_factory
from xasflow.daemon.documents import finite_number

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from xasflow.daemon.view import DaemonView

__all__ = ["STATIC_DIR", "Dashboard", "install_dashboard"]

logger = logging.getLogger(__name__)

#: The page's files (HTML, JS, CSS), served under ``/static``.
STATIC_DIR = Path(__file__).with_name("static")

_HISTORY_POINTS = 20_000  # per run, before decimation by 2
_HISTORY_BINS = 400  # points per history series sent to the page
_RAW_POINTS = 800  # raw spectrum points sent to the page
_RUNS_KEPT = 20
_RUNS_SHOWN = 8
_MOTIFS_SHOWN = 8
_HEALTH_EVERY_S = 1.0
_KEEPALIVE_S = 15.0
_RATE_WINDOW_S = 5.0
#: History columns kept per analysed or rejected spectrum of a run.
_COLUMNS = (
    "index",
    "time",
    "ok",
    "cn",
    "cn_probability",
    "valence",
    "valence_probability",
    "distance",
    "charge",
    "e0",
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Numbers(list):  # type: ignore[type-arg]
    """A list already JSON-safe (from :func:`_series`): :func:`_clean` passes it through."""


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, _Numbers):
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_number(value)
    return str(value)


def _series(values: np.ndarray, digits: int = 5) -> list[float | None]:
    """A float array as a JSON list, rounded, non-finite as None."""
    a = np.round(np.asarray(values, dtype=np.float64), digits)
    if np.isfinite(a).all():
        return _Numbers(a.tolist())
    return _Numbers(v if math.isfinite(v) else None for v in a.tolist())


def _json_loads(text: Any) -> Any:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class _Run:
    """What the dashboard keeps of one analysis run."""

    raw_uid: str
    kind: str = "unknown"
    element: str | None = None
    edge: str | None = None
    bundle_id: str | None = None
    scan_id: int | None = None
    plan_name: str | None = None
    sample: str | None = None
    started: float | None = None
    n_ok: int = 0
    n_rejected: int = 0
    n_out_of_domain: int = 0
    missing: int | None = None  # raw events the run lost (its stop's raw_missing_events)
    exit_status: str | None = None
    reason: str = ""
    ended: float | None = None
    last: dict[str, Any] | None = None  # last primary event data
    recommendation: dict[str, Any] | None = None  # last recommendations event data
    data: np.ndarray = field(  # history rows (see _COLUMNS), the first ``n`` in use
        default_factory=lambda: np.empty((256, len(_COLUMNS)), dtype=np.float64)
    )
    n: int = 0
    stride: int = 1  # keep every stride-th spectrum (the history is decimated when full)
    seen: int = 0  # primary events seen
    keys: list[str] = field(default_factory=list)  # its analysis start and descriptor uids

    def add(self, data: dict[str, Any], t: float) -> None:
        """Count one primary event and keep it in the (decimated) history."""
        ok = data.get("status") == "ok"
        if ok:
            self.n_ok += 1
            self.n_out_of_domain += bool(data.get("out_of_domain"))
        else:
            self.n_rejected += 1
        self.last = data
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        index = data.get("index")
        row = (
            float(index) if isinstance(index, int) else math.nan,
            t,
            1.0 if ok else 0.0,
            _nan(data.get("cn")),
            _nan(data.get("cn_probability")),
            _nan(data.get("valence")),
            _nan(data.get("valence_probability")),
            _nan(data.get("distance")),
            _nan(data.get("charge")),
            _nan(data.get("e0")),
        )
        if self.n == self.data.shape[0]:  # grow geometrically up to the cap
            grown = np.empty((min(2 * self.n, _HISTORY_POINTS), len(_COLUMNS)))
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n] = row
        self.n += 1
        if self.n >= _HISTORY_POINTS:  # halve the resolution, keep the whole run
            half = self.data[: self.n : 2].copy()
            self.data[: half.shape[0]] = half
            self.n = half.shape[0]
            self.stride *= 2

    def column(self, name: str) -> np.ndarray:
        """One history column (a view)."""
        return self.data[: self.n, _COLUMNS.index(name)]

    def summary(self) -> dict[str, Any]:
        """The run's identity and counts."""
        return {
            "raw_uid": self.raw_uid,
            "kind": self.kind,
            "sample": self.sample,
            "element": self.element,
            "edge": self.edge,
            "bundle_id": self.bundle_id,
            "scan_id": self.scan_id,
            "plan_name": self.plan_name,
            "started": self.started,
            "ended": self.ended,
            "n_ok": self.n_ok,
            "n_rejected": self.n_rejected,
            "n_out_of_domain": self.n_out_of_domain,
            "missing": self.missing,
            "exit_status": self.exit_status,
            "reason": self.reason,
        }

    def history(self, bins: int = _HISTORY_BINS) -> dict[str, Any]:
        """The run's predictions over time, averaged into at most ``bins`` points."""
        cols = {name: self.column(name) for name in _COLUMNS}
        n = self.n
        out: dict[str, Any] = {"n": n, "stride": self.stride, "binned": n > bins}
        if n > bins:
            edges = np.linspace(0, n, bins + 1).astype(int)
            starts = edges[:-1][np.diff(edges) > 0]
            counts = np.diff(np.append(starts, n))
            for name, a in cols.items():
                finite = np.isfinite(a)
                sums = np.add.reduceat(np.where(finite, a, 0.0), starts)
                k = np.add.reduceat(finite.astype(np.float64), starts)
                with np.errstate(invalid="ignore", divide="ignore"):
                    cols[name] = np.where(k > 0, sums / np.maximum(k, 1), np.nan)
            out["counts"] = counts.tolist()
        for name, a in cols.items():
            out[name] = _series(a, 4)
        return out


def _nan(value: Any) -> float:
    v = finite_number(value)
    return math.nan if v is None else v


class Dashboard:
    """Digests analysis documents into the state the page shows; renders throttled messages.

    ``listener`` is what the daemon's processing thread calls (O(1), never blocks).
    Everything else runs on the dashboard's own thread or the HTTP thread, under a lock.
    """

    def __init__(
        self,
        view: DaemonView | None = None,
        *,
        rate_hz: float = 5.0,
        inbox: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate_hz``: most messages per second (per client, and built); ``inbox``: documents
        held between two digests before the oldest are dropped."""
        if rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        self.view = view
        self.interval = 1.0 / float(rate_hz)
        self.clock = clock
        self._inbox: deque[tuple[str, dict[str, Any]]] = deque(maxlen=inbox)
        self._offered = 0  # written only by the processing thread
        self._taken = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: OrderedDict[str, _Run] = OrderedDict()  # the last _RUNS_KEPT, for display
        self._router = SafeRouter(
            [
                stream_factory(
                    {
                        "primary": lambda start, desc: _PrimaryView(self, start, desc),
                        "recommendations": lambda start, desc: _AdviceView(self, start, desc),
                    },
                    on_run=self._run_started,
                )
            ],
            "dashboard",
        )
        self._offered_latest: Any = None  # the pipeline's latest spectrum, published to us
        self._current: _Run | None = None  # run of the latest primary event
        self._last_rejection: dict[str, Any] | None = None
        self._latest_seen: Any = None
        self._spectrum: dict[str, Any] | None = None
        self._prediction: dict[str, Any] | None = None
        self._regions_cache: dict[str, dict[str, Any]] = {}
        self._health: dict[str, Any] | None = None
        self._next_health = 0.0
        self._rate_samples: deque[tuple[float, int, int, int]] = deque()
        self._dirty = True
        self._out: tuple[int, str | None] = (0, None)  # (version, message), swapped whole
        self._built_at = -math.inf
        self.messages_built = 0
        self.clients = 0  # open event streams (changed only on the HTTP event loop)

    # ------------------------------------------------------------------ hand-off (any thread)

    def listener(self, name: str, doc: dict[str, Any]) -> None:
        """Take one analysis document (called by the processing thread: O(1), lock-free)."""
        self._offered += 1
        self._inbox.append((name, doc))

    def offer_latest(self, latest: Any) -> None:
        """Publish the latest analysed spectrum (a ``LatestSpectrum``) to the dashboard (O(1))."""
        self._offered_latest = latest

    @property
    def closed(self) -> bool:
        """True once :meth:`stop` was called (SSE streams then end)."""
        return self._closed.is_set()

    def start(self) -> None:
        """Start the digesting thread (idempotent)."""
        if self._thread is None and not self.closed:
            self._thread = threading.Thread(target=self._run, name="xasflow-dashboard", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and end every SSE stream (idempotent)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the dashboard must never take the daemon down
                logger.exception("dashboard update failed")

    # ------------------------------------------------------------------ digest (own thread)

    def tick(self, build: bool | None = None) -> bool:
        """Digest new documents; build a new message if anything changed and a page is
        connected (``build`` forces either way). Returns whether a message was built."""
        with self._lock:
            changed = self._digest() > 0
            self._sample_rates()
            latest = self._offered_latest
            if latest is not None and latest is not self._latest_seen:
                self._latest_seen = latest
                self._spectrum, self._prediction = self._latest_views(latest)
                changed = True
            now = self.clock()
            if now >= self._next_health:
                changed = True  # rates and gauges move even without new documents
            self._dirty = self._dirty or changed
            if build is None:
                build = self.clients > 0 and self._dirty
            if not build:
                return False
            self._health = self._health_view()  # with every message: counters match the view
            self._next_health = now + _HEALTH_EVERY_S
            version = self._out[0] + 1
            text = json.dumps(self._state(version), separators=(",", ":"), allow_nan=False)
            self._out = (version, text)
            self._built_at = now
            self.messages_built += 1
            self._dirty = False
            return True

    def _digest(self) -> int:
        n = 0
        inbox = self._inbox
        while True:
            try:
                name, doc = inbox.popleft()
            except IndexError:
                break
            n += 1
            try:
                self._take(name, doc)
            except Exception:
                logger.exception("dashboard: cannot digest a %s document", name)
        self._taken += n
        return n

    def _take(self, name: str, doc: dict[str, Any]) -> None:
        self._router(name, doc)

    def _run_started(self, start: dict[str, Any]) -> list[Any]:
        """A new analysis run on show (the oldest beyond ``_RUNS_KEPT`` leave the table)."""
        raw_uid = str(start.get("raw_uid") or start.get("uid"))
        sample = start.get("raw_sample_name")
        run = _Run(
            raw_uid,
            kind=str(start.get("scan_kind") or "unknown"),
            element=start.get("element"),
            edge=start.get("edge"),
            bundle_id=start.get("bundle_id"),
            scan_id=start.get("raw_scan_id"),
            plan_name=start.get("raw_plan_name"),
            sample=str(sample) if sample else None,
            started=finite_number(start.get("time")),
        )
        self._runs[raw_uid] = run
        self._runs.move_to_end(raw_uid)
        while len(self._runs) > _RUNS_KEPT:
            self._runs.popitem(last=False)
        return []

    def _run_of(self, start: dict[str, Any]) -> _Run | None:
        return self._runs.get(str(start.get("raw_uid") or start.get("uid")))

    def _sample_rates(self) -> None:
        d = self.view
        if d is None:
            return
        c = d.counters
        delivered = d.input_stats().get("delivered", 0)
        now = self.clock()
        self._rate_samples.append((now, c.spectra_analysed, c.rejected_total, delivered))
        while len(self._rate_samples) > 2 and now - self._rate_samples[0][0] > _RATE_WINDOW_S:
            self._rate_samples.popleft()

    def _rates(self) -> dict[str, float | None]:
        s = self._rate_samples
        if len(s) < 2 or s[-1][0] <= s[0][0]:
            return {"analysed_per_s": None, "rejected_per_s": None, "documents_per_s": None}
        dt = s[-1][0] - s[0][0]
        return {
            "analysed_per_s": (s[-1][1] - s[0][1]) / dt,
            "rejected_per_s": (s[-1][2] - s[0][2]) / dt,
            "documents_per_s": (s[-1][3] - s[0][3]) / dt,
        }

    # ------------------------------------------------------------------ views

    def _regions(self, manifest: Any) -> dict[str, Any]:
        """Regions (relative to E0, clipped to the model window) and per-task shares."""
        cached = self._regions_cache.get(manifest.bundle_id)
        if cached is not None:
            return cached
        from xasflow.daemon.recommend import region_shares

        prep = manifest.prep
        names = list(manifest.regions)
        shares = {
            task: region_shares(spec.region_importance, names)
            for task, spec in manifest.tasks.items()
            if spec.region_importance
        }
        regions = []
        for name in names:
            lo, hi = manifest.regions[name]
            lo, hi = max(float(lo), prep.window_start), min(float(hi), prep.window_stop)
            if hi <= lo:
                continue
            per_task = {task: float(s.get(name, 0.0)) for task, s in shares.items()}
            regions.append(
                {
                    "name": name,
                    "start": lo,
                    "stop": hi,
                    "importance": per_task,
                    "max": max(per_task.values(), default=0.0),
                }
            )
        out = {"regions": regions, "tasks": sorted(shares)}
        self._regions_cache = {manifest.bundle_id: out}  # one bundle in view at a time
        return out

    def _latest_views(self, latest: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The plotted spectrum and the full prediction of the pipeline's latest spectrum."""
        prep, pred, manifest = latest.prepared, latest.prediction, latest.manifest
        spec = prep.spectrum
        e, mu = np.asarray(spec.energy), np.asarray(spec.mu)
        step = max(1, math.ceil(e.size / _RAW_POINTS))
        grid = manifest.prep.grid
        regions = self._regions(manifest)
        spectrum = {
            "raw_uid": latest.raw_uid,
            "index": latest.index,
            "bundle_id": manifest.bundle_id,
            "element": manifest.element,
            "edge": manifest.edge,
            "e0": prep.e0,
            "edge_step": prep.edge_step,
            "energy_shift": latest.energy_shift,
            "extrapolated": prep.extrapolated,
            "window": [manifest.prep.window_start, manifest.prep.window_stop],
            "energy": _series(e[::step], 3),
            "mu": _series(mu[::step], 5),
            "grid": _series(grid, 3),  # relative to E0
            "y": _series(prep.y, 5),
            **regions,
        }
        res = pred.results
        tasks: dict[str, Any] = {}
        for name, r in res.items():
            entry: dict[str, Any] = {"value": r.value, "kind": manifest.tasks[name].kind}
            spec_t = manifest.tasks.get(name)
            if r.probabilities is not None:
                entry["probabilities"] = r.probabilities
                entry["confidence"] = r.confidence
            if r.ranking is not None:
                entry["ranking"] = [[lab, s] for lab, s in r.ranking[:_MOTIFS_SHOWN]]
                entry["n_ranked"] = len(r.ranking)
            if r.prediction_set is not None:
                entry["prediction_set"] = list(r.prediction_set)
            if r.interval is not None:
                entry["interval"] = [r.interval[0], r.interval[1]]
            if spec_t is not None:
                entry["metrics"] = dict(spec_t.metrics)
                entry["unit"] = spec_t.unit
                mae = spec_t.metrics.get("mae")
                if mae is not None:
                    entry["uncertainty"] = mae  # held-out mean absolute error
            tasks[name] = entry
        motifs = res.get("motifs") or res.get("environment")
        env = res.get("environment")
        prediction = {
            "raw_uid": latest.raw_uid,
            "index": latest.index,
            "bundle_id": pred.bundle_id,
            "element": pred.element,
            "edge": pred.edge,
            "e0": pred.e0,
            "flags": list(pred.flags),
            "out_of_domain": pred.out_of_domain,
            "ood_score": pred.ood_score,
            "tasks": tasks,
            "environment": None if env is None else str(env.value),
            "motifs": (
                [[lab, s] for lab, s in motifs.ranking[:_MOTIFS_SHOWN]]
                if motifs is not None and motifs.ranking
                else []
            ),
        }
        return spectrum, prediction

    def _health_view(self) -> dict[str, Any] | None:
        d = self.view
        if d is None:
            return None
        try:
            h = d.health()
        except Exception:
            logger.exception("dashboard: health() failed")
            return None
        c = h.get("counters", {})
        inp, out, store = h.get("input", {}), h.get("output", {}), h.get("store", {})
        return {
            "ready": h.get("ready"),
            "version": h.get("version"),
            "uptime_s": h.get("uptime_s"),
            "queue_depth": h.get("queue_depth"),
            "open_runs": h.get("open_runs"),
            "received": c.get("spectra_received"),
            "analysed": c.get("spectra_analysed"),
            "rejected_total": c.get("spectra_rejected"),
            "out_of_domain": c.get("out_of_domain"),
            "events_lost": c.get("events_lost", {}),
            "events_lost_total": c.get("events_lost_total"),
            "rejected": c.get("rejected", {}),
            "rejected_by_stage": c.get("rejected_by_stage", {}),
            "decode_errors": c.get("decode_errors", {}),
            "runs_opened": c.get("runs_opened"),
            "runs_closed": c.get("runs_closed", {}),
            "model_swaps": c.get("model_swaps"),
            "latency": c.get("latency", {}),
            "input": {
                k: inp.get(k)
                for k in (
                    "address",
                    "received",
                    "dropped_overflow",
                    "backpressure_waits",
                    "own_output_dropped",
                )
            },
            "output": {k: out.get(k) for k in ("address", "sent")},
            "store": {k: store.get(k) for k in ("directory", "stored", "queued", "dropped")},
            "models": [
                {
                    k: m.get(k)
                    for k in ("bundle_id", "element", "edge", "created", "loaded_at", "metrics")
                }
                for m in h.get("models", [])
            ],
            "models_refused": h.get("models_refused", {}),
            "internal_errors": h.get("internal_errors"),
        }

    def _state(self, version: int) -> dict[str, Any]:
        run = self._current
        runs = list(self._runs.values())[-_RUNS_SHOWN:][::-1]
        last = run.last if run is not None else None
        state = {
            "version": version,
            "time": time.time(),
            "rate_hz": 1.0 / self.interval,
            "run": None
            if run is None
            else {
                **run.summary(),
                "last": last,
                "recommendation": _recommendation(run.recommendation),
                "history": run.history(),
            },
            "runs": [r.summary() for r in runs],
            "prediction": self._prediction,
            "spectrum": self._spectrum,
            "last_rejection": self._last_rejection,
            "health": self._health,
            "rates": self._rates(),
            "dashboard": self.stats(),
        }
        return _clean(state)

    def stats(self) -> dict[str, int]:
        """Documents offered, digested, dropped (inbox overflow) and messages built."""
        offered, held = self._offered, len(self._inbox)
        return {
            "documents": offered,
            "digested": self._taken,
            "dropped": max(0, offered - self._taken - held),
            "messages": self.messages_built,
            "clients": self.clients,
        }

    # ------------------------------------------------------------------ serving

    def message(self) -> tuple[int, str]:
        """The newest message, built now if there is none or it is stale and the last build
        is at least an interval old (requests never make builds more frequent than that)."""
        version, text = self._out
        if text is None or (self._dirty and self.clock() - self._built_at >= self.interval):
            self.tick(build=True)
            version, text = self._out
        assert text is not None
        return version, text

    def peek(self) -> tuple[int, str | None]:
        """The newest built message and its version, without building one."""
        return self._out

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE: the current state at once, then the newest state at most once per interval."""
        self.clients += 1
        try:
            yield b"retry: 2000\n\n"
            version, body = await asyncio.to_thread(self.message)
            last, quiet = version, 0.0
            yield _sse(version, body)
            while not self.closed:
                await asyncio.sleep(self.interval)
                version, text = self.peek()
                if version != last and text is not None:
                    last, quiet = version, 0.0
                    yield _sse(version, text)
                else:
                    quiet += self.interval
                    if quiet >= _KEEPALIVE_S:
                        quiet = 0.0
                        yield b": keep-alive\n\n"
        finally:
            self.clients -= 1


class _PrimaryView(StreamCallback):
    """A run's ``primary`` stream: counts, history, last answer, last rejection, its stop."""

    def __init__(self, dash: Dashboard, start: dict[str, Any], descriptor: dict[str, Any]) -> None:
        super().__init__(start, descriptor)
        self.dash = dash

    def event(self, doc: Any) -> None:
        run = self.dash._run_of(self.start_doc)
        if run is None:
            return  # no longer on show
        data = doc.get("data") or {}
        run.add(data, _nan(doc.get("time")))
        self.dash._current = run
        if data.get("status") != "ok":
            self.dash._last_rejection = {
                "raw_uid": run.raw_uid,
                "index": data.get("index"),
                "reason": data.get("reason"),
                "detail": data.get("detail"),
                "time": finite_number(doc.get("time")),
            }

    def stop(self, doc: Any) -> None:
        run = self.dash._run_of(self.start_doc)
        if run is not None:
            run.exit_status = doc.get("exit_status")
            run.reason = str(doc.get("reason") or "")
            run.ended = finite_number(doc.get("time"))
            missing = doc.get("raw_missing_events")
            run.missing = int(missing) if isinstance(missing, int) else None


class _AdviceView(StreamCallback):
    """A run's ``recommendations`` stream: the latest advice."""

    def __init__(self, dash: Dashboard, start: dict[str, Any], descriptor: dict[str, Any]) -> None:
        super().__init__(start, descriptor)
        self.dash = dash

    def event(self, doc: Any) -> None:
        run = self.dash._run_of(self.start_doc)
        if run is not None:
            run.recommendation = doc.get("data") or {}


def _sse(version: int, body: str) -> bytes:
    return f"id: {version}\nevent: state\ndata: {body}\n\n".encode()


def _recommendation(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recommendations event's data with its JSON fields decoded."""
    if not data:
        return None
    out = {k: data.get(k) for k in ("index", "n_points", "scan_time", "stop_early", "stop_reason")}
    out["uncertainty"] = data.get("uncertainty")
    out["regions"] = _json_loads(data.get("regions")) or []
    out["rescan"] = _json_loads(data.get("rescan"))
    return out


def _index_html(token: str | None) -> str:
    """The page, its asset URLs carrying ``?token=`` when the request came with one."""
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    query = "?token=" + urllib.parse.quote(token, safe="") if token else ""
    return text.replace("{{query}}", html.escape(query, quote=True))


def install_dashboard(app: Starlette, view: DaemonView, rate_hz: float = 5.0) -> Dashboard:
    """Add the dashboard's routes to ``app`` and start the dashboard (``app.state.dashboard``).

    The caller feeds it (:meth:`Dashboard.listener`, :meth:`Dashboard.offer_latest`); it is
    stopped by ``app.state.on_stop`` (see :class:`~xasflow.daemon.http.HttpServer`).
    """
    dash = Dashboard(view, rate_hz=rate_hz)

    async def index(request: Request) -> Response:
        try:
            page = _index_html(request.query_params.get("token"))
        except OSError:  # an install without the package data
            return PlainTextResponse(
                f"dashboard assets missing from {STATIC_DIR}; reinstall xasflow", status_code=503
            )
        return HTMLResponse(page, headers=_SECURITY_HEADERS)

    async def state(request: Request) -> Response:
        _version, body = await asyncio.to_thread(dash.message)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(dash.stream(), media_type="text/event-stream", headers=headers)

    async def stats(request: Request) -> Response:
        return JSONResponse(dash.stats())

    app.router.routes.extend(
        [
            Route("/", index, methods=["GET"]),
            Route("/api/state", state, methods=["GET"]),
            Route("/api/dashboard", stats, methods=["GET"]),
            Route("/events", events, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        ]
    )
    app.state.dashboard = dash
    on_stop = getattr(app.state, "on_stop", None)
    if on_stop is None:
        on_stop = app.state.on_stop = []
    on_stop.append(dash.stop)
    dash.start()
    return dash
