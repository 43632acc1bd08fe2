"""The dashboard's HTTP: page and local assets, scripts as modules, access token, probes.

A real Daemon on a loopback 0MQ forwarder with the session's tiny synthetic Cu K bundle
(conftest); scans are composed with event-model and published as bluesky would. The SSE
stream is read from a raw socket (HTTP/1.0, so the body is the plain event stream), with
deadlines instead of sleeps.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from pathlib import Path
from unittest.mock import ANY

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("starlette")

from dashboard_helpers import DEADLINE_S, SSEClient, http_get
from helpers import Harness, LoopbackProxy, daemon_config

from xasflow.daemon.config import ConfigError, DaemonConfig
from xasflow.daemon.dashboard_routes import STATIC_DIR
from xasflow.daemon.service import Daemon

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
