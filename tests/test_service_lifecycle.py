"""The daemon's lifecycle: stop and SIGTERM drain, models watched or refused, EPICS feedback.

The session's tiny Cu K bundle (conftest, synthetic FEFF tree) serves; documents are
composed here with event-model and published with ``ZmqDocumentPublisher`` through an
in-process 0MQ forwarder (SUB/PUB, like bluesky's proxy), so no ophyd or RunEngine is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from epics_support import CaPorts
from helpers import (
    ANALYSIS,
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
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher
from xasflow.daemon.service import Daemon


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
        # and the refusal that holds now, for an alert that lasts while the bundle stays
        assert (
            'xasflow_model_refused_current{directory="cu-k",reason="signature_missing"} 1.0' in text
        )
        assert "xasflow_model_refusals" not in text  # the labelled counter replaces the gauge
    finally:
        d.stop()


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
    models_dir: Path, proxy: LoopbackProxy, tmp_path: Path, ca_loopback: CaPorts
) -> None:
    """The daemon hosts the IOC (epics.enabled): MODEL_OK follows the models, the PVs follow
    the latest analysed spectrum and its recommendations, read by a caproto client."""
    from caproto.threading.client import Context
    from helpers import read_pv as read

    empty = tmp_path / "models"
    empty.mkdir()
    cfg = daemon_config(empty, proxy, tmp_path / "store").with_updates(
        {"epics": {"enabled": True, "prefix": "TST:FLOW:", "port": ca_loopback.port}}
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
