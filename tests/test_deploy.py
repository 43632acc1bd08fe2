"""deploy/: every file parses, the tools accept them, and they fit the daemon they deploy.

A real daemon (the shipped bundles of ``models/``, a loopback 0MQ proxy, an access token)
analyses a step scan; its ``/metrics`` must export every metric name that the alert rules and
the Grafana dashboard query, its ``/health`` must satisfy the image's health check and the
systemd unit's readiness command, and ``tiled serve catalog`` must serve its store to the
tiled client. ``promtool``, ``docker compose`` and ``systemd-analyze`` run where installed and
skip, saying so, where not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    DEPLOY,
    METRIC,
    TOKEN,
    alert_rules,
    compose_cli,
    env_file,
    grafana_exprs,
    load_yaml,
    queried,
    tool,
    unit_file,
)

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")
pytest.importorskip("tiled.client")

from helpers import (
    STEP_GRID,
    Harness,
    LoopbackProxy,
    daemon_config,
    daemon_health,
    free_port,
    publish,
    step_scan,
    transmission,
    wait_for,
)

from xasflow import paths
from xasflow.adapters.tiled_store import read_analysis

pytestmark = pytest.mark.timeout(300)
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})

# --------------------------------------------------------------------------- static checks


def test_every_deploy_file_parses() -> None:
    """Each file under deploy/ is one of the known kinds and parses as it."""
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert len(files) >= 15, files
    for path in files:
        name = path.name
        if path.suffix in (".yaml", ".yml"):
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
            assert docs and all(isinstance(d, dict) for d in docs), path
        elif path.suffix == ".json":
            assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".service":
            assert {"Unit", "Service", "Install"} <= set(unit_file(path).sections()), path
        elif name.endswith(".env.example"):
            assert env_file(path), path
        elif path.suffix == ".py":
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        elif name == "Dockerfile":
            lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
            assert lines[0].startswith("FROM python:3.11-slim"), lines[0]
        else:
            raise AssertionError(f"{path}: no parser for this kind of file; add one here")


# --------------------------------------------------------------------------- external tools


def test_promtool_checks_rules_config_and_dashboard_queries(tmp_path: Path) -> None:
    """Rules check and their unit tests pass; the scrape config checks with its files in
    place; every Grafana query parses as PromQL (as recording rules)."""
    promtool = tool("promtool")
    run = lambda *a: subprocess.run([promtool, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    for args in (("check", "rules"), ("test", "rules")):
        name = "alerts.yml" if args[0] == "check" else "alerts_test.yml"
        res = run(*args, str(DEPLOY / "prometheus" / name))
        assert res.returncode == 0, res.stdout + res.stderr
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    prom["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    prom["scrape_configs"][0]["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    res = run("check", "config", str(tmp_path / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    exprs = [re.sub(r"^label_values\((.*), *\w+\)$", r"\1", e) for e in grafana_exprs()]
    rules = [
        {"record": f"grafana:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs)
    ]
    text = yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]})
    (tmp_path / "grafana.yml").write_text(text.replace("$instance", ".*"))
    res = run("check", "rules", str(tmp_path / "grafana.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_docker_compose_config() -> None:
    """`docker compose config` accepts the stack (needs the CLI, not a Docker daemon)."""
    cli = compose_cli()
    res = subprocess.run(
        [*cli, "-f", str(DEPLOY / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XASFLOW_TOKEN": TOKEN},
    )
    assert res.returncode == 0, res.stderr
    model = json.loads(res.stdout)
    assert model["services"]["xasflow"]["environment"]["XASFLOW__HTTP__TOKEN"] == TOKEN
    assert model["services"]["prometheus"]["environment"]["XASFLOW_TOKEN"] == TOKEN


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit verifies (ExecStart pointed at this environment's xasflow)."""
    analyze = tool("systemd-analyze")
    exe = Path(sys.executable).parent / "xasflow"
    if not exe.exists():
        pytest.skip(f"no xasflow console script beside {sys.executable}")
    text = (DEPLOY / "systemd" / "xasflow.service").read_text()
    unit = tmp_path / "xasflow.service"
    unit.write_text(text.replace("/opt/xasflow/venv/bin/xasflow", str(exe)))
    res = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0 and "xasflow.service" not in res.stderr, res.stderr
    res = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    level = re.search(r"Overall exposure level for xasflow.service: ([0-9.]+)", res.stdout)
    assert level and float(level.group(1)) <= 2.0, res.stdout[-500:] + res.stderr


# --------------------------------------------------------------------------- a running daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, str]]:
    """The daemon with the shipped bundles and a token, after one analysed step scan."""
    proxy = LoopbackProxy()
    store = tmp_path_factory.mktemp("deploy") / "store"
    cfg = daemon_config(paths.REPO_ROOT / "models", proxy, store, run_timeout_s=5)
    h = Harness(cfg.with_updates({"http": {"token": TOKEN}}), proxy)
    uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID), {"sample_name": "CuO"})
    publish(h.pub, docs)
    h.results.wait([uid])
    wait_for(lambda: _stored_stop(store, uid), "the run's stop in the store")
    yield h, uid
    h.close()
    proxy.close()


def _stored_stop(store: Path, uid: str) -> bool:
    try:
        return read_analysis(store, uid)[0]["stop"] is not None
    except KeyError:  # the run's table is not written yet
        return False


def _metrics_text(daemon: Harness) -> str:
    """The daemon's /metrics, read with its token."""
    import urllib.request

    req = urllib.request.Request(
        f"{daemon.daemon.http_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def _exported(daemon: Harness) -> set[str]:
    text = _metrics_text(daemon)
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            names |= {name, *(name.removesuffix("_total") + s for s in suffixes.get(kind, ()))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_deploy_queries_is_exported(daemon: tuple[Harness, str]) -> None:
    """Alert rules and dashboard query only names the daemon exports (or Prometheus makes)."""
    exported = _exported(daemon[0])
    alerts = queried([r["expr"] for r in alert_rules()])
    grafana = queried(grafana_exprs())
    assert {"xasflow_latency_seconds_bucket", "xasflow_model_info", "xasflow_up"} <= alerts
    assert "xasflow_events_lost_total" in alerts & grafana
    assert "xasflow_kafka_consumer_lag" in alerts & grafana
    missing = (alerts | grafana) - exported - PROMETHEUS_SERIES
    assert not missing, f"deploy/ queries metrics the daemon does not export: {sorted(missing)}"
    assert all(METRIC.search(r["expr"]) for r in alert_rules())


def test_healthcheck_script_reads_the_token_from_the_environment(
    daemon: tuple[Harness, str],
) -> None:
    """xasflow-healthcheck: 0 with the daemon's token, 1 and the reason without or when down."""
    script = [sys.executable, str(DEPLOY / "healthcheck.py"), "--url"]
    url = f"{daemon[0].daemon.http_url}/health"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XASFLOW__")}
    ok = subprocess.run([*script, url], env={**env, "XASFLOW__HTTP__TOKEN": TOKEN}, timeout=60)
    assert ok.returncode == 0
    bad = subprocess.run([*script, url], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "HTTP 401" in bad.stderr
    down = f"http://127.0.0.1:{free_port()}/health"
    res = subprocess.run([*script, down], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no answer" in res.stderr


def test_serve_tells_systemd_ready_and_stopping(tmp_path: Path) -> None:
    """``xasflow serve`` under ``Type=notify``: READY=1 on the unit's socket once /health says
    ready, STOPPING=1 on SIGTERM, then a clean exit. With no bundle, the k8s startup and
    liveness probes' paths answer 200 (readiness's 503)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(120)
    conf = tmp_path / "xasflow.yaml"
    conf.write_text(
        f"models:\n  directory: {tmp_path / 'models'}\n  watch: false\n"
        f"storage:\n  directory: {tmp_path / 'store'}\n"
        "input:\n  address: tcp://127.0.0.1:1\noutput:\n  enabled: false\n"
    )
    (tmp_path / "models").mkdir()
    port = free_port()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "XASFLOW__HTTP__PORT": str(port),
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xasflow.cli", "serve", "--config", str(conf)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = sock.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1", ready
        assert (daemon_health(port) or {}).get("ready") is True  # ready means ready
        # no bundle serves (the models directory is empty): the k8s startup and liveness
        # probes must pass, or the kubelet restart-loops a daemon that runs on rejecting
        # no_model (XasflowNoModelLoaded could never fire); only readiness keeps it out
        answers = {name: _http_status(port, path) for name, path in _k8s_probe_paths().items()}
        assert answers == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 503}
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        sock.close()
    # outside systemd nothing is sent, and a refusing socket is logged, never raised
    from xasflow.daemon.notify import sd_notify

    assert sd_notify("READY=1", env={}) is False
    assert sd_notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False


def _k8s_probe_paths() -> dict[str, str]:
    """deploy/k8s/deployment.yaml's probe paths, by probe."""
    pod = load_yaml(DEPLOY / "k8s" / "deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return {p: container[p]["httpGet"]["path"] for p in container if p.endswith("Probe")}


def _http_status(port: int, path: str) -> int:
    """The HTTP status a local daemon answers ``path`` with, without a token (as kubelet)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_tiled_serve_catalog_serves_the_store_read_only(
    daemon: tuple[Harness, str], tmp_path: Path
) -> None:
    """The README's `tiled serve catalog` command reads the live store; the client reads the
    run back and cannot write; without `-r <tables>` the rows cannot be read."""
    pytest.importorskip("tiled.server")
    from tiled.client import from_uri
    from tiled.client.utils import ClientError

    tiled = Path(sys.executable).parent / "tiled"
    if not tiled.exists():
        pytest.skip(f"no tiled console script beside {sys.executable}")
    h, uid = daemon
    store = Path(h.daemon.config.storage.directory)
    _md, rows = read_analysis(store, uid)

    def serve(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        cmd = [str(tiled), "serve", "catalog", str(store / "catalog.db"), *extra]
        proc = subprocess.Popen(
            [*cmd, "--public", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"tiled-{port}.log").open("wb"),
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{url}/api/v1/") or proc.poll() is not None, "tiled", 60)
        assert proc.poll() is None, (tmp_path / f"tiled-{port}.log").read_text()
        return proc, url

    proc, url = serve("-r", f"sqlite:///{store}/tables.sqlite")
    try:
        client = from_uri(url)
        run = client[uid]
        assert run.metadata["start"]["raw_uid"] == uid
        assert run.metadata["stop"]["exit_status"] == "success"
        table = run["primary"].read()
        assert len(table) == len(rows) >= 1
        assert list(table["seq_num"]) == list(rows["seq_num"])
        assert list(table["cn"]) == list(rows["cn"])
        # xasflow's reader takes the served catalog too (array columns decoded)
        md, served = read_analysis(client, uid)
        assert md["stop"]["exit_status"] == "success"
        assert served["motif_ranking"].tolist() == rows["motif_ranking"].tolist()
        with pytest.raises(ClientError) as refused:
            client.create_container("not-allowed")
        assert refused.value.response.status_code in (401, 403)
    finally:
        proc.terminate()
        proc.wait(30)

    proc, url = serve()
    try:
        with pytest.raises(ClientError, match="No such field"):
            from_uri(url)[uid]["primary"].read()
    finally:
        proc.terminate()
        proc.wait(30)


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_a_scan_the_channel_map_refuses_fires_an_alert(
    daemon: tuple[Harness, str], tmp_path: Path
) -> None:
    """A step scan whose I0 channel the channel map does not know (a renamed detector) is
    refused before the analysis; the series the daemon exports for it, fed to the alert rules
    as a count that rose (promtool), fire XasflowAssemblyRejecting with its reason: the rule
    reads the labels the daemon gives (no alert saw such a scan before; from a review)."""
    h = daemon[0]
    channels = transmission(STEP_GRID)
    renamed = {("mon" if k == "I0" else k): v for k, v in channels.items()}
    assert renamed.keys() != channels.keys()
    publish(h.pub, step_scan(STEP_GRID, renamed, {"sample_name": "CuO"})[1])
    wanted = re.compile(r'^xasflow_spectra_rejected_total\{([^}]*stage="assembly"[^}]*)\} (\S+)$')

    def refused() -> dict[str, float]:
        found = (wanted.match(line) for line in _metrics_text(h).splitlines())
        return {m[1]: float(m[2]) for m in found if m}

    wait_for(lambda: any(v > 0 for v in refused().values()), "an assembly refusal on /metrics")
    series = [
        {
            "series": f'xasflow_spectra_rejected_total{{{labels}, job="xasflow", instance="d1"}}',
            "values": f"0x10 {value}x20",  # the count the scan made, after 10 minutes at 0
        }
        for labels, value in refused().items()
    ]
    firing = 'ALERTS{alertname="XasflowAssemblyRejecting", alertstate="firing"}'
    test = {
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": f"count by (reason) ({firing})",
                        "eval_time": "15m",
                        "exp_samples": [{"labels": '{reason="missing_channel"}', "value": 1}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "scraped_test.yml").write_text(yaml.safe_dump(test))
    res = subprocess.run(
        [tool("promtool"), "test", "rules", str(tmp_path / "scraped_test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
