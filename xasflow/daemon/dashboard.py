"""The operators' live dashboard: a read-only web page served by the daemon, fed by SSE.

Its routes (the page, ``/api/state``, ``/events``) are in :mod:`xasflow.daemon.dashboard_routes`.

What it shows: the latest analysed spectrum (raw mu, normalised mu on the model grid, E0,
the model window) with the bundle's energy regions shaded by how much each prediction
task depends on them (manifest ``regions`` and per-task ``region_importance``, shared out
with :func:`xasflow.daemon.recommend.region_shares`); the prediction with its uncertainty
(class probabilities, conformal sets and intervals when the bundle gives them, held-out MAE
of the regressors) and the ranked motifs, and an OUT OF DOMAIN banner over it when the
bundle flags the spectrum as unlike its training data; the current
run's predictions over time (quick-XAS runs); the latest recommendation; and the daemon's
health (rates, the rejections by stage and reason, queue depth, models and their metrics).
The rates keep the stages apart: "rejected/s" beside "spectra/s" is the spectra the analysis
rejected; the documents and runs the assembler refused have a rate of their own.

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
  skips intermediate states instead of queueing them; the browser draws on animation frames;
  once the newest is ``STALE_AFTER_S`` old (a part hangs in the build) it says so (``stale``),
  and the page marks what it shows as not live.

"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from xasflow.adapters.routing import SafeRouter, StreamCallback, stream_factory
from xasflow.daemon.analysis_rows import finite_number
from xasflow.daemon.dashboard_views import (
    RunView,
    clean,
    health_view,
    latest_views,
    nan_number,
    recommendation_view,
)

if TYPE_CHECKING:
    from xasflow.daemon.view import DaemonView

__all__ = ["STALE_AFTER_S", "Dashboard"]

logger = logging.getLogger(__name__)

_RUNS_KEPT = 20
_OPEN_RUNS_KEPT = 200  # runs on show with no stop seen (a stop lost in the inbox) at most
_RUNS_SHOWN = 8
_HEALTH_EVERY_S = 1.0
_KEEPALIVE_S = 15.0
#: A page's stream says its state is stale once the newest message is this old: one is built
#: at least every _HEALTH_EVERY_S while a page watches, unless the build hangs in a part.
STALE_AFTER_S = 5.0
_RATE_WINDOW_S = 5.0
#: The rates sent to the page, in the order of a rate sample's counts (after its time).
_RATE_NAMES = (
    "analysed_per_s",
    "analysis_rejected_per_s",  # spectra the analysis rejected
    "assembly_rejected_per_s",  # documents and runs the assembler refused (no spectra)
    "documents_per_s",
)


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
        self._runs: OrderedDict[str, RunView] = OrderedDict()  # for display: see _trim_runs
        self._open_runs: OrderedDict[str, None] = OrderedDict()  # raw uids of those not stopped
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
        self._current: RunView | None = None  # run of the latest primary event
        self._last_rejection: dict[str, Any] | None = None
        self._latest_seen: Any = None
        self._latest_viewed: Any = None  # the latest whose views _spectrum/_prediction are
        self._spectrum: dict[str, Any] | None = None
        self._prediction: dict[str, Any] | None = None
        self._regions_cache: dict[str, dict[str, Any]] = {}
        self._health: dict[str, Any] | None = None
        self._next_health = 0.0
        self._rate_samples: deque[tuple[float, int, int, int, int]] = deque()
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
                self._latest_seen = latest  # its views are made when a message is built
                changed = True
            now = self.clock()
            if now >= self._next_health:
                changed = True  # rates and gauges move even without new documents
            self._dirty = self._dirty or changed
            if build is None:
                build = self.clients > 0 and self._dirty
            if not build:
                return False
            if latest is not None and latest is not self._latest_viewed:
                # only for a message: with no page connected a fly scan's latest changes
                # every batch, and its views (rounded series) cost ~1 % of a core at 1,000/s
                self._latest_viewed = latest
                self._spectrum, self._prediction = latest_views(latest, self._regions_cache)
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
        """A new analysis run on show, open until its stop (see :meth:`_trim_runs`)."""
        raw_uid = str(start.get("raw_uid") or start.get("uid"))
        sample = start.get("raw_sample_name")
        run = RunView(
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
        self._open_runs[raw_uid] = None
        self._open_runs.move_to_end(raw_uid)
        self._trim_runs()

        def stopped(name: str, doc: dict[str, Any]) -> None:
            if name == "stop" and self._runs.get(raw_uid) is run:
                self._open_runs.pop(raw_uid, None)

        return [stopped]

    def _trim_runs(self) -> None:
        """Past ``_RUNS_KEPT`` runs on show, the oldest closed ones leave: a run still open
        (scanning) stays however many start after it, up to ``_OPEN_RUNS_KEPT`` of them
        (beyond, the oldest open ones leave, logged: their stop was lost)."""
        while len(self._open_runs) > _OPEN_RUNS_KEPT:
            raw_uid, _ = self._open_runs.popitem(last=False)
            self._runs.pop(raw_uid, None)
            logger.warning("dashboard: run %s, with no stop seen, leaves the table", raw_uid)
        excess = len(self._runs) - _RUNS_KEPT
        if excess > 0:
            closed = [uid for uid in self._runs if uid not in self._open_runs][:excess]
            for raw_uid in closed:
                del self._runs[raw_uid]

    def _shown_runs(self) -> list[RunView]:
        """The runs for the table, newest first: the last ``_RUNS_SHOWN`` started, where a
        run still open but older takes the place of the oldest closed one (a run scanning
        never leaves the table while shorter ones come and go)."""
        newest = list(self._runs.items())[::-1]
        shown = newest[:_RUNS_SHOWN]
        for item in (i for i in newest[_RUNS_SHOWN:] if i[0] in self._open_runs):
            closed = [k for k, (uid, _) in enumerate(shown) if uid not in self._open_runs]
            if not closed:
                break
            del shown[closed[-1]]
            shown.append(item)
        return [run for _, run in shown]

    def _run_of(self, start: dict[str, Any]) -> RunView | None:
        return self._runs.get(str(start.get("raw_uid") or start.get("uid")))

    def _sample_rates(self) -> None:
        d = self.view
        if d is None:
            return
        c = d.counters
        delivered = d.input_stats().get("delivered", 0)
        stages = c.rejected_per_stage()
        now = self.clock()
        sample = (now, c.spectra_analysed, stages["analysis"], stages["assembly"], delivered)
        self._rate_samples.append(sample)
        while len(self._rate_samples) > 2 and now - self._rate_samples[0][0] > _RATE_WINDOW_S:
            self._rate_samples.popleft()

    def _rates(self) -> dict[str, float | None]:
        """Per-second rates over the last few seconds; the rejections by stage, apart: the
        analysis's are spectra, the assembly's documents and runs refused before it."""
        s = self._rate_samples
        if len(s) < 2 or s[-1][0] <= s[0][0]:
            return dict.fromkeys(_RATE_NAMES)
        dt = s[-1][0] - s[0][0]
        return {name: (s[-1][i] - s[0][i]) / dt for i, name in enumerate(_RATE_NAMES, start=1)}

    # ------------------------------------------------------------------ views

    def _health_view(self) -> dict[str, Any] | None:
        if self.view is None:
            return None
        try:
            return health_view(self.view.health())
        except Exception:
            logger.exception("dashboard: health() failed")
            return None

    def _state(self, version: int) -> dict[str, Any]:
        run = self._current
        runs = self._shown_runs()
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
                "recommendation": recommendation_view(run.recommendation),
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
        return clean(state)

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

    def age(self) -> float | None:
        """Seconds since the newest message was built (None: none was)."""
        built = self._built_at
        return None if built == -math.inf else max(0.0, self.clock() - built)

    async def stream(
        self, first: Callable[[], Awaitable[tuple[int, str] | None]]
    ) -> AsyncIterator[bytes]:
        """SSE: the current state at once (``first``: the shared build of :meth:`message`,
        None once it has waited too long), then the newest state at most once per interval;
        a ``stale`` event once the newest is ``STALE_AFTER_S`` old (its build hangs), with
        the last state when this stream has sent none, so the page never shows it as live."""
        self.clients += 1
        try:
            yield b"retry: 2000\n\n"
            got = await first()
            stale = got is None
            if got is None:  # the build in flight has not answered: the last one, marked
                last, text = self.peek()
                yield _stale(last, self.age(), text)
            else:
                last, body = got
                yield _sse(last, body)
            quiet = 0.0
            while not self.closed:
                await asyncio.sleep(self.interval)
                version, text = self.peek()
                age = self.age()
                if version != last and text is not None:
                    last, quiet, stale = version, 0.0, False
                    yield _sse(version, text)
                elif not stale and age is not None and age > STALE_AFTER_S:
                    stale, quiet = True, 0.0  # built every second while a page watches
                    yield _stale(last, age, None)
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

    def event(self, doc: Any) -> Any:
        run = self.dash._run_of(self.start_doc)
        if run is None:
            return  # no longer on show
        data = doc.get("data") or {}
        run.add(data, nan_number(doc.get("time")))
        self.dash._current = run
        if data.get("status") != "ok":
            self.dash._last_rejection = {
                "raw_uid": run.raw_uid,
                "index": data.get("index"),
                "reason": data.get("reason"),
                "detail": data.get("detail"),
                "time": finite_number(doc.get("time")),
            }

    def stop(self, doc: Any) -> Any:
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

    def event(self, doc: Any) -> Any:
        run = self.dash._run_of(self.start_doc)
        if run is not None:
            run.recommendation = doc.get("data") or {}


def _sse(version: int, body: str) -> bytes:
    return f"id: {version}\nevent: state\ndata: {body}\n\n".encode()


def _stale(version: int, age: float | None, body: str | None) -> bytes:
    """The ``stale`` event: the newest state (``version``, or ``body`` itself) is ``age`` s
    old and no newer one comes (a part of the daemon does not answer)."""
    age_s = "null" if age is None else f"{age:.1f}"
    return f'event: stale\ndata: {{"version":{version},"age_s":{age_s},"state":{body or "null"}}}\n\n'.encode()
