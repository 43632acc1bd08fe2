"""The dashboard: page and local assets, SSE updates after real scans, throttling, access token.

A real Daemon on a loopback 0MQ forwarder with the tiny synthetic Cu K bundle of
``test_service`` (trained here, seconds); scans are composed with event-model and
published as bluesky would. The SSE stream is read from a raw socket (HTTP/1.0, so the
body is the plain event stream), with deadlines instead of sleeps.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("starlette")

from helpers import (
    STEP_GRID,
    Harness,
    LoopbackProxy,
    burst_docs,
    daemon_config,
    fly_scan,
    publish,
    step_scan,
    transmission,
)

from xasflow.daemon.config import ConfigError, DaemonConfig
from xasflow.daemon.dashboard import Dashboard
from xasflow.daemon.dashboard_routes import STATIC_DIR
from xasflow.daemon.service import Daemon

DEADLINE_S = 20.0
RATE_HZ = 5.0


# --------------------------------------------------------------------------- helpers


class SSEClient:
    """A minimal server-sent-events reader on a raw socket (HTTP/1.0: no chunked framing)."""

    def __init__(self, base_url: str, path: str = "/events", headers: dict[str, str] | None = None):
        u = urllib.parse.urlsplit(base_url)
        host = "127.0.0.1" if u.hostname in ("0.0.0.0", "::") else u.hostname
        self.sock = socket.create_connection((host, u.port), timeout=DEADLINE_S)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode()
        )
        self.buffer = b""
        head = self._read_until(b"\r\n\r\n", time.monotonic() + DEADLINE_S)
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode("latin-1").lower()

    def _read_until(self, sep: bytes, deadline: float) -> bytes:
        while sep not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {sep!r} within the deadline")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("stream closed")
            self.buffer += chunk
        block, self.buffer = self.buffer.split(sep, 1)
        return block

    def next_state(self, deadline: float) -> dict[str, Any]:
        """The next ``state`` event's JSON (comments and retry hints skipped)."""
        while True:
            block = self._read_until(b"\n\n", deadline).decode()
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line and not line.startswith(":") and ":" in line:
                    key, value = line.split(":", 1)
                    fields[key] = value.removeprefix(" ")
            if fields.get("event") == "state":
                return json.loads(fields["data"])

    def wait_for(self, predicate: Any, timeout: float = DEADLINE_S) -> tuple[dict[str, Any], int]:
        """The first state satisfying ``predicate``, and how many states were read for it."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            state = self.next_state(deadline)
            n += 1
            if predicate(state):
                return state, n

    def close(self) -> None:
        self.sock.close()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def dash(
    models_dir: Path,
    shared_proxy: LoopbackProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    """A started daemon (dashboard on, default loopback host, no token), warmed up."""
    cfg = daemon_config(models_dir, shared_proxy, tmp_path_factory.mktemp("store"))
    cfg = cfg.with_updates({"http": {"dashboard_rate_hz": RATE_HZ}})
    h = Harness(cfg, shared_proxy)
    yield h
    h.close()


# --------------------------------------------------------------------------- tests


#: What a script imports from the page's other modules: ``import ... from "./x.js"``.
_IMPORT = re.compile(r'^import\b[^;]*?\bfrom "\./([^"]+)";', re.MULTILINE)


def module_graph(base: str, query: str = "") -> dict[str, tuple[str, str]]:
    """The page's scripts, from its entry module along their imports: name -> (content type,
    text); each must answer 200 and ask for the next with ``query`` (the access token)."""
    found: dict[str, tuple[str, str]] = {}
    todo = ["app.js"]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        status, headers, body = http_get(f"{base}/static/{name}{query}")
        assert status == 200, name
        text = body.decode()
        found[name] = (headers["content-type"], text)
        for spec in _IMPORT.findall(text):
            assert spec.endswith(".js" + query), (name, spec)  # the token travels on
            todo.append(spec.removesuffix(query))
    return found


def test_page_and_assets_are_served_locally(dash: Harness) -> None:
    base = dash.daemon.http_url
    assert base is not None and base.startswith("http://127.0.0.1:")
    status, headers, page = http_get(base + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    html = page.decode()
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', html)
    assert sorted(assets) == ["static/app.js", "static/style.css"]
    assert '<script type="module" src="static/app.js">' in html  # ES modules, no bundler
    status, headers, css = http_get(f"{base}/static/style.css")
    assert status == 200 and headers["content-type"].startswith("text/css")
    scripts = module_graph(base)
    # browsers load a module only when it comes as JavaScript
    assert {n: t for n, (t, _) in scripts.items()} == dict.fromkeys(
        scripts, "text/javascript; charset=utf-8"
    )
    bodies = {"/": html, "static/style.css": css.decode()}
    bodies.update({f"static/{n}": text for n, (_, text) in scripts.items()})
    # every file of the page is in the package, reached from the page, and nothing refers
    # to another host
    on_disk = sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())
    assert on_disk == sorted(["index.html", "style.css", *scripts])
    for name, text in bodies.items():
        assert not re.search(r"https?://", text), f"{name} refers to a URL"
        assert "//cdn" not in text and "@import" not in text, name
        assert "{{" not in text, name  # every placeholder filled in
    assert sum('new EventSource("events"' in t for t in bodies.values()) == 1
    for path in (
        "/static/../config.py",
        "/static/..%2Fconfig.py",
        "/static/%2e%2e/config.py",
        "/static/..%2F..%2Fpaths.py",
        "/static/nothing.js",
        "/static/..%2Fdashboard_routes.py",  # the folder above
        "/static/.hidden.js",
    ):
        assert http_get(base + path)[0] == 404, path


#: A name a module exports: ``export function f``, ``export const C``.
_EXPORT = re.compile(
    r"^export (?:async )?(?:function|const|let|class) ([A-Za-z_$][\w$]*)", re.MULTILINE
)
#: The names an ``import { a, b } from "./x.js"`` takes.
_IMPORTED = re.compile(r'^import \{([^}]*)\} from "\./', re.MULTILINE)


def test_every_name_a_script_exports_is_imported() -> None:
    """Before: plot.js exported ``TASK_COLORS``, which no module used (left over from the
    split of app.js). Now every exported name is imported by another of the page's modules."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in STATIC_DIR.glob("*.js")}
    imported = {
        name.strip()
        for text in texts.values()
        for names in _IMPORTED.findall(text)
        for name in names.split(",")
    }
    exported = {f"{n}: {name}" for n, text in texts.items() for name in _EXPORT.findall(text)}
    assert exported and imported
    assert sorted(e for e in exported if e.split(": ")[1] not in imported) == []


def test_scripts_are_javascript_whatever_the_platform_maps_js_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the scripts' type was the platform's guess for ``.js`` (Windows registries often
    say ``text/plain``), and a browser refuses an ES module served so. Now it is said."""
    import mimetypes

    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from xasflow.daemon.counters import Counters
    from xasflow.daemon.dashboard_routes import install_dashboard

    class Quiet:  # the members of a DaemonView the dashboard's routes read
        counters = Counters()

    mimetypes.guess_type("app.js")  # the table read, so the change below is the one used
    monkeypatch.setitem(mimetypes.types_map, ".js", "text/plain")
    app = Starlette()
    dash = install_dashboard(app, Quiet())  # type: ignore[arg-type]
    try:
        client = TestClient(app)
        scripts = sorted(p.name for p in STATIC_DIR.glob("*.js"))
        assert "app.js" in scripts
        for name in scripts:
            response = client.get(f"/static/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"] == "text/javascript; charset=utf-8", name
            assert response.headers["x-content-type-options"] == "nosniff", name
    finally:
        dash.stop()


def test_sse_pushes_the_prediction_and_spectrum_after_a_scan(dash: Harness) -> None:
    d = dash.daemon
    sse = SSEClient(d.http_url or "")
    try:
        assert sse.status == 200 and "text/event-stream" in sse.headers
        first = sse.next_state(time.monotonic() + DEADLINE_S)  # the current state at once
        assert first["health"]["ready"] is True
        assert [m["bundle_id"] for m in first["health"]["models"]] == [
            m["bundle_id"] for m in d.view.models()
        ]

        step_uid, step_docs = step_scan(STEP_GRID, transmission(STEP_GRID, shift=1.5))
        publish(dash.pub, step_docs)
        state, _ = sse.wait_for(
            lambda s: (
                (s["spectrum"] or {}).get("raw_uid") == step_uid
                and (s["run"] or {}).get("exit_status") == "success"
            )
        )
        manifest = d.parts.registry.get("Cu", "K").manifest  # type: ignore[union-attr]
        spec, pred, run = state["spectrum"], state["prediction"], state["run"]
        # the plotted arrays: raw mu on the scan's energies, normalised y on the model grid
        assert len(spec["energy"]) == len(spec["mu"]) == STEP_GRID.size
        assert spec["energy"] == pytest.approx(STEP_GRID, abs=2.0)  # aligned on the foil
        assert len(spec["grid"]) == len(spec["y"]) == manifest.prep.n_points
        assert spec["grid"][0] == pytest.approx(manifest.prep.window_start)
        assert spec["window"] == [manifest.prep.window_start, manifest.prep.window_stop]
        assert 8970.0 < spec["e0"] < 9000.0 and spec["energy_shift"] == pytest.approx(1.5, abs=0.3)
        latest = d.parts.pipeline.latest  # what the pipeline handed over, by reference
        assert (latest.raw_uid, latest.index) == (step_uid, 0)
        assert spec["y"] == pytest.approx(latest.prepared.y, abs=1e-4)
        assert spec["mu"] == pytest.approx(latest.prepared.spectrum.mu, abs=1e-4)
        assert spec["e0"] == pytest.approx(latest.prepared.e0)
        # regions clipped to the window, each with a share per task that has importances
        names = [r["name"] for r in spec["regions"]]
        assert names and set(names) <= set(manifest.regions)
        for r in spec["regions"]:
            assert manifest.prep.window_start <= r["start"] < r["stop"] <= manifest.prep.window_stop
            assert set(r["importance"]) == set(spec["tasks"])
            assert all(0.0 <= v <= 1.0 for v in r["importance"].values())
            assert r["max"] == pytest.approx(max(r["importance"].values()))
        # the prediction equals the published analysis event, with its uncertainties
        event = dash.results.wait([step_uid])[step_uid]["events"][0]
        assert pred["raw_uid"] == step_uid and pred["index"] == 0
        cn = pred["tasks"]["cn"]
        assert cn["value"] == event["cn"] and cn["confidence"] == pytest.approx(
            event["cn_probability"]
        )
        assert sum(cn["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert pred["tasks"]["distance"]["value"] == pytest.approx(event["distance"])
        assert pred["tasks"]["distance"]["uncertainty"] == pytest.approx(
            manifest.tasks["distance"].metrics["mae"]
        )
        # the tiny bundle's calibration rows are too few for a 90 % distance interval: its
        # quantile stands for infinity, and the page is told "unbounded", not +-1e6
        conf = manifest.tasks["distance"].conformal
        assert conf is not None and conf.qhat >= 1e6
        shown = pred["tasks"]["distance"]
        assert shown["coverage"] == pytest.approx(1 - conf.alpha)
        assert shown["interval_unbounded"] is True and "interval" not in shown
        assert pred["environment"] == event["motif"]
        ranked = json.loads(event["motif_ranking"])
        assert pred["motifs"] == [list(x) for x in ranked[: len(pred["motifs"])]]
        assert run["raw_uid"] == step_uid and run["kind"] == "step"
        assert (run["n_ok"], run["n_rejected"]) == (1, 0)
        assert state["runs"][0]["raw_uid"] == step_uid

        # a fly (quick-XAS) run: predictions over time within the run
        fly_e = np.linspace(8800.0, 9400.0, 1000)
        spectra = [transmission(fly_e, kind=k, seed=i) for i, k in enumerate(("CuO", "Cu2O") * 2)]
        fly_uid, fly_docs = fly_scan(fly_e, spectra)
        publish(dash.pub, fly_docs)
        state, _ = sse.wait_for(
            lambda s: (
                (s["run"] or {}).get("raw_uid") == fly_uid
                and s["run"]["exit_status"] is not None
                and (s["spectrum"] or {}).get("index") == 3
            )
        )
        hist = state["run"]["history"]
        assert state["run"]["kind"] == "fly" and hist["n"] == 4 and not hist["binned"]
        assert hist["index"] == [0, 1, 2, 3]
        events = dash.results.wait([fly_uid])[fly_uid]["events"]
        assert hist["cn"] == [e["cn"] for e in events]
        assert hist["distance"] == pytest.approx([e["distance"] for e in events], abs=1e-4)
        assert len(state["spectrum"]["energy"]) <= 800  # raw arrays decimated for the page
        assert state["runs"][0]["raw_uid"] == fly_uid and state["runs"][1]["raw_uid"] == step_uid
        h = state["health"]
        # the step scan's spectrum and the fly scan's four, nothing refused, nothing waiting
        assert h["analysed"] == d.counters.snapshot()["spectra_analysed"] == 5
        assert h["queue_depth"] == 0 and h["rejected"] == {}
        # /api/state gives the same view in one request
        status, _, body = http_get(f"{d.http_url}/api/state")
        assert status == 200 and json.loads(body)["run"]["raw_uid"] == fly_uid
    finally:
        sse.close()


def test_a_burst_of_2000_updates_is_coalesced(dash: Harness) -> None:
    d = dash.daemon
    dashboard: Dashboard = d.parts.app.state.dashboard
    sse = SSEClient(d.http_url or "")
    try:
        sse.next_state(time.monotonic() + DEADLINE_S)
        before = dashboard.stats()
        docs = burst_docs(2000, "burst-run")
        t0 = time.monotonic()
        for name, doc in docs:  # what the processing thread does per analysis document
            dashboard.listener(name, doc)
        state, n_messages = sse.wait_for(
            lambda s: (
                (s["run"] or {}).get("raw_uid") == "burst-run"
                and s["run"]["n_ok"] == 2000
                and s["run"]["exit_status"] == "success"
            )
        )
        elapsed = time.monotonic() - t0
    finally:
        sse.close()
    # at most one message per interval reached the client, however many updates came in
    assert n_messages <= math.ceil(elapsed * RATE_HZ) + 1, (n_messages, elapsed)
    assert n_messages < 2000 // 20
    after = dashboard.stats()
    assert after["documents"] - before["documents"] == len(docs)
    assert after["dropped"] == before["dropped"]  # nothing lost, only coalesced
    assert after["messages"] - before["messages"] <= math.ceil(elapsed * RATE_HZ) + 3
    hist = state["run"]["history"]
    assert hist["n"] == 2000 and hist["binned"] and len(hist["index"]) <= 400
    assert hist["index"][0] < 5 and hist["index"][-1] > 1990  # the whole run, averaged
    assert np.nanmean(hist["cn"]) == pytest.approx(3.0, abs=0.01)


def test_dashboard_digest_bounds_memory() -> None:
    dashboard = Dashboard(None, rate_hz=10.0, inbox=100)
    for name, doc in burst_docs(250, "overflow"):  # more than the inbox holds: oldest dropped
        dashboard.listener(name, doc)
    assert dashboard.tick(build=True)
    stats = dashboard.stats()
    assert stats["documents"] == 253 and stats["digested"] == 100 and stats["dropped"] == 153
    big = Dashboard(None, rate_hz=10.0)
    for name, doc in burst_docs(45_000, "long"):  # decimated by 2 twice, whole run kept
        big.listener(name, doc)
    big.tick(build=False)
    run = big._runs["long"]
    index = run.column("index")
    assert run.n_ok == 45_000 and run.stride == 4 and index.size < 20_000
    assert index[0] == 0 and index[-1] >= 44_990 and np.all(np.diff(index) == 4)
    for i in range(25):  # only the most recent runs are kept
        for name, doc in burst_docs(1, f"r{i}"):
            big.listener(name, doc)
    _, text = big.message()
    state = json.loads(text)
    assert len(big._runs) == 20 and "long" not in big._runs
    assert [r["raw_uid"] for r in state["runs"]][:2] == ["r24", "r23"]


def test_a_run_still_open_stays_on_show_while_closed_ones_are_trimmed() -> None:
    """Before: the runs on show were trimmed to the last 20 started, oldest first, open or
    not: a run still scanning when 20 shorter ones had started after it was dropped, and
    its later spectra were ignored ("no longer on show")."""
    dashboard = Dashboard(None, rate_hz=10.0)
    start, desc, e0, e1, e2, stop = burst_docs(3, "scanning")
    for name, doc in (start, desc, e0):
        dashboard.listener(name, doc)
    for i in range(25):  # runs that start and end while it scans
        for name, doc in burst_docs(1, f"r{i}"):
            dashboard.listener(name, doc)
    for name, doc in (e1, e2):
        dashboard.listener(name, doc)
    _, text = dashboard.message()
    run = json.loads(text)["run"]
    assert (run["raw_uid"], run["n_ok"]) == ("scanning", 3)
    assert len(dashboard._runs) == 20 and "r5" not in dashboard._runs and "r6" in dashboard._runs
    dashboard.listener(*stop)  # closed now: the oldest, so the first to go
    for name, doc in burst_docs(1, "next"):
        dashboard.listener(name, doc)
    dashboard.tick(build=False)
    assert len(dashboard._runs) == 20 and "scanning" not in dashboard._runs


def test_the_runs_table_keeps_a_run_still_scanning_among_the_eight_shown() -> None:
    """Before: the table showed the last 8 runs started, so a run still scanning left it
    once 8 shorter runs had started after it (kept, and its panel live, but gone from the
    list). Now it takes the place of the oldest closed run shown, newest first still."""
    dashboard = Dashboard(None, rate_hz=10.0)
    start, desc, e0 = burst_docs(3, "scanning")[:3]
    for name, doc in (start, desc, e0):
        dashboard.listener(name, doc)
    for i in range(10):  # runs that start and end while it scans
        for name, doc in burst_docs(1, f"r{i}"):
            dashboard.listener(name, doc)
    _, text = dashboard.message()
    shown = [r["raw_uid"] for r in json.loads(text)["runs"]]
    assert shown == ["r9", "r8", "r7", "r6", "r5", "r4", "r3", "scanning"]


def test_runs_whose_stop_never_comes_are_bounded_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Runs kept open for want of their stop (lost in the inbox) stay bounded: past 200,
    the oldest leaves, logged."""
    dashboard = Dashboard(None, rate_hz=10.0)
    for i in range(201):
        start, desc = burst_docs(1, f"open{i}")[:2]
        dashboard.listener(*start)
        dashboard.listener(*desc)
    with caplog.at_level("WARNING", logger="xasflow.daemon.dashboard"):
        dashboard.tick(build=False)
    assert len(dashboard._runs) == 200 and "open0" not in dashboard._runs
    assert "open1" in dashboard._runs and "run open0, with no stop seen" in caplog.text


def test_token_is_required_when_bound_beyond_loopback(
    models_dir: Path,
    proxy: LoopbackProxy,
    tmp_path: Path,
) -> None:
    base = daemon_config(models_dir, proxy, tmp_path / "store")
    with pytest.raises(ConfigError, match=r"http\.token"):
        base.with_updates({"http": {"host": "0.0.0.0"}})
    # a one-character (or any short) token is refused, naming the minimum, never the token
    with pytest.raises(ConfigError, match=r"http: .*token has 1 characters; at least 16") as err:
        base.with_updates({"http": {"host": "0.0.0.0", "token": "x"}})
    assert "'x'" not in str(err.value)
    with pytest.raises(ConfigError, match=r"token has 4 characters; at least 16"):
        base.with_updates({"http": {"token": 1234}})  # unquoted YAML number, short
    with pytest.raises(ConfigError, match=r"at least 20 are required \(http\.token_min_length\)"):
        base.with_updates({"http": {"token": "a" * 19, "token_min_length": 20}})
    with pytest.raises(ConfigError, match=r"http\.token_min_length"):
        base.with_updates({"http": {"token_min_length": 4}})  # the floor an operator can set
    numeric = base.with_updates({"http": {"token": 12345678901234567}})
    assert numeric.http.token is not None
    assert numeric.http.token.get_secret_value() == "12345678901234567"  # kept as text
    token = "s3cret-token/with+chars"
    cfg = base.with_updates(
        {
            "http": {"host": "0.0.0.0", "token": token},
            "storage": {"enabled": False},
            "output": {"enabled": False},
        }
    )
    assert token not in cfg.model_dump_json()  # never printed by `serve --check`
    daemon = Daemon(cfg)
    daemon.start()
    try:
        port = daemon.parts.http.port
        url = f"http://127.0.0.1:{port}"
        q = "?token=" + urllib.parse.quote(token, safe="")
        # the orchestrator's probes answer without the token, and say one boolean only
        assert http_get(url + "/livez") == (200, ANY, b'{"alive":true}')
        assert http_get(url + "/readyz") == (200, ANY, b'{"ready":true}')
        assert http_get(url + "/livez/../health")[0] == 401  # only the exact paths are open
        for path in ("/", "/static/app.js", "/api/state", "/events", "/health", "/metrics"):
            status, headers, _ = http_get(url + path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Bearer")
            assert http_get(url + path + "?token=wrong")[0] == 401, path
        status, _, page = http_get(url + "/" + q)
        assert status == 200
        assert f'src="static/app.js{q}"' in page.decode()  # the page's assets carry the token
        scripts = module_graph(url, q)  # ... and so do the modules' imports of each other
        assert len(scripts) > 1
        for name in scripts:
            assert http_get(f"{url}/static/{name}")[0] == 401, name
        auth = {"Authorization": f"Bearer {token}"}
        assert http_get(url + "/api/state", auth)[0] == 200
        assert http_get(url + "/metrics", auth)[0] == 200
        refused = SSEClient(url, "/events")
        refused.close()
        assert refused.status == 401
        sse = SSEClient(url, "/events" + q)
        try:
            assert sse.status == 200
            assert sse.next_state(time.monotonic() + DEADLINE_S)["health"]["ready"] is True
        finally:
            sse.close()
    finally:
        daemon.stop()
    assert daemon.parts.app.state.dashboard.closed


def test_dashboard_can_be_turned_off(proxy: LoopbackProxy, tmp_path: Path) -> None:
    cfg = DaemonConfig().with_updates(
        {
            "input": {"address": proxy.out_address},
            "models": {"directory": str(tmp_path), "watch": False},
            "storage": {"enabled": False},
            "output": {"enabled": False},
            "http": {"port": 0, "dashboard": False},
        }
    )
    with Daemon(cfg) as daemon:
        assert http_get(f"{daemon.http_url}/")[0] == 404
        assert http_get(f"{daemon.http_url}/health")[0] == 200


def test_event_streams_beyond_the_limit_are_refused_and_counted(
    proxy: LoopbackProxy, tmp_path: Path
) -> None:
    """http.max_sse_clients: 2 streams are served, the 3rd gets 503 and is counted in /health
    and /metrics; once one closes, a new one is admitted. Queue limits show in /health."""
    cfg = DaemonConfig().with_updates(
        {
            "input": {"address": proxy.out_address, "queue_size": 500},
            "models": {"directory": str(tmp_path), "watch": False},
            "storage": {"directory": str(tmp_path / "store"), "max_queue": 700},
            "output": {"enabled": False},
            "http": {"port": 0, "max_sse_clients": 2},
        }
    )
    with Daemon(cfg) as daemon:
        url = daemon.http_url
        assert url is not None
        first, second = SSEClient(url), SSEClient(url)
        try:
            assert (first.status, second.status) == (200, 200)
            third = SSEClient(url)
            third.close()
            assert third.status == 503 and "retry-after: 5" in third.headers
            status, _, body = http_get(url + "/events")
            assert status == 503 and b"http.max_sse_clients" in body
            limits = json.loads(http_get(url + "/health")[2])["limits"]
            assert limits["sse_clients"] == {"max": 2, "open": 2, "refused": 2}
            assert limits["input_queue"] == {
                "max": 500,
                "depth": 0,
                "overflow": "block",
                "dropped": 0,
            }
            assert limits["store_queue"] == {
                "max": 700,
                "depth": 0,
                "dropped": 0,
                "full_wait_s": 0.0,
                "full_waits": 0,
            }
            assert limits["token_min_length"] == 16
            text = http_get(url + "/metrics")[2].decode()
            assert 'xasflow_limit_refused_total{limit="sse_clients"} 2.0' in text
            assert 'xasflow_limit{limit="sse_clients"} 2.0' in text
            assert 'xasflow_limit_used{limit="sse_clients"} 2.0' in text
            assert 'xasflow_limit{limit="input_queue"} 500.0' in text
            first.close()
            deadline = time.monotonic() + DEADLINE_S

            def open_streams() -> int:
                body = http_get(url + "/health")[2]
                return int(json.loads(body)["limits"]["sse_clients"]["open"])

            while open_streams() != 1:  # each poll is a request: no sleep needed
                assert time.monotonic() < deadline, "the closed stream was never released"
            fourth = SSEClient(url)
            try:
                assert fourth.status == 200
                assert fourth.next_state(time.monotonic() + DEADLINE_S)["health"]["ready"]
            finally:
                fourth.close()
        finally:
            first.close()
            second.close()
    assert daemon.counters.snapshot()["limit_refused"] == {"sse_clients": 2}


def test_readyz_says_not_ready_before_the_daemon_is() -> None:
    """``/readyz`` is 503 while the daemon is not ready, or has no bundle to answer with;
    ``/livez`` is 200 all the same."""
    from starlette.testclient import TestClient

    from xasflow.daemon.counters import Counters
    from xasflow.daemon.http import create_app

    class Starting:  # what a DaemonView says before start() has finished
        counters = Counters()
        ready = False

    client = TestClient(create_app(Starting()))  # type: ignore[arg-type]
    assert (client.get("/readyz").status_code, client.get("/readyz").json()) == (
        503,
        {"ready": False},
    )
    assert client.get("/livez").status_code == 200
    Starting.ready = True
    assert client.get("/readyz").json() == {"ready": False}  # started, but no bundle loaded
    Starting.counters.set_model("Cu", "K", "cu-k-1")
    assert client.get("/readyz").json() == {"ready": True}
    Starting.counters.set_model("Cu", "K", None)  # its bundle withdrawn: not ready again
    assert client.get("/readyz").status_code == 503


def test_rejection_rates_are_split_by_stage() -> None:
    """Before: ``rates.rejected_per_s``, shown as "rejected/s" beside "spectra/s", counted the
    assembler's refused documents with the spectra the analysis rejected. Now each stage has
    its own rate: the analysis's (spectra) and the assembly's (documents and runs)."""
    from xasflow.daemon.counters import Counters

    now = [100.0]

    class Running:  # the members of a DaemonView the dashboard reads
        counters = Counters()
        delivered = 0

        def input_stats(self) -> dict[str, int]:
            return {"delivered": self.delivered}

        def health(self) -> dict[str, Any]:
            return {"counters": self.counters.snapshot()}

    view = Running()
    dashboard = Dashboard(view, rate_hz=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    dashboard.tick(build=True)
    view.counters.spectrum_analysed(8)
    view.counters.reject("weak_edge", stage="analysis", n=2)
    view.counters.reject("malformed_document", stage="assembly", n=10)
    view.delivered = 40
    now[0] += 2.0
    dashboard.tick(build=True)
    _, text = dashboard.message()
    assert json.loads(text)["rates"] == {
        "analysed_per_s": 4.0,
        "analysis_rejected_per_s": 1.0,  # spectra: what "rejected/s" beside "spectra/s" means
        "assembly_rejected_per_s": 5.0,  # documents and runs, never spectra
        "documents_per_s": 20.0,
    }
    health = json.loads(text)["health"]
    assert health["rejected_per_stage"] == {"analysis": 2, "assembly": 10}
