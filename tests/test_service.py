"""The daemon's service shell: configuration, the wired Daemon on a loopback 0MQ proxy, HTTP, stop.

The session's tiny Cu K bundle (conftest, synthetic FEFF tree) serves; documents are
composed here with event-model and published with ``ZmqDocumentPublisher`` through an
in-process 0MQ forwarder (SUB/PUB, like bluesky's proxy), so no ophyd or RunEngine is needed.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from event_model import compose_run
from helpers import (
    ANALYSIS,
    DEADLINE_S,
    STEP_GRID,
    Harness,
    LoopbackProxy,
    Results,
    daemon_config,
    fly_scan,
    free_port,
    get,
    publish,
    step_scan,
    transmission,
    wait_for,
    warm_up,
)

from xasflow.adapters.tiled_store import read_analysis
from xasflow.adapters.wire import DECODE_ERROR_REASONS
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher
from xasflow.daemon.commands import add_commands
from xasflow.daemon.config import ConfigError, DaemonConfig, env_overrides, load_config
from xasflow.daemon.pipeline import known_rejections
from xasflow.daemon.service import Daemon
from xasflow.sim.commands import add_demo_command


@pytest.fixture(scope="module")
def harness(
    models_dir: Path, shared_proxy: LoopbackProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    store = tmp_path_factory.mktemp("store")
    cfg = daemon_config(models_dir, shared_proxy, store, run_timeout_s=1.5, timeout_check_s=0.1)
    h = Harness(cfg, shared_proxy)
    yield h
    h.close()


# --------------------------------------------------------------------------- configuration


def test_config_file_env_overrides_and_adapters(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "xasflow.yaml"
    path.parent.mkdir()
    path.write_text(
        "input:\n  address: 10.0.0.5:5578\n  prefix: raw\n  overflow: drop_oldest\n"
        "channels:\n  i0: ion0\n  it: [ion1, It]\n  if: [pips]\n  mode: transmission\n"
        "storage:\n  directory: results\n"
        "models:\n"  # an empty section is allowed
    )
    env = {
        "XASFLOW__INPUT__ADDRESS": "tcp://beamline:5578",
        "XASFLOW__HTTP__PORT": "9001",
        "XASFLOW__INPUT__FORMATS": "[msgpack]",
        "XASFLOW__ANALYSIS__ELEMENT": "cu",
        "XASFLOW__OUTPUT__PREFIX": "123",  # kept as text, never read as a number
        "XASFLOW_SHARED_DATA": "/elsewhere",  # single underscore: not ours
    }
    cfg = load_config(path, env)
    assert cfg.input.address == "tcp://beamline:5578"
    assert cfg.input.prefix == "raw" and cfg.input.overflow == "drop_oldest"
    assert cfg.input.formats == ("msgpack",)
    assert cfg.http.port == 9001 and cfg.http.host == "127.0.0.1"
    assert cfg.analysis.element == "Cu" and cfg.analysis.prefer == "start"
    assert cfg.output.prefix == "123"
    assert cfg.storage.directory == path.parent / "results"  # relative to the file
    assert cfg.models.directory.name == "models"
    zin = cfg.input.to_zmq()
    assert (zin.address, zin.prefix, zin.formats) == ("tcp://beamline:5578", b"raw", ("msgpack",))
    cmap = cfg.channels.to_channel_map()
    assert cmap.i0 == ("ion0",) and cmap.it == ("ion1", "It") and cmap.if_ == ("pips",)
    assert cmap.mode == "transmission" and cmap.energy[0] == "energy"
    defaults = load_config(None, {})
    assert defaults.input.address == "tcp://127.0.0.1:5578"
    assert defaults.output.address == "tcp://127.0.0.1:5577"
    assert defaults.storage.enabled and defaults.analysis.run_timeout_s == 60.0
    assert env_overrides({"XASFLOW__ANALYSIS__EDGE": "null"}) == {"analysis": {"edge": None}}
    kafka_env = {
        "XASFLOW__INPUT__KIND": "kafka",
        "XASFLOW__INPUT__KAFKA__BOOTSTRAP_SERVERS": "broker:9092",
        "XASFLOW__INPUT__KAFKA__GROUP_ID": "7",  # text, not the number 7
    }
    kafka = load_config(None, kafka_env)
    assert (kafka.input.kind, kafka.input.kafka.bootstrap_servers) == ("kafka", "broker:9092")
    assert kafka.input.kafka.group_id == "7" and kafka.input.kafka.session_timeout_ms == 6000
    with pytest.raises(ConfigError, match="SECTION__SUB__KEY"):
        env_overrides({"XASFLOW__INPUT__KAFKA__CONSUMER__X": "1"})
    # a mapping (librdkafka settings) is written in braces; without them it stays text
    kafka_env["XASFLOW__INPUT__KAFKA__CONSUMER"] = "{security.protocol: SSL, fetch.wait.max.ms: 5}"
    kafka = load_config(None, kafka_env)
    assert kafka.input.kafka.consumer == {"security.protocol": "SSL", "fetch.wait.max.ms": 5}
    assert env_overrides({"XASFLOW__INPUT__PLAN": "a: b"}) == {"input": {"plan": "a: b"}}
    with pytest.raises(ConfigError, match="XASFLOW__OUTPUT__KAFKA__PRODUCER: not a YAML mapping"):
        env_overrides({"XASFLOW__OUTPUT__KAFKA__PRODUCER": "{linger.ms: 5"})


def test_example_config_documents_the_defaults() -> None:
    from xasflow import paths

    example = paths.REPO_ROOT / "examples" / "xasflow.yaml"
    cfg = load_config(example, {})
    assert cfg.models.directory == paths.REPO_ROOT / "models"
    assert cfg.storage.directory == example.parent / "xasflow-store"
    defaults = DaemonConfig()
    for section in (
        "input",
        "channels",
        "analysis",
        "output",
        "http",
        "recommend",
        "epics",
        "queueserver",
    ):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.models == defaults.models
    assert cfg.storage.model_dump(exclude={"directory"}) == defaults.storage.model_dump(
        exclude={"directory"}
    )


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  adress: x\n  overflow: wait\nhttp:\n  port: 70000\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    text = str(err.value)
    assert str(path) in text
    assert "input.adress: unknown setting" in text
    assert "input.overflow" in text and "'wait'" in text
    assert "http.port" in text
    with pytest.raises(ConfigError, match=r"XASFLOW__HTTP__PORT.*\n.*http\.port"):
        load_config(None, {"XASFLOW__HTTP__PORT": "eighty"})
    with pytest.raises(ConfigError, match="XASFLOW__SECTION__KEY"):
        load_config(None, {"XASFLOW__PORT": "1"})
    with pytest.raises(ConfigError, match="analyse its own results"):
        load_config(None, {"XASFLOW__INPUT__PREFIX": "a", "XASFLOW__OUTPUT__PREFIX": "a"})
    with pytest.raises(ConfigError, match="prefix must not contain spaces"):
        load_config(None, {"XASFLOW__INPUT__PREFIX": "a b"})
    with pytest.raises(ConfigError, match="not an element symbol"):
        load_config(None, {"XASFLOW__ANALYSIS__ELEMENT": "Copper"})
    with pytest.raises(ConfigError, match=r"analysis\.herfd: .*FWHM in eV"):
        load_config(None, {"XASFLOW__ANALYSIS__HERFD": "-1"})
    assert load_config(None, {"XASFLOW__ANALYSIS__HERFD": "1.2"}).analysis.herfd == 1.2
    assert load_config(None, {"XASFLOW__ANALYSIS__HERFD": "true"}).analysis.herfd is True
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml", {})
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml", {})
    (tmp_path / "broken.yaml").write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(tmp_path / "broken.yaml", {})
    # one line, naming the file and where, not PyYAML's "<unicode string>"
    text = str(err.value)
    assert "\n" not in text and "<unicode string>" not in text
    assert text.startswith(f"{tmp_path / 'broken.yaml'}:2:1: not valid YAML: expected")
    assert text.endswith("(while parsing a flow sequence from line 1)")


def test_bundle_integrity_settings(tmp_path: Path) -> None:
    """models.require_digest / require_signature / trusted_keys: defaults, paths relative to
    the file, a key that is not a public key and signatures without keys are errors."""
    from xasflow.models.integrity import generate_keypair

    private, public = generate_keypair()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "facility.pub").write_bytes(public)
    (tmp_path / "keys" / "facility.key").write_bytes(private)
    defaults = DaemonConfig().models
    assert (defaults.require_digest, defaults.require_signature) == (True, False)
    assert defaults.trusted_keys == ()
    path = tmp_path / "xasflow.yaml"
    path.write_text("models:\n  require_signature: true\n  trusted_keys: [keys/facility.pub]\n")
    cfg = load_config(path, {})
    assert cfg.models.trusted_keys == (tmp_path / "keys" / "facility.pub",)
    assert cfg.models.require_signature and cfg.models.require_digest
    one = load_config(None, {"XASFLOW__MODELS__TRUSTED_KEYS": str(tmp_path / "keys/facility.pub")})
    assert one.models.trusted_keys == (tmp_path / "keys" / "facility.pub",)
    with pytest.raises(ConfigError, match=r"models: .*require_signature: true needs"):
        load_config(None, {"XASFLOW__MODELS__REQUIRE_SIGNATURE": "true"})
    path.write_text("models:\n  trusted_keys: [keys/facility.key]\n")  # the private half
    with pytest.raises(ConfigError, match=r"models\.trusted_keys: .*facility\.key: not a"):
        load_config(path, {})
    path.write_text("models:\n  trusted_keys: [keys/missing.pub]\n")
    with pytest.raises(ConfigError, match=r"missing\.pub: not a readable Ed25519 public key"):
        load_config(path, {})


def test_unsigned_bundle_refused_when_signatures_are_required(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path
) -> None:
    """With models.require_signature the unsigned tiny bundle is refused; /health names the
    refusal and the settings, /metrics counts it by reason."""
    from xasflow.models.integrity import generate_keypair

    (tmp_path / "facility.pub").write_bytes(generate_keypair()[1])
    cfg = daemon_config(models_dir, proxy, tmp_path / "store").with_updates(
        {
            "models": {"require_signature": True, "trusted_keys": [str(tmp_path / "facility.pub")]},
            "storage": {"enabled": False},
            "output": {"enabled": False},
        }
    )
    d = Daemon(cfg)
    d.start()
    try:
        assert d.view.models() == []
        health = json.loads(get(f"{d.http_url}/health")[1])
        reg = health["registry"]
        assert reg["serving"] == [] and reg["refusals_by_reason"] == {"signature_missing": 1}
        assert reg["refused"]["cu-k"]["reason"] == "signature_missing"
        assert (reg["require_signature"], reg["require_digest"], reg["trusted_keys"]) == (
            True,
            True,
            1,
        )
        assert health["models_refused"]["cu-k"].startswith("signature_missing: ")
        assert health["counters"]["model_refused_by_reason"] == {"signature_missing": 1}
        text = get(f"{d.http_url}/metrics")[1].decode()
        assert 'xasflow_model_refused_total{reason="signature_missing"} 1.0' in text
        assert "xasflow_model_refusals" not in text  # the labelled counter replaces the gauge
    finally:
        d.stop()


@pytest.mark.parametrize("where", ["below_a_file", "a_file"])
def test_serve_check_warns_of_a_store_path_through_a_file(tmp_path: Path, where: str) -> None:
    """A store directory below a regular file (or the file itself) passed ``--check``, whose
    only test was a writable nearest existing ancestor: the daemon then refused to start
    ("Not a directory"). Expected: the warning ``--check`` gives a store it cannot create."""
    from xasflow.daemon.commands import check_paths
    from xasflow.daemon.config import DaemonConfig

    afile = tmp_path / "afile"
    afile.write_text("")
    store = afile / "sub" if where == "below_a_file" else afile
    config = DaemonConfig.model_validate({"storage": {"directory": str(store)}})
    assert any("cannot be created or written" in w for w in check_paths(config))
    fine = DaemonConfig.model_validate({"storage": {"directory": str(tmp_path / "new" / "s")}})
    assert not any("storage" in w for w in check_paths(fine))


def test_serve_check_prints_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    path = tmp_path / "x.yaml"
    port = free_port()
    path.write_text(f"http:\n  port: {port}\n")
    monkeypatch.setenv("XASFLOW__OUTPUT__ENABLED", "false")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_commands(sub)
    add_demo_command(sub)
    args = parser.parse_args(["serve", "--config", str(path), "--check"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert shown["http"]["port"] == port and shown["output"]["enabled"] is False
    assert shown["channels"]["if"][0] == "If"
    assert "warning" not in captured.err  # the repository's models/ holds the Cu bundle
    # a models directory that is not there passes the schema, but --check says what follows
    monkeypatch.setenv("XASFLOW__MODELS__DIRECTORY", str(tmp_path / "no-models"))
    assert args.func(args) == 0
    assert "no-models does not exist: every spectrum would be rejected" in capsys.readouterr().err
    # so do a taken HTTP port and an EPICS prefix that another IOC serves
    from xasflow.adapters.epics_ioc import XasIoc

    ca_port = free_port()
    monkeypatch.setenv("XASFLOW__EPICS__ENABLED", "true")
    monkeypatch.setenv("XASFLOW__EPICS__PORT", str(ca_port))
    with socket.socket() as taken, XasIoc("XAS:", port=ca_port, beacon_port=free_port()) as ioc:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        assert args.func(args) == 0
        err, served = capsys.readouterr().err, f"127.0.0.1:{ioc.tcp_port}"
    assert f"warning: http 127.0.0.1:{port}: Address already in use" in err
    assert f"warning: epics: XAS:BUNDLE_ID is already served by {served} (an IOC" in err
    args = parser.parse_args(["demo", "--scans", "2", "--fly"])
    assert (args.scans, args.fly, args.duration) == (2, True, 0.0)
    for bad in (["--fly-spectra", "0"], ["--scans", "-1"], ["--duration", "-5"]):
        with pytest.raises(SystemExit):  # a usage error naming the argument, no traceback
            parser.parse_args(["demo", *bad])
    assert "--fly-spectra: 0 is below 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- the daemon


def test_step_and_fly_scans_analysed_on_bus_and_in_store(harness: Harness) -> None:
    d = harness.daemon
    before = d.counters.snapshot()
    step_uid, step_docs = step_scan(STEP_GRID, transmission(STEP_GRID, shift=1.5))
    fly_e = np.linspace(8800.0, 9400.0, 1000)
    spectra = [
        transmission(fly_e, shift=-1.0, kind=k, seed=i)
        for i, k in enumerate(("CuO", "Cu2O", "CuO"))
    ]
    fly_uid, fly_docs = fly_scan(fly_e, spectra, {"sample_name": "mixture"})
    publish(harness.pub, step_docs + fly_docs)
    runs = harness.results.wait([step_uid, fly_uid])

    step = runs[step_uid]
    assert step["start"]["raw_uid"] == step_uid and step["start"]["scan_kind"] == "step"
    assert step["start"]["bundle_id"] == d.view.models()[0]["bundle_id"]
    assert [e["status"] for e in step["events"]] == ["ok"]
    ev = step["events"][0]
    assert ev["cn"] in (2, 4, 6) and ev["element"] == "Cu" and ev["edge"] == "K"
    assert ev["energy_shift"] == pytest.approx(1.5, abs=0.3)  # aligned on the foil channel
    assert step["stop"]["exit_status"] == "success" and step["stop"]["n_analysed"] == 1
    fly = runs[fly_uid]
    assert fly["start"]["scan_kind"] == "fly"
    assert [e["index"] for e in fly["events"]] == [0, 1, 2]
    assert all(e["status"] == "ok" for e in fly["events"])
    assert all(e["energy_shift"] == pytest.approx(-1.0, abs=0.3) for e in fly["events"])
    assert fly["stop"]["n_analysed"] == 3
    # recommendations follow analysed spectra, at most one per run per recommend.interval_s
    assert [r["index"] for r in step["recommendations"]] == [0]
    assert fly["recommendations"][0]["index"] == 0 and len(fly["recommendations"]) <= 3

    after = d.counters.snapshot()
    assert after["spectra_analysed"] - before["spectra_analysed"] == 4
    assert after["spectra_received"] - before["spectra_received"] == 4
    # the stored rows equal what was published, readable back by raw uid via tiled
    assert d.parts.store.flush(10)
    for uid, run in runs.items():
        md, rows = read_analysis(d.parts.store, uid)
        assert md["start"]["raw_uid"] == uid and md["stop"]["exit_status"] == "success"
        assert rows["index"].tolist() == [e["index"] for e in run["events"]]
        assert rows["cn"].tolist() == [e["cn"] for e in run["events"]]
        assert rows["distance"].tolist() == pytest.approx([e["distance"] for e in run["events"]])
    assert d.view.echo_dropped > 0  # its own results came back through the proxy and were ignored


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))

    marker = ""


def test_hostile_and_broken_inputs_are_rejected_with_reasons(
    harness: Harness, tmp_path: Path
) -> None:
    d, pub = harness.daemon, harness.pub
    before = d.counters.snapshot()
    # --- wire level: garbage, a port scanner, pickles that are not plain data
    _Evil.marker = str(tmp_path / "pwned")
    pub.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS hello: no spaces
    pub.send_raw(b"GET / HTTP/1.1\r\nHost: daemon\r\n\r\n")
    pub.send_raw(b" start " + pickle.dumps(_Evil(), protocol=4))
    pub.send_raw(b" start " + pickle.dumps({"uid": "x", "time": 1.0, "f": Fraction(1, 3)}))
    pub.send_raw(b" start " + bytes(range(200, 256)))  # random body
    # --- documents: malformed, orphaned
    pub("start", {"time": 1.0})  # no uid
    pub("event", {"descriptor": 42, "uid": "e"})
    pub("stop", {"uid": "s", "run_start": "never-started", "time": 1.0})
    # --- runs that cannot become predictions
    nostop_uid, nostop = step_scan(STEP_GRID, transmission(STEP_GRID), stop=False)
    fe_grid = np.linspace(7000.0, 7400.0, 300)
    fe_uid, fe_docs = fly_scan(fe_grid, [transmission(fe_grid)], {"element": "Fe"})
    nowhere = np.linspace(30000.0, 30100.0, 200)
    unknown_uid, unknown_docs = fly_scan(
        nowhere, [transmission(nowhere)], {"element": None, "edge": None}
    )
    fly_e = np.linspace(8800.0, 9400.0, 800)
    nan_spec = transmission(fly_e)
    nan_spec["It"] = np.full(fly_e.size, np.nan)
    nan_uid, nan_docs = fly_scan(fly_e, [nan_spec, transmission(fly_e, seed=3)])
    for docs in (nostop, fe_docs, unknown_docs, nan_docs):
        publish(pub, docs)
    # --- and after all that, a good scan is still analysed
    good_uid, good_docs = step_scan(STEP_GRID, transmission(STEP_GRID, seed=9))
    publish(pub, good_docs)

    runs = harness.results.wait([fe_uid, unknown_uid, nan_uid, good_uid, nostop_uid])
    assert not Path(_Evil.marker).exists()
    assert runs[good_uid]["events"][0]["status"] == "ok"
    fe_event = runs[fe_uid]["events"][0]
    assert (fe_event["status"], fe_event["reason"]) == ("rejected", "no_model")
    assert "Fe K" in fe_event["detail"]
    assert runs[unknown_uid]["events"][0]["reason"] == "unknown_element"
    assert [(e["index"], e["status"], e["reason"]) for e in runs[nan_uid]["events"]] == [
        (0, "rejected", "nan_data"),
        (1, "ok", ""),
    ]
    nostop_run = runs[nostop_uid]
    assert [e["reason"] for e in nostop_run["events"]] == ["missing_stop"]
    assert nostop_run["stop"]["exit_status"] == "fail"
    assert nostop_run["stop"]["raw_exit_status"] == "timeout"
    assert nostop_run["stop"]["reason"].startswith("stop_timeout")

    def delta(snap_key: str, *path: str) -> int:
        def dig(s: dict[str, Any]) -> int:
            for p in path:
                s = s.get(p, {})
            return int(s) if isinstance(s, int) else 0

        return dig(after[snap_key]) - dig(before[snap_key])

    def folded() -> dict[str, Any] | None:  # decode errors are folded in every 0.25 s
        now = d.view.health()["counters"]
        n = sum(now["decode_errors"].values()) - sum(before["decode_errors"].values())
        return now if n >= 5 else None

    after = wait_for(folded, "the decode errors to be counted", DEADLINE_S)
    assert delta("decode_errors", "bad_framing") == 1
    assert delta("decode_errors", "unknown_document") == 1
    assert delta("decode_errors", "forbidden_global") == 2
    assert delta("decode_errors", "msgpack_invalid") == 1
    assert delta("rejected_by_stage", "assembly", "malformed_document") == 2
    assert delta("rejected_by_stage", "assembly", "unknown_run") == 1
    assert delta("rejected_by_stage", "assembly", "missing_stop") == 1
    assert delta("rejected_by_stage", "assembly", "nan_data") == 1
    assert delta("rejected_by_stage", "analysis", "no_model") == 1
    assert delta("rejected_by_stage", "analysis", "unknown_element") == 1
    assert after["spectra_analysed"] - before["spectra_analysed"] == 2
    assert after["runs_closed"]["timeout"] >= 1
    assert d.view.ready and d.view.health()["internal_errors"] == 0


def test_metrics_and_health_endpoints(harness: Harness) -> None:
    d = harness.daemon
    uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID, seed=4))
    publish(harness.pub, docs)
    harness.results.wait([uid])
    wait_for(lambda: d.view.store_stats().get("stored", 0) >= 1, "the store to commit a row")
    status, body = get(f"{d.http_url}/health")
    assert status == 200
    health = json.loads(body)
    snap = d.counters.snapshot()
    assert health["ready"] is True and health["serving"] is True and health["uptime_s"] > 0
    assert health["counters"]["spectra_analysed"] == snap["spectra_analysed"] >= 1
    assert health["models"][0]["element"] == "Cu" and health["models"][0]["edge"] == "K"
    assert health["queue_depth"] == 0
    assert health["input"]["decode_errors"] == sum(snap["decode_errors"].values())
    assert health["store"]["stored"] >= 1
    reg = health["registry"]
    assert [m["bundle_id"] for m in reg["serving"]] == [health["models"][0]["bundle_id"]]
    assert reg["standby"] == {} and reg["refusals_by_reason"] == {}
    assert (reg["require_digest"], reg["require_signature"], reg["trusted_keys"]) == (
        True,
        False,
        0,
    )
    # the catalog holds every row and the gate every document it was given: the gauges of
    # what waits are 0, exported as the store and the gate count them
    assert d.parts.store is not None and d.parts.store.flush(timeout=30)
    wait_for(lambda: d.view.output_stats()["after_store.held"] == 0, "the gate to empty")
    status, body = get(f"{d.http_url}/metrics")
    assert status == 200
    text = body.decode()
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(lines["xasflow_spectra_analysed_total"]) == snap["spectra_analysed"]
    assert float(lines["xasflow_spectra_received_total"]) == snap["spectra_received"]
    bundle = d.view.models()[0]["bundle_id"]
    assert lines[f'xasflow_model_info{{bundle_id="{bundle}",edge="K",element="Cu"}}'] == "1.0"
    assert float(lines["xasflow_queue_depth"]) == 0.0
    assert float(lines["xasflow_latency_seconds_count"]) == snap["latency"]["count"]
    assert float(lines['xasflow_input_dropped_total{cause="overflow"}']) == 0.0
    assert float(lines['xasflow_store_rows_total{outcome="stored"}']) >= 1
    assert float(lines['xasflow_store_rows_total{outcome="lost"}']) == 0.0
    for cause in ("publish_error", "held_at_close", "delivery_failure"):
        assert float(lines[f'xasflow_output_dropped_total{{cause="{cause}"}}']) == 0.0
    assert float(lines["xasflow_output_released_unstored_total"]) == 0.0
    assert float(lines["xasflow_store_journal_rows"]) == d.view.store_stats()["journal_rows"] == 0
    assert float(lines["xasflow_output_held"]) == d.view.output_stats()["after_store.held"] == 0
    assert float(lines["xasflow_up"]) == 1.0
    assert float(lines["xasflow_internal_errors_total"]) == health["internal_errors"] == 0
    # every decode error and rejection the counters hold is exported with its labels
    for reason, n in snap["decode_errors"].items():
        assert float(lines[f'xasflow_decode_errors_total{{reason="{reason}"}}']) == n
    for stage, reasons in snap["rejected_by_stage"].items():
        for reason, n in reasons.items():
            key = f'xasflow_spectra_rejected_total{{reason="{reason}",stage="{stage}"}}'
            assert float(lines[key]) == n
    # and every known rejection reason and decode error is there from 0 (increase() in the
    # alert rules sees the first one)
    for stage, reason in known_rejections():
        key = f'xasflow_spectra_rejected_total{{reason="{reason}",stage="{stage}"}}'
        assert float(lines[key]) == snap["rejected_by_stage"].get(stage, {}).get(reason, 0)
    for reason in DECODE_ERROR_REASONS:
        key = f'xasflow_decode_errors_total{{reason="{reason}"}}'
        assert float(lines[key]) == snap["decode_errors"].get(reason, 0)
    assert get(f"{d.http_url}/nothing")[0] == 404


def test_an_internal_error_is_on_metrics(harness: Harness) -> None:
    """A document the processing loop dropped on an unexpected error (counted by
    ``Processor``) is exported as ``xasflow_internal_errors_total`` for an alert to see;
    before, only /health said so."""
    d = harness.daemon
    proc = d.parts.processor
    assert proc is not None
    before = proc.internal_errors
    proc.internal_errors += 1  # as Processor.run counts a turn that raised
    try:
        text = get(f"{d.http_url}/metrics")[1].decode()
        found = [ln for ln in text.splitlines() if ln.startswith("xasflow_internal_errors_total ")]
        assert found == [f"xasflow_internal_errors_total {float(before + 1)}"]
    finally:
        proc.internal_errors -= 1


def test_lost_events_are_visible_in_the_stop_health_and_metrics(harness: Harness) -> None:
    """A step scan whose 5th event never arrives: the analysis stop says "partial" (exit
    status fail, the count), /health and /metrics count the loss by cause (issue 13)."""
    d = harness.daemon
    uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID, seed=5))
    events = [i for i, (name, _) in enumerate(docs) if name == "event"]
    del docs[events[4]]
    publish(harness.pub, docs)
    stop = harness.results.wait([uid])[uid]["stop"]
    assert stop["exit_status"] == "fail" and stop["partial"] is True
    assert stop["raw_missing_events"] == 1 and stop["reason"].startswith("partial: 1 raw event")
    health = json.loads(get(f"{d.http_url}/health")[1])
    assert health["events_lost"]["seq_gap"] >= 1 and health["events_lost"]["total"] >= 1
    text = get(f"{d.http_url}/metrics")[1].decode()
    pairs = [x.rsplit(" ", 1) for x in text.splitlines() if x and not x.startswith("#")]
    assert float(dict(pairs)['xasflow_events_lost_total{cause="seq_gap"}']) >= 1


def test_stop_finishes_what_it_holds(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path
) -> None:
    cfg = daemon_config(models_dir, proxy, tmp_path / "store", run_timeout_s=600)
    h = Harness(cfg, proxy)
    try:
        open_uid, open_docs = step_scan(STEP_GRID, transmission(STEP_GRID), stop=False)
        fly_e = np.linspace(8800.0, 9400.0, 1000)
        fly_uid, fly_docs = fly_scan(fly_e, [transmission(fly_e, seed=i) for i in range(20)])
        events = h.daemon.view.input_stats()["documents.event"]  # probes have no events
        publish(h.pub, fly_docs + open_docs)  # the open run's last event is the last message
        events += 20 + STEP_GRID.size
        wait_for(  # received, maybe not analysed
            lambda: h.daemon.view.input_stats()["documents.event"] >= events, "the events to arrive"
        )
        h.daemon.stop()  # what a SIGTERM does
        assert not h.daemon.view.ready
        stats = h.daemon.view.input_stats()
        assert stats["delivered"] == stats["enqueued"] and stats["queue_depth"] == 0
        runs = h.results.wait([open_uid, fly_uid])
    finally:
        h.close()
    assert runs[open_uid]["stop"]["exit_status"] == "abort"
    assert runs[open_uid]["stop"]["reason"] == "shutdown"
    assert [e["reason"] for e in runs[open_uid]["events"]] == ["missing_stop"]
    assert runs[fly_uid]["stop"]["n_analysed"] == 20
    # the store was flushed and closed: read it back from disk
    md, rows = read_analysis(tmp_path / "store", open_uid)
    assert md["stop"]["exit_status"] == "abort" and rows["reason"].tolist() == ["missing_stop"]
    md, rows = read_analysis(tmp_path / "store", fly_uid)
    assert md["stop"]["exit_status"] == "success"
    assert rows["index"].tolist() == list(range(20)) and set(rows["status"]) == {"ok"}


def deploy(bundle: Path, models: Path, daemon: Daemon) -> None:
    """Copy ``bundle`` into the watched ``models`` directory and wait until it serves."""
    import shutil

    shutil.copytree(bundle, models / bundle.name)
    wait_for(daemon.view.models, "the bundle to load")


def test_model_directory_is_watched(models_dir: Path, proxy: LoopbackProxy, tmp_path: Path) -> None:
    """A daemon on an empty models directory runs on (/health ready: started) but serves
    nothing (/health serving false, /readyz 503: every spectrum no_model) until a bundle is
    deployed; /health once said only ready, true throughout."""

    def serving(url: str) -> tuple[bool, bool, int]:
        health = json.loads(get(f"{url}/health")[1])
        return health["ready"], health["serving"], get(f"{url}/readyz")[0]

    empty = tmp_path / "models"
    empty.mkdir()
    cfg = daemon_config(empty, proxy, tmp_path / "store")
    h = Harness(cfg, proxy)
    try:
        url = h.daemon.http_url
        assert url is not None
        assert h.daemon.view.models() == []
        assert serving(url) == (True, False, 503)
        uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID))
        publish(h.pub, docs)
        assert h.results.wait([uid])[uid]["events"][0]["reason"] == "no_model"
        deploy(models_dir / "cu-k", empty, h.daemon)
        assert serving(url) == (True, True, 200)
        uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID))
        publish(h.pub, docs)
        assert h.results.wait([uid])[uid]["events"][0]["status"] == "ok"
    finally:
        h.close()


def test_feedback_recommendations_and_epics_pvs(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon hosts the IOC (epics.enabled): MODEL_OK follows the models, the PVs follow
    the latest analysed spectrum and its recommendations, read by a caproto client."""
    pytest.importorskip("caproto")

    from helpers import free_port as free_ca_port
    from helpers import read_pv as read

    port, repeater = free_ca_port(), free_ca_port()
    for key, value in {
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CA_REPEATER_PORT": str(repeater),
    }.items():
        monkeypatch.setenv(key, value)
    import caproto

    monkeypatch.setattr(caproto, "get_local_address", lambda: "127.0.0.1")
    from caproto.threading.client import Context

    empty = tmp_path / "models"
    empty.mkdir()
    cfg = daemon_config(empty, proxy, tmp_path / "store").with_updates(
        {"epics": {"enabled": True, "prefix": "TST:FLOW:", "port": port}}
    )
    h = Harness(cfg, proxy)
    ctx = Context(timeout=5.0)
    try:
        ioc = h.daemon.parts.ioc
        names = ("cn", "model_ok", "scan_uid", "n_regions", "regions", "e0", "updates")
        pvs = dict(zip(names, ctx.get_pvs(*(ioc.pv(n) for n in names)), strict=True))
        assert read(pvs["model_ok"]) == 0  # no bundle yet
        deploy(models_dir / "cu-k", empty, h.daemon)
        uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID))
        publish(h.pub, docs)
        run = h.results.wait([uid])[uid]
        event = run["events"][0]
        assert event["status"] == "ok"
        # the run's recommendations stream: one after its one spectrum, regions in the window
        (rec,) = run["recommendations"]
        regions = json.loads(rec["waveform"])
        assert len(regions) >= 8 and len(regions) % 4 == 0
        starts, stops = regions[0::4], regions[1::4]
        assert all(a < b for a, b in zip(starts, stops, strict=True))
        assert rec["e0"] == pytest.approx(event["e0"])
        wait_for(lambda: read(pvs["scan_uid"]) == uid, "SCAN_UID to update")
        assert read(pvs["cn"]) == event["cn"] and read(pvs["model_ok"]) == 1
        assert read(pvs["e0"]) == pytest.approx(event["e0"])
        assert read(pvs["n_regions"]) == len(regions) // 4
        assert read(pvs["regions"]) == pytest.approx(regions)
        assert read(pvs["updates"]) >= 1
        feedback = h.daemon.view.health()["feedback"]
        assert feedback["recommend"] is True and feedback["queueserver"] is None
        assert feedback["epics"]["prefix"] == "TST:FLOW:" and feedback["epics"]["running"]
    finally:
        ctx.disconnect()
        h.close()
    assert not h.daemon.parts.ioc.running  # stopped with the daemon


def test_queueserver_needs_credentials_to_be_enabled() -> None:
    with pytest.raises(ConfigError, match=r"queueserver.*zmq_public_key"):
        load_config(None, {"XASFLOW__QUEUESERVER__ENABLED": "true"})
    env = {
        "XASFLOW__QUEUESERVER__ENABLED": "true",
        "XASFLOW__QUEUESERVER__TRANSPORT": "http",
        "XASFLOW__QUEUESERVER__API_KEY": "0123",
    }
    cfg = load_config(None, env)
    assert cfg.queueserver.enabled and cfg.queueserver.api_key is not None
    assert cfg.queueserver.api_key.get_secret_value() == "0123"  # text, not the number 123
    assert "0123" not in cfg.model_dump_json()  # never shown by serve --check


_SERVE = """
import argparse, sys
from xasflow.daemon.commands import add_commands
parser = argparse.ArgumentParser(prog="xasflow")
add_commands(parser.add_subparsers(dest="cmd", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_serve_runs_until_sigterm_and_drains(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path
) -> None:
    port = free_port()
    conf = tmp_path / "xasflow.yaml"
    conf.write_text(
        f"input:\n  address: {proxy.out_address}\n"
        f"output:\n  address: {proxy.in_address}\n  prefix: {ANALYSIS}\n"
        f"models:\n  directory: {models_dir}\n"
        "storage:\n  directory: store\n"  # relative to the config file
        "analysis:\n  run_timeout_s: 600\n"
    )
    env = {**os.environ, "XASFLOW__HTTP__PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, "serve", "--config", str(conf), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pub = ZmqDocumentPublisher(proxy.in_address)
    results = Results(proxy.out_address)
    try:
        health_url = f"http://127.0.0.1:{port}/health"
        deadline = time.monotonic() + 60
        while get_ok(health_url) is None:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "daemon never became ready"
            time.sleep(0.1)

        def seen(token: str) -> bool:
            body = get_ok(health_url)
            return body is not None and token in body["probes"]["tokens"]

        warm_up(pub, seen, results)
        done_uid, done_docs = step_scan(STEP_GRID, transmission(STEP_GRID))
        open_uid, open_docs = step_scan(STEP_GRID, transmission(STEP_GRID), stop=False)
        publish(pub, open_docs + done_docs)
        results.wait([done_uid])  # so the open run's documents were all received before it
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        runs = results.wait([done_uid, open_uid])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close()
        results.close()
    assert runs[open_uid]["stop"]["reason"] == "shutdown"
    md, rows = read_analysis(tmp_path / "store", open_uid)
    assert md["stop"]["exit_status"] == "abort" and rows["reason"].tolist() == ["missing_stop"]
    md, rows = read_analysis(tmp_path / "store", done_uid)
    assert rows["status"].tolist() == ["ok"]


def get_ok(url: str) -> dict[str, Any] | None:
    """The JSON body of a 200 response, else None (not up yet, or not ready)."""
    try:
        status, body = get(url)
    except OSError:
        return None
    return json.loads(body) if status == 200 else None


def test_store_fanout_keeps_the_primary_stream_only() -> None:
    from xasflow.adapters.store_writer import StoreWriter

    class FakeStore:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def open_run(self, raw_uid: str, start: dict, descriptor: dict) -> None:
            self.calls.append(("open", raw_uid, descriptor["name"]))

        def add_events(self, raw_uid: str, rows: list[dict], **acks: Any) -> list[bool]:
            self.calls.extend(("row", raw_uid, row["seq_num"], row["cn"]) for row in rows)
            return [True] * len(rows)

        def close_run(self, raw_uid: str, stop: dict) -> None:
            self.calls.append(("close", raw_uid, stop["exit_status"]))

    store = FakeStore()
    fan = StoreWriter(store)
    run = compose_run(metadata={"raw_uid": "raw-1"})
    keys = {"cn": {"source": "x", "dtype": "integer", "shape": []}}
    primary = run.compose_descriptor(name="primary", data_keys=keys)
    advice = run.compose_descriptor(
        name="recommendations", data_keys={"next": {"source": "x", "dtype": "string", "shape": []}}
    )
    fan("start", run.start_doc)
    fan("descriptor", primary.descriptor_doc)
    fan("event", primary.compose_event(data={"cn": 4}, timestamps={"cn": 0.0}))
    fan("descriptor", advice.descriptor_doc)
    fan("event", advice.compose_event(data={"next": "rescan"}, timestamps={"next": 0.0}))
    fan(
        "event_page",
        primary.compose_event_page(
            data={"cn": [2, 6]}, timestamps={"cn": [0.0, 0.0]}, seq_num=[2, 3]
        ),
    )
    fan("stop", run.compose_stop())
    assert store.calls == [
        ("open", "raw-1", "primary"),
        ("row", "raw-1", 1, 4),
        ("row", "raw-1", 2, 2),
        ("row", "raw-1", 3, 6),
        ("close", "raw-1", "success"),
    ]
    assert fan.unstored == 0 and fan.open_runs == 0


@pytest.mark.parametrize("journal", [False, True])
def test_after_store_publishes_nothing_the_store_does_not_hold(
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path, journal: bool
) -> None:
    """With output.after_store, every result on the bus is already acknowledged by the store
    (issue 13: "published but never stored"); the stop arrives only after its rows. Checked
    as each document goes to the publisher: without the journal a row is acknowledged only
    when the catalog commits it (0.3 s batches), so a gate that did not hold would publish
    rows not yet acknowledged; with it, the journal acknowledges them first."""
    cfg = daemon_config(models_dir, proxy, tmp_path / "store").with_updates(
        {
            "output": {"after_store": True},
            "storage": {"flush_interval_s": 0.3, "journal": journal},
        }
    )
    h = Harness(cfg, proxy)
    try:
        gate = h.daemon.parts.gate
        assert gate is not None
        publish_now = gate.publish
        seen: list[tuple[int, int]] = []  # (rows published so far, acknowledged then)
        stored: set[str] = set()  # descriptors of the stored stream (recommendations are not)

        def publish_checked(name: str, doc: dict[str, Any]) -> None:
            if name == "descriptor" and doc.get("name") == "primary":
                stored.add(doc["uid"])
            if name in ("event", "event_page") and doc["descriptor"] in stored:
                rows = len(doc["seq_num"]) if name == "event_page" else 1
                published = (seen[-1][0] if seen else 0) + rows
                seen.append((published, h.daemon.view.store_stats()["acknowledged"]))
            publish_now(name, doc)

        gate.publish = publish_checked
        fly_e = np.linspace(8800.0, 9400.0, 600)
        uid, docs = fly_scan(fly_e, [transmission(fly_e, seed=i) for i in range(6)])
        publish(h.pub, docs)
        run = h.results.wait([uid])[uid]
        assert seen and seen[-1][0] == 6
        assert all(acked >= published for published, acked in seen), seen
        stats = h.daemon.view.store_stats()
        assert stats["acknowledged"] == 6 and stats["journalled"] == (6 if journal else 0)
        assert h.daemon.parts.store is not None and h.daemon.parts.store.flush(timeout=30)
        _md, rows = read_analysis(tmp_path / "store", uid)
        assert len(rows) == len(run["events"]) == 6
        out = h.daemon.view.output_stats()
        assert out["after_store.released_unstored"] == 0 and out["after_store.held"] == 0
    finally:
        h.close()


def test_output_losses_are_exported_by_cause() -> None:
    """What the commit gate and a Kafka producer could not publish reaches /metrics."""
    from xasflow.daemon.http import _output_losses

    stats = {
        "after_store.publish_errors": 2,
        "after_store.dropped_on_close": 5,
        "after_store.released_unstored": 7,
        "after_store.held": 3,
        "delivery_failures": 1,
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in _output_losses(stats)
        for s in family.samples
    }
    assert samples[("xasflow_output_dropped_total", (("cause", "publish_error"),))] == 2
    assert samples[("xasflow_output_dropped_total", (("cause", "held_at_close"),))] == 5
    assert samples[("xasflow_output_dropped_total", (("cause", "delivery_failure"),))] == 1
    assert samples[("xasflow_output_released_unstored_total", ())] == 7
    assert samples[("xasflow_output_held", ())] == 3


def test_commit_gate_holds_documents_until_their_rows_commit() -> None:
    from xasflow.adapters.commit_gate import CommitGate

    sent: list[str] = []
    gate = CommitGate(lambda name, doc: sent.append(doc["uid"]), timeout_s=30.0)
    try:
        gate("start", {"uid": "s"})  # no rows before it: goes out at once
        wait_for(lambda: sent == ["s"], "the start")
        gate.row_submitted()
        gate.row_submitted()
        gate("event", {"uid": "e1"})
        gate("stop", {"uid": "x"})
        assert gate.stats()["held"] == 2 and sent == ["s"]  # its rows are not committed
        gate.row_resolved()
        gate.row_resolved()
        wait_for(lambda: sent == ["s", "e1", "x"], "the rest, in order")
    finally:
        gate.close()
    late = CommitGate(lambda name, doc: sent.append(doc["uid"]), timeout_s=0.2)
    try:  # a store that never commits: published after the timeout, and counted
        late.row_submitted()
        late("event", {"uid": "e2"})
        wait_for(lambda: "e2" in sent, "the timed-out document")
        assert late.stats()["released_unstored"] == 1
    finally:
        late.close()
