"""Restart under load: ``xasflow serve`` SIGKILLed in the middle of a fly scan, then restarted.

Real parts on loopback: bluesky's 0MQ proxy (subprocess), two ``xasflow serve`` processes one
after the other on the same embedded tiled store, and a fly scan published with the project's
bluesky-compatible ``ZmqDocumentPublisher`` (no RunEngine: the stream must outlive a daemon).

What must hold: every result the first daemon had acknowledged as stored (``/health``
``store.acknowledged``: rows whose store transaction committed) is in the catalog after the
restart, once, equal to what was published; and the second daemon reports the gap: the
interrupted analysis run is closed (exit_status "fail", ``interrupted``) when the raw run's
stop arrives, with ``raw_missing_events`` = raw spectra - spectra stored, and the raw events it
received of that run (whose descriptor it never saw) are counted ``unknown_descriptor``.
"""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("bluesky")
pytest.importorskip("tiled")

from event_model import compose_run
from helpers import Results as BusResults
from helpers import daemon_health, free_port, serve_subprocess, wait_for
from synthetic_feff import model_mu

from xasflow import paths
from xasflow.adapters.probes import PROBE_KEY
from xasflow.adapters.tiled_store import read_analysis
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher

ANALYSIS = "xasflow-analysis"
DEADLINE_S = 60.0
CU_K = 8978.9
ENERGY = np.linspace(8800.0, 9120.0, 1000)

PROXY_SCRIPT = """
from bluesky.callbacks.zmq import Proxy
proxy = Proxy("tcp://127.0.0.1", "tcp://127.0.0.1")
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_dir() -> Path:
    """The shipped models/; a shipped Cu K bundle that does not verify fails the test."""
    from xasflow.models.bundle import BundleError, verify_bundle

    shipped = paths.REPO_ROOT / "models"
    try:
        verify_bundle(shipped / "cu-k")
    except (BundleError, OSError) as exc:
        pytest.fail(f"the shipped bundle {shipped / 'cu-k'} does not verify: {exc}")
    return shipped


@pytest.fixture
def proxy() -> Iterator[tuple[str, str]]:
    """bluesky's 0MQ Proxy in a subprocess: (address to publish to, address to subscribe to)."""
    proc = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(30), "the proxy did not start"
        in_address, out_address = proc.stdout.readline().split()  # bluesky prints addresses
        yield in_address, out_address
    finally:
        _end(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- helpers


def _end(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def channels(seed: int) -> dict[str, np.ndarray]:
    """I0/It/Ir of a Cu spectrum (white line, EXAFS wiggles) and a Cu foil, with noise."""
    rng = np.random.default_rng(seed)
    mu = model_mu(ENERGY, CU_K + 4.0, 1.6, 6.0, 1.95)
    ref = 0.5 + np.arctan((ENERGY - CU_K) / 1.5) / np.pi
    i0 = 1e9 * (1 + 0.01 * rng.standard_normal(ENERGY.size))
    it = i0 * np.exp(-mu - 0.3)
    return {"I0": i0, "It": it, "Ir": it * np.exp(-ref)}


class Results(BusResults):
    """Analysis documents on the bus (analysis prefix), in arrival order."""

    def run(self, raw_uid: str) -> dict[str, Any]:
        """The analysis run of ``raw_uid``: start, primary events (data by seq_num), stop."""
        with self._lock:
            docs = list(self.docs)
        start = next((d for n, d in docs if n == "start" and d.get("raw_uid") == raw_uid), None)
        if start is None:
            return {"start": None, "events": {}, "stop": None}
        descs = {
            d["uid"]
            for n, d in docs
            if n == "descriptor" and d["run_start"] == start["uid"] and d["name"] == "primary"
        }
        events = {
            d["seq_num"]: d["data"] for n, d in docs if n == "event" and d["descriptor"] in descs
        }
        stop = next((d for n, d in docs if n == "stop" and d["run_start"] == start["uid"]), None)
        return {"start": start, "events": events, "stop": stop}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.source.close()


def warm_up(pub: ZmqDocumentPublisher, seen: Callable[[str], bool]) -> None:
    """Probe runs until ``seen(token)`` (0MQ's slow joiner: a new subscriber misses messages)."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + DEADLINE_S
    for i in range(1_000_000):
        uid = f"xasflow-probe-{token}-{i}"
        pub("start", {"uid": uid, "time": time.time(), PROBE_KEY: token})
        pub("stop", {"uid": f"{uid}-stop", "run_start": uid, "time": time.time()})
        if seen(token):
            return
        assert time.monotonic() < deadline, "warm-up probes never arrived"
        time.sleep(0.05)


class FlyScan(threading.Thread):
    """A fly run published event by event (``period`` s apart) until :meth:`finish` is called;
    then ``tail`` more events and the stop."""

    def __init__(self, pub: ZmqDocumentPublisher, period: float = 0.025, tail: int = 20) -> None:
        super().__init__(daemon=True)
        self.pub = pub
        self.period = period
        self.tail = tail
        self.bundle = compose_run(metadata={"element": "Cu", "edge": "K", "xas_scan": "fly"})
        self.uid: str = self.bundle.start_doc["uid"]
        keys = {
            k: {"source": "sim", "dtype": "array", "shape": [ENERGY.size]}
            for k in ("energy", "I0", "It", "Ir")
        }
        self.desc = self.bundle.compose_descriptor(name="primary", data_keys=keys)
        self.sent = 0
        self._finish = threading.Event()
        self.done = threading.Event()

    def finish(self) -> None:
        self._finish.set()

    def run(self) -> None:
        self.pub("start", self.bundle.start_doc)
        self.pub("descriptor", self.desc.descriptor_doc)
        remaining = None
        while remaining is None or remaining > 0:
            if remaining is None and self._finish.is_set():
                remaining = self.tail
            data = {"energy": ENERGY, **channels(self.sent)}
            now = time.time()
            event = self.desc.compose_event(
                data=data, timestamps=dict.fromkeys(data, now), time=now, validate=False
            )
            self.pub("event", event)
            self.sent += 1
            if remaining is not None:
                remaining -= 1
            time.sleep(self.period)
        self.pub("stop", self.bundle.compose_stop(exit_status="success"))
        self.done.set()


# --------------------------------------------------------------------------- the test


def test_sigkill_mid_run_loses_no_acknowledged_result_and_reports_the_gap(
    models_dir: Path, proxy: tuple[str, str], tmp_path: Path
) -> None:
    in_address, out_address = proxy
    conf = tmp_path / "xasflow.yaml"
    conf.write_text(
        f"input:\n  address: {out_address}\n"
        f"output:\n  address: {in_address}\n  prefix: {ANALYSIS}\n"
        f"models:\n  directory: {models_dir}\n  watch: false\n"
        "storage:\n  directory: store\n  flush_interval_s: 0.05\n  batch_size: 16\n"
        "analysis:\n  run_timeout_s: 120\n"
    )
    port = free_port()
    log = tmp_path / "daemon.log"
    procs: list[subprocess.Popen[bytes]] = []
    pub = ZmqDocumentPublisher(in_address)
    echo = ZmqDocumentPublisher(in_address, prefix=ANALYSIS.encode())
    results = Results(out_address)
    scan = FlyScan(pub)
    try:
        procs.append(serve_subprocess(conf, port, log))

        def seen_by_both(token: str) -> bool:
            echo("start", {"uid": token, "time": time.time(), PROBE_KEY: token})
            body = daemon_health(port) or {}
            return token in body.get("probes", {}).get("tokens", []) and token in results.probes

        warm_up(pub, seen_by_both)

        # ---- stream, then SIGKILL once some results are acknowledged as stored
        scan.start()
        acked = wait_for(
            lambda: (h := daemon_health(port)) and h["store"]["acknowledged"] >= 30 and h,
            "30 acknowledged results",
        )["store"]["acknowledged"]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(30)
        # what reached the bus before the kill: stored first (publish-after-store); the rows of
        # the last page stored before the kill may never have been published (0MQ is
        # at-most-once, and a page is published once all its rows are stored)
        published = results.run(scan.uid)["events"]
        assert scan.is_alive() and published

        # ---- restart on the same store while the scan goes on
        procs.append(serve_subprocess(conf, port, log))
        warm_up(pub, lambda t: t in (daemon_health(port) or {}).get("probes", {}).get("tokens", []))
        scan.finish()  # ``tail`` more events reach the new daemon, then the raw stop
        assert scan.done.wait(DEADLINE_S)
        stop = wait_for(lambda: results.run(scan.uid)["stop"], "the interrupted run's stop")
        h2 = daemon_health(port)
        assert h2 is not None

        # ---- the new daemon still analyses new runs
        follow = FlyScan(pub, period=0.0, tail=4)
        follow.finish()
        follow.start()
        follow_stop = wait_for(lambda: results.run(follow.uid)["stop"], "the follow-up run")
        _end(procs[1])  # SIGTERM: drains and closes the store
        assert procs[1].returncode == 0, log.read_text()[-3000:]
    finally:
        scan.finish()
        for proc in procs:
            _end(proc, signal.SIGKILL)
        pub.close()
        echo.close()
        results.close()

    # Every acknowledged result is in the catalog, once; every published one too, as published.
    md, rows = read_analysis(tmp_path / "store", scan.uid)
    seqs = rows["seq_num"].tolist()
    assert len(set(seqs)) == len(seqs) and len(set(rows["index"])) == len(rows)
    assert set(range(1, acked + 1)) <= set(seqs)  # rows commit in order: the first ``acked``
    assert set(published) <= set(seqs)  # nothing was published that was not stored first
    for row in rows.to_dict("records"):
        sent = published.get(row["seq_num"])
        if sent is None:  # stored just before the kill, never on the bus
            continue
        assert (row["index"], row["status"]) == (sent["index"], sent["status"])
        if sent["status"] == "ok":
            assert (row["cn"], row["motif"]) == (sent["cn"], sent["motif"])
            assert row["distance"] == pytest.approx(sent["distance"])
    stored = len(rows)
    # The gap is reported: on the bus and in the catalog, under the original analysis start.
    assert md["start"]["uid"] == stop["run_start"]
    for doc in (stop, md["stop"]):
        assert doc["exit_status"] == "fail" and doc["interrupted"] is True
        assert doc["reason"].startswith("interrupted: the daemon restarted")
        assert doc["raw_exit_status"] == "success"
        assert doc["raw_missing_events"] == scan.sent - stored
        assert doc["num_events"] == {"primary": stored}
    assert h2["interrupted"]["open"] == []
    assert h2["interrupted"]["closed"] == [
        {
            "raw_uid": scan.uid,
            "stored": stored,
            "raw_spectra": scan.sent,
            "missing": scan.sent - stored,
            "raw_exit_status": "success",
        }
    ]
    # Raw events of the interrupted run that reached the new daemon: unknown descriptor.
    unknown = h2["counters"]["rejected_by_stage"]["assembly"].get("unknown_descriptor", 0)
    assert scan.tail <= unknown <= scan.sent - stored
    assert h2["counters"]["runs_closed"].get("interrupted") == 1
    # ... and the follow-up run went through the restarted daemon normally.
    assert follow_stop["exit_status"] == "success"
    assert follow_stop["n_analysed"] + follow_stop["n_rejected"] == follow.sent
    md2, rows2 = read_analysis(tmp_path / "store", follow.uid)
    assert md2["stop"]["exit_status"] == "success" and len(rows2) == follow.sent
