"""A daemon on a loopback 0MQ bus for the tests: the proxy, a results subscriber grouping the
analysis documents by raw run, the warm-up that waits out slow joiners, and a started daemon
with its publisher (``Harness``)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
from document_helpers import Docs, unpaged

from xasflow.adapters.probes import PROBE_KEY
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.service import Daemon

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
