"""Helpers shared by the daemon's tests: condition waits, free ports, composed analysis runs,
a loopback 0MQ proxy, a bus results collector, synthetic step and fly scans.

Imported as ``from helpers import ...`` (the tests directory is on ``sys.path``, as for
``synthetic_feff``). Waits poll a condition and fail with what they waited for; no test
sleeps a fixed time before an assertion.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import zmq
from event_model import compose_run, unpack_event_page
from synthetic_feff import model_mu

from xasflow.adapters.probes import PROBE_KEY
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.service import Daemon

Docs = list[tuple[str, dict[str, Any]]]

__all__ = [
    "ANALYSIS",
    "CU_K",
    "DEADLINE_S",
    "STEP_GRID",
    "Docs",
    "Harness",
    "LoopbackProxy",
    "Results",
    "analysis_run_docs",
    "burst_docs",
    "daemon_config",
    "daemon_health",
    "fly_scan",
    "free_port",
    "get",
    "publish",
    "raw_uids",
    "read_pv",
    "serve_subprocess",
    "step_scan",
    "transmission",
    "wait_for",
    "warm_up",
]


def wait_for(
    check: Callable[[], Any], what: str = "", timeout: float = 20.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or check}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_KEY = {"source": "test", "dtype": "number", "shape": []}


def analysis_run_docs(
    events: Sequence[tuple[str, Mapping[str, Any]]],
    raw_uid: str = "raw-run-7",
    metadata: Mapping[str, Any] | None = None,
    stop: Mapping[str, Any] | None = None,
) -> Docs:
    """An analysis run composed with event-model: start, one descriptor per stream named in
    ``events`` (``primary`` first), the events (``(stream, data)``) in order, and the stop.

    Each stream's data keys are the union of its events' keys (absent values None);
    ``stop`` adds fields to the stop document (e.g. ``exit_status``, ``raw_missing_events``).
    """
    run = compose_run(metadata={"analysis": "xasflow", "raw_uid": raw_uid, **(metadata or {})})
    keys: dict[str, list[str]] = {"primary": []}
    for stream, data in events:
        known = keys.setdefault(stream, [])
        known.extend(k for k in data if k not in known)
    docs: Docs = [("start", dict(run.start_doc))]
    composers = {}
    for stream, names in keys.items():
        desc = run.compose_descriptor(name=stream, data_keys=dict.fromkeys(names, _KEY))
        composers[stream] = desc.compose_event
        docs.append(("descriptor", dict(desc.descriptor_doc)))
    for stream, data in events:
        row = {k: data.get(k) for k in keys[stream]}
        docs.append(
            ("event", dict(composers[stream](data=row, timestamps=dict.fromkeys(row, 0.0))))
        )
    stop = dict(stop or {})
    exit_status = stop.pop("exit_status", "success")
    docs.append(("stop", {**run.compose_stop(exit_status=exit_status), **stop}))
    return docs


def read_pv(pv: Any) -> Any:
    """A caproto client PV's value: a scalar (strings decoded) or a list."""
    data = pv.read(timeout=5.0).data
    value = data[0] if len(data) == 1 else list(data)
    return value.decode() if isinstance(value, bytes) else value


def unpaged(docs: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``docs`` with each event page unpacked into its events (the daemon pages a batch)."""
    out: list[tuple[str, Any]] = []
    for name, doc in docs:
        if name == "event_page":
            out.extend(("event", e) for e in unpack_event_page(doc))
        else:
            out.append((name, doc))
    return out


def raw_uids(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str | None]:
    """The raw run uid each analysis document belongs to (None for a run never started)."""
    by_start: dict[str, str] = {}
    by_descriptor: dict[str, str] = {}
    out: list[str | None] = []
    for name, doc in docs:
        if name == "start":
            by_start[doc["uid"]] = doc["raw_uid"]
            out.append(doc["raw_uid"])
        elif name in ("descriptor", "stop"):
            raw = by_start.get(doc["run_start"])
            if name == "descriptor" and raw is not None:
                by_descriptor[doc["uid"]] = raw
            out.append(raw)
        else:
            out.append(by_descriptor.get(doc["descriptor"]))
    return out


# --------------------------------------------------------------------------- a daemon on a loopback bus

CU_K = 8978.9

#: An analysis descriptor for the store's own tests: each column type the store maps.
STORE_DESCRIPTOR = {
    "uid": "d-1",
    "name": "primary",
    "data_keys": {
        "cn": {"dtype": "integer", "source": "t", "shape": []},
        "distance": {"dtype": "number", "source": "t", "shape": []},
        "status": {"dtype": "string", "source": "t", "shape": []},
        "motifs": {"dtype": "array", "source": "t", "shape": [3]},
    },
}


def store_row(seq: int, **extra: object) -> dict:
    """A row of :data:`STORE_DESCRIPTOR` (``extra`` adds or replaces columns)."""
    return {"seq_num": seq, "time": 1.0 + seq, "cn": 4, "distance": 1.95, "status": "ok", **extra}


DEADLINE_S = 20.0
ANALYSIS = "xasflow-analysis"


class LoopbackProxy:
    """bluesky's proxy in miniature: a SUB bound for publishers forwarding to a PUB bound for
    subscribers, in a thread (``zmq.proxy``); ``close()`` ends it."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        front = self.ctx.socket(zmq.SUB)
        back = self.ctx.socket(zmq.PUB)
        for sock in (front, back):
            sock.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.RCVHWM, 100_000)
        back.setsockopt(zmq.SNDHWM, 100_000)
        front.setsockopt(zmq.SUBSCRIBE, b"")
        self.in_address = f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}"
        self.out_address = f"tcp://127.0.0.1:{back.bind_to_random_port('tcp://127.0.0.1')}"

        def run() -> None:
            try:
                zmq.proxy(front, back)
            except zmq.ContextTerminated:
                pass
            finally:
                front.close(0)
                back.close(0)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.ctx.term()
        self.thread.join(5)


class Results:
    """Analysis documents on the bus (subscribed on the analysis prefix), grouped by raw run."""

    def __init__(self, address: str) -> None:
        self.source = ZmqDocumentSource(ZmqInputConfig(address=address, prefix=ANALYSIS.encode()))
        self.source.start()
        self.docs: Docs = []
        self.probes: set[str] = set()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.source.get(timeout=0.05)
            if item is None:
                continue
            with self._lock:
                if PROBE_KEY in item[1]:
                    self.probes.add(item[1][PROBE_KEY])
                else:
                    self.docs.append(item)
                self._lock.notify_all()

    def runs(self) -> dict[str, dict[str, Any]]:
        """raw uid -> {"start", "descriptor", "events", "recommendations", "stop"} of the
        analysis runs seen (``events``: the primary stream's data)."""
        with self._lock:
            docs = unpaged(self.docs)
        by_start: dict[str, dict[str, Any]] = {}
        by_desc: dict[str, list[dict[str, Any]]] = {}
        for name, doc in docs:
            if name == "start":
                by_start[doc["uid"]] = {
                    "start": doc,
                    "events": [],
                    "recommendations": [],
                    "stop": None,
                }
            elif name == "descriptor":
                run = by_start[doc["run_start"]]
                if doc["name"] == "primary":
                    run["descriptor"] = doc
                    by_desc[doc["uid"]] = run["events"]
                else:
                    by_desc[doc["uid"]] = run.setdefault(doc["name"], [])
            elif name == "event":
                by_desc[doc["descriptor"]].append(doc["data"])
            elif name == "stop":
                by_start[doc["run_start"]]["stop"] = doc
        return {run["start"]["raw_uid"]: run for run in by_start.values()}

    def wait(self, raw_uids: list[str], timeout: float = DEADLINE_S) -> dict[str, dict[str, Any]]:
        """The finished analysis runs of ``raw_uids`` (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs()
            if all(u in runs and runs[u]["stop"] is not None for u in raw_uids):
                return {u: runs[u] for u in raw_uids}
            assert time.monotonic() < deadline, f"analysis runs missing; have {list(runs)}"
            with self._lock:
                self._lock.wait(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.source.close()


def warm_up(pub: ZmqDocumentPublisher, seen_by_daemon: Any, results: Results) -> None:
    """Probe runs until the daemon and the results subscriber both see them (slow joiner)."""
    token = uuid.uuid4().hex
    echo = ZmqDocumentPublisher(pub.endpoint, prefix=ANALYSIS.encode())
    try:
        deadline = time.monotonic() + DEADLINE_S
        for i in range(100_000):
            uid = f"probe-{token}-{i}"
            pub("start", {"uid": uid, "time": time.time(), PROBE_KEY: token})
            pub("stop", {"uid": f"{uid}-stop", "run_start": uid, "time": time.time()})
            echo("start", {"uid": uid, "time": time.time(), PROBE_KEY: token})
            if seen_by_daemon(token) and token in results.probes:
                return
            assert time.monotonic() < deadline, "warm-up: probes never arrived"
            time.sleep(0.02)
    finally:
        echo.close()


def transmission(
    energy: np.ndarray,
    *,
    shift: float = 0.0,
    kind: str = "CuO",
    seed: int = 0,
    edge: float = CU_K,
) -> dict[str, np.ndarray]:
    """I0, It, Ir counts of a synthetic spectrum (training-like) with its edge at ``edge``
    (Cu K by default) and a foil of the same metal, both on a mono reading ``shift`` eV low."""
    height, width, e_shift, nn = {"CuO": (1.6, 6.0, 4.0, 2.1), "Cu2O": (0.6, 3.0, 0.0, 1.85)}[kind]
    true = energy + shift
    rng = np.random.default_rng(seed)
    mu = model_mu(true, edge + e_shift, height, width, nn)
    ref = 0.5 + np.arctan((true - edge) / 1.5) / np.pi
    i0 = 1e9 * (1 + 0.01 * rng.standard_normal(energy.size))
    it = i0 * np.exp(-mu - 0.3)
    return {"I0": i0, "It": it, "Ir": it * np.exp(-ref)}


STEP_GRID = np.concatenate(
    (np.arange(8800.0, 8960.0, 5.0), np.arange(8960.0, 9040.0, 0.5), np.arange(9040.0, 9400, 4.0))
)


def step_scan(
    energy: np.ndarray,
    channels: dict[str, np.ndarray],
    md: dict[str, Any] | None = None,
    *,
    stop: bool = True,
) -> tuple[str, Docs]:
    """A step scan's documents: one scalar event per energy."""
    run = compose_run(metadata={"element": "Cu", "edge": "K", **(md or {})})
    keys = {k: {"source": "sim", "dtype": "number", "shape": []} for k in ("energy", *channels)}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, e in enumerate(energy):
        data = {"energy": float(e), **{k: float(v[i]) for k, v in channels.items()}}
        now = time.time()
        docs.append(
            (
                "event",
                desc.compose_event(data=data, timestamps=dict.fromkeys(data, now), seq_num=i + 1),
            )
        )
    if stop:
        docs.append(("stop", run.compose_stop()))
    return run.start_doc["uid"], docs


def fly_scan(
    energy: np.ndarray, spectra: list[dict[str, np.ndarray]], md: dict[str, Any] | None = None
) -> tuple[str, Docs]:
    """A fly scan's documents: one event per whole spectrum (array data keys)."""
    run = compose_run(metadata={"element": "Cu", "edge": "K", **(md or {})})
    n = energy.size
    keys = {k: {"source": "sim", "dtype": "array", "shape": [n]} for k in ("energy", *spectra[0])}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, channels in enumerate(spectra):
        data = {"energy": energy, **channels}
        now = time.time()
        docs.append(
            (
                "event",
                desc.compose_event(data=data, timestamps=dict.fromkeys(data, now), seq_num=i + 1),
            )
        )
    docs.append(("stop", run.compose_stop()))
    return run.start_doc["uid"], docs


def publish(pub: ZmqDocumentPublisher, docs: Docs) -> None:
    for name, doc in docs:
        pub(name, doc)


def daemon_config(
    models_dir: Path, proxy: LoopbackProxy, store: Path, **analysis: Any
) -> DaemonConfig:
    return DaemonConfig().with_updates(
        {
            "input": {"address": proxy.out_address},
            "output": {"address": proxy.in_address, "prefix": ANALYSIS},
            "models": {"directory": str(models_dir), "watch_interval_s": 0.5},
            "storage": {"directory": str(store), "flush_interval_s": 0.05},
            "http": {"port": 0},
            "analysis": analysis,
        }
    )


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Harness:
    """A started Daemon with a publisher and a results subscriber, warmed up."""

    def __init__(self, config: DaemonConfig, proxy: LoopbackProxy) -> None:
        self.daemon = Daemon(config)
        self.daemon.start()
        self.pub = ZmqDocumentPublisher(proxy.in_address)
        self.results = Results(proxy.out_address)
        warm_up(
            self.pub, lambda t: t in self.daemon.view.health()["probes"]["tokens"], self.results
        )

    def close(self) -> None:
        self.daemon.stop()
        self.pub.close()
        self.results.close()


class RecordingPipeline:
    """The pipeline's side of the processor (``begin``/``end``, no preparation process) for
    processor tests: records each batch's outputs, emits nothing."""

    worker = None

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    @property
    def outputs(self) -> list[Any]:
        """Every output handed over, in order."""
        return [o for batch in self.batches for o in batch]

    def begin(self, outputs: list[Any]) -> SimpleNamespace:
        self.batches.append(list(outputs))
        return SimpleNamespace(items=outputs, ready=lambda worker: True)

    def end(self, batch: SimpleNamespace, *, advise: bool = True) -> list[Any]:
        return []

    def advise(self) -> list[Any]:
        return []

    def close_all(self, reason: str) -> list[Any]:
        return []


def burst_docs(n: int, uid: str) -> list[tuple[str, dict[str, Any]]]:
    """An analysis run as the daemon emits it: start, descriptor, ``n`` events, stop."""
    rows = [
        {
            "index": i,
            "status": "ok",
            "cn": 2 + 2 * (i % 2),
            "cn_probability": 0.5 + 0.4 * (i % 2),
            "distance": 1.8 + 1e-4 * i,
            "charge": 1.0,
            "valence": 1,
        }
        for i in range(n)
    ]
    return analysis_run_docs([("primary", r) for r in rows], uid, {"scan_kind": "fly"})


def daemon_health(port: int) -> dict[str, Any] | None:
    """A daemon's /health body when it is up and ready, else None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            return json.loads(resp.read()) if resp.status == 200 else None
    except (OSError, ValueError):
        return None


def serve_subprocess(
    conf: Path, port: int, log: Path, timeout: float = 90.0
) -> subprocess.Popen[bytes]:
    """``xasflow serve --config conf`` as a child process on ``port``; returns once ready."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xasflow.cli", "serve", "--config", str(conf)],
            env={**os.environ, "XASFLOW__HTTP__PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return daemon_health(port) is not None

    wait_for(ready, "the daemon to become ready", timeout=timeout)
    return proc


def processor_parts(ioc: Any = None, pipeline: Any = None) -> SimpleNamespace:
    """What ``build_processor`` builds a processing loop from, as the daemon's parts, with an
    input that never delivers and no store, gate or publisher: the loop's own tests feed it
    (``_turn``). ``pipeline``: a real one, or a stand-in with no preparation process."""
    return SimpleNamespace(
        source=SimpleNamespace(get=lambda timeout: None),
        assembler=RunAssembler(),
        pipeline=pipeline if pipeline is not None else SimpleNamespace(worker=None),
        probes=None,
        interrupted=None,
        writer=None,
        store=None,
        ioc=ioc,
        gate=None,
        publisher=None,
    )
