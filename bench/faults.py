"""Fault bench: a catalogue of faults and bad inputs thrown at the real proxy and daemon.

What runs: bluesky's 0MQ ``Proxy`` (:func:`xasflow.sim.beamline.start_proxy`), the daemon as
``xasflow serve --config`` (watching its models directory every 0.2 s, storing into a tiled
catalog, HTTP on loopback), a publisher here (``ZmqDocumentPublisher``, bluesky's pickle
framing byte for byte) and a subscriber on the analysis prefix. Each fault is a function that
does something bad and then checks the daemon: still alive and answering ``/health``, and the
fault's own promise kept. Figures:

``faults_tried``/``faults_survived``; ``bad_inputs_tried``/``bad_inputs_counted`` (wire
garbage and bad documents, counted when ``/health`` counters moved by as much);
``silent_losses`` (spectra published that produced no analysis row and are not counted as
lost: ``raw_missing_events`` in the analysis stop or the input's drop counters);
``tampered_bundles_served`` (a tampered bundle's id or manifest digest ever in ``/health``
models, or its id on an analysis row); ``published_not_stored`` (analysis rows seen on the
bus after a SIGKILL and restart that the store does not hold); ``max_rss_growth_mb`` (daemon
RSS after each of 20 hot swaps minus before the first).

    .venv/bin/python bench/faults.py --json bench/results/faults.json [--quick] [--models DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report
from stream import _free_port, _get_json, make_pool, stop_process

from xasflow import paths

ANALYSIS = "xasflow-analysis"
PROBE_KEY = "xasflow_probe"


def wait(predicate: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(step)


class Bus:
    """Analysis rows on the bus, by raw run uid: (index, status, reason, bundle_id)."""

    def __init__(self, address: str) -> None:
        from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig

        self.source = ZmqDocumentSource(ZmqInputConfig(address=address, prefix=ANALYSIS.encode()))
        self.source.start()
        self.lock = threading.Lock()
        self.start_raw: dict[str, str] = {}
        self.desc_raw: dict[str, str] = {}
        self.rows: dict[str, list[tuple[int, str, str, str]]] = {}
        self.stops: dict[str, dict[str, Any]] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            item = self.source.get(timeout=0.1)
            if item is None:
                continue
            name, doc = item
            with self.lock:
                if name == "start":
                    self.start_raw[doc["uid"]] = doc.get("raw_uid")
                elif name == "descriptor" and doc.get("name") == "primary":
                    if doc["run_start"] in self.start_raw:
                        self.desc_raw[doc["uid"]] = self.start_raw[doc["run_start"]]
                elif name in ("event", "event_page") and doc["descriptor"] in self.desc_raw:
                    rows = self.rows.setdefault(self.desc_raw[doc["descriptor"]], [])
                    d = doc["data"]
                    if name == "event":
                        rows.append((int(d["index"]), str(d["status"]), str(d["reason"]),
                                     d["bundle_id"]))  # fmt: skip
                    else:  # a page: one row per entry of its columns
                        cols = zip(
                            d["index"], d["status"], d["reason"], d["bundle_id"], strict=True
                        )
                        rows.extend((int(i), str(st), str(r), b) for i, st, r, b in cols)
                elif name == "stop" and doc["run_start"] in self.start_raw:
                    self.stops[self.start_raw[doc["run_start"]]] = doc

    def rows_of(self, uids: list[str]) -> list[tuple[int, str, str, str]]:
        with self.lock:
            return [r for u in uids for r in self.rows.get(u, [])]

    def stopped(self, uids: list[str]) -> bool:
        with self.lock:
            return all(u in self.stops for u in uids)

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.source.close()


class Harness:
    """Proxy, daemon (a subprocess), publisher and analysis subscriber for one bench run."""

    def __init__(self, workdir: Path, models: Path, points: int) -> None:
        from xasflow.adapters.zmq_bus import ZmqDocumentPublisher
        from xasflow.sim.beamline import start_proxy

        self.workdir, self.models = workdir, models
        self.proxy = start_proxy(0, 0)
        self.pub = ZmqDocumentPublisher(self.proxy.in_address)
        self.bus = Bus(self.proxy.out_address)
        self.energy, self.pool = make_pool(points, 16, seed=13)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()  # the publisher socket is shared by feeder threads
        self.published = 0

    def start(self, env: dict[str, str] | None = None) -> None:
        conf = self.workdir / "xasflow.yaml"
        conf.write_text(
            f"input:\n  address: {self.proxy.out_address}\n"
            f"output:\n  address: {self.proxy.in_address}\n  prefix: {ANALYSIS}\n"
            f"models:\n  directory: {self.models}\n  watch: true\n  watch_interval_s: 0.2\n"
            f"storage:\n  directory: {self.workdir / 'store'}\n"
            f"analysis:\n  run_timeout_s: 5\n"
            f"http:\n  port: {self.port}\n"
        )
        log = open(self.workdir / "daemon.log", "ab")  # noqa: SIM115 - the child keeps it
        cmd = [sys.executable, "-m", "xasflow.cli", "serve", "--config", str(conf)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        if not wait(lambda: self.health() or self.proc.poll() is not None, 120, 0.2):
            raise RuntimeError("the daemon did not start")
        if self.proc.poll() is not None:
            raise RuntimeError((self.workdir / "daemon.log").read_text()[-2000:])
        self.warm()

    def health(self) -> dict[str, Any] | None:
        return _get_json(f"{self.url}/health")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.health() is not None

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def warm(self) -> None:
        """Probe runs until the daemon has seen one (0MQ slow joiner), like bench/stream."""
        token = uuid.uuid4().hex

        def seen() -> bool:
            uid = f"probe-{uuid.uuid4().hex}"
            self.send("start", {"uid": uid, "time": time.time(), PROBE_KEY: token})
            self.send("stop", {"uid": uid + "-s", "run_start": uid, "time": time.time()})
            return token in ((self.health() or {}).get("probes") or {}).get("tokens", [])

        if not wait(seen, 30, 0.1):
            raise RuntimeError("warm-up probes never reached the daemon")

    def send(self, name: str, doc: dict[str, Any]) -> None:
        with self.lock:
            self.pub(name, doc)

    def raw(self, payload: bytes | list[bytes]) -> None:
        with self.lock:
            self.pub.send_raw(payload)

    def run(
        self, n: int, rate: float = 0.0, stop: bool = True, datas: list | None = None,
        seqs: list[int] | None = None,
    ) -> str:  # fmt: skip
        """One fly run of ``n`` spectra at ``rate``/s (0: as fast as possible); its uid.

        ``datas``/``seqs``: the events' data and seq_nums instead of the pool's and 1..n.
        """
        uid, desc = str(uuid.uuid4()), str(uuid.uuid4())
        start = {"uid": uid, "time": time.time(), "element": "Cu", "edge": "K"}
        self.send("start", {**start, "xas_scan": "fly", "xas_mode": "transmission"})
        keys = {
            k: {"source": "sim", "dtype": "array", "shape": [self.energy.size]}
            for k in ("energy", "I0", "It", "Ir")
        }
        self.send(
            "descriptor",
            {"uid": desc, "run_start": uid, "time": time.time(), "name": "primary",
             "data_keys": keys, "object_keys": {}, "configuration": {}, "hints": {}},
        )  # fmt: skip
        t0 = time.perf_counter()
        for i in range(n):
            if rate > 0:
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            ch = self.pool[i % len(self.pool)]
            data = {"energy": self.energy, "I0": ch["I0"], "It": ch["It"], "Ir": ch["Ir"]}
            data = datas[i] if datas else data
            now = time.time()
            seq = seqs[i] if seqs else i + 1
            self.send(
                "event",
                {"uid": str(uuid.uuid4()), "time": now, "seq_num": seq, "descriptor": desc,
                 "data": data, "timestamps": dict.fromkeys(data, now), "filled": {}},
            )  # fmt: skip
            self.published += 1
        if stop:
            self.send(
                "stop",
                {"uid": str(uuid.uuid4()), "run_start": uid, "time": time.time(),
                 "exit_status": "success", "num_events": {"primary": n}},
            )  # fmt: skip
        return uid

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)
            stop_process(self.proc)
        self.bus.close()
        self.pub.close()
        self.proxy.stop()


# --------------------------------------------------------------------------- accounting


class Tally:
    """The bench's figures, accumulated over the catalogue."""

    def __init__(self) -> None:
        self.faults: list[dict[str, Any]] = []
        self.bad_tried = self.bad_counted = self.silent = self.tampered = self.not_stored = 0
        self.rss_growth: float | None = None
        self.refusals: dict[str, int] = {}  # bundle refusals by reason, read from /metrics

    def fault(self, name: str, survived: bool, **detail: Any) -> None:
        self.faults.append({"fault": name, "survived": bool(survived), **detail})
        print(f"  {'ok  ' if survived else 'FAIL'} {name} {json.dumps(detail)}", flush=True)

    def report(self) -> dict[str, Any]:
        return {
            "faults_tried": len(self.faults),
            "faults_survived": sum(f["survived"] for f in self.faults),
            "bad_inputs_tried": self.bad_tried,
            "bad_inputs_counted": self.bad_counted,
            "silent_losses": self.silent,
            "tampered_bundles_served": self.tampered,
            "published_not_stored": self.not_stored,
            "max_rss_growth_mb": self.rss_growth,
            "refusals_by_reason": dict(sorted(self.refusals.items())),
            "faults": self.faults,
        }


def counted_errors(h: Harness) -> int:
    """Decode errors plus assembly rejections so far, from /health counters."""
    c = (h.health() or {}).get("counters", {})
    return sum(c.get("decode_errors", {}).values()) + sum(
        c.get("rejected_by_stage", {}).get("assembly", {}).values()
    )


def losses(h: Harness, uids: list[str], n: int, timeout: float = 60.0) -> dict[str, int]:
    """Spectra of runs ``uids`` (``n`` published): analysed, rejected, counted lost, silent."""
    wait(lambda: h.bus.stopped(uids), timeout, 0.1)
    rows = h.bus.rows_of(uids)
    status = {i: s for i, s, _r, _b in rows if i >= 0}
    with h.bus.lock:
        stops = [h.bus.stops.get(u, {}) for u in uids]
    missing = sum(int(s.get("raw_missing_events") or 0) for s in stops)
    ok = sum(1 for s in status.values() if s == "ok")
    lost = max(0, n - len(status))
    return {"ok": ok, "rejected": len(status) - ok, "lost": lost, "counted_missing": missing,
            "silent": max(0, lost - missing), "no_stop": sum(1 for s in stops if not s)}  # fmt: skip


# --------------------------------------------------------------------------- bundle faults


def redeploy(src: Path, dest: Path, bundle_id: str, created: str | None = None) -> Path:
    from xasflow.models.bundle import read_manifest
    from xasflow.models.bundle_write import write_bundle

    m = read_manifest(src)
    m = m.model_copy(update={"bundle_id": bundle_id, "created": created or m.created})
    return write_bundle(dest, m, {name: (src / name).read_bytes() for name in m.files})


def serving(h: Harness) -> list[tuple[str, str]]:
    return [(m["bundle_id"], m.get("manifest_sha256", "")) for m in (h.health() or {})["models"]]


def tamper_faults(h: Harness, t: Tally, base: Path) -> None:
    """Tampered bundles deployed next to the serving one: each refused, never served."""
    from xasflow.models.bundle import read_manifest
    from xasflow.models.bundle_write import seal_bundle

    future = "2999-01-01T00:00:00+00:00"  # would outrank the serving bundle

    def flip(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    def edit(p: Path, reseal: bool = False) -> None:
        doc = json.loads((p / "manifest.json").read_text())
        doc["tasks"]["cn"]["classes"] = doc["tasks"]["cn"]["classes"][::-1]
        (p / "manifest.json").write_text(json.dumps(doc, indent=2))
        if reseal:
            seal_bundle(p, force=True)

    outside = h.workdir / "outside"
    graph = sorted(read_manifest(base).graph_files())[0]  # a graph the bundle serves
    cases: dict[str, Callable[[Path], None]] = {
        "tamper_bytes": lambda p: flip(p / graph),
        "tamper_manifest": edit,
        "tamper_digest": lambda p: (p / "manifest.sha256").write_text("0" * 64 + "  manifest.json\n"),
        "symlink_file": lambda p: ((p / graph).unlink(), (p / graph).symlink_to(outside / graph)),
    }  # fmt: skip
    redeploy(base, outside, "outside", future)
    for name, spoil in cases.items():
        bundle_id = f"evil-{name}"
        staged = redeploy(base, h.workdir / "staging" / bundle_id, bundle_id, future)
        spoil(staged)
        os.replace(staged, h.models / bundle_id)
        judge_tamper(h, t, name, bundle_id, [bundle_id])
    # the bundle directory a symlink to a valid bundle outside the models directory
    (h.models / "evil-link").symlink_to(outside, target_is_directory=True)
    judge_tamper(h, t, "symlink_dir", "evil-link", ["outside"])
    # the serving bundle's manifest edited in place and resealed: same bundle_id, new digest
    (live_id, live_digest), *_ = serving(h)
    live = h.models / "cu-k"
    before = (live / "manifest.json").read_bytes()
    edit(live, reseal=True)
    judge_tamper(h, t, "tamper_manifest_same_id", "cu-k", [], bad_digest=True, keep=True)
    (live / "manifest.json").write_bytes(before)
    seal_bundle(live, force=True)
    ok = wait(lambda: "cu-k" not in (h.health() or {}).get("models_refused", {}), 10)
    assert ok and serving(h)[0] == (live_id, live_digest), "restoring the live bundle failed"
    with urllib.request.urlopen(f"{h.url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():  # xasflow_model_refused_total{reason=..} n
            if line.startswith("xasflow_model_refused_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                n = int(float(line.rsplit(" ", 1)[1]))
                if n:  # every known reason is exported, from 0
                    t.refusals[reason] = n


def judge_tamper(
    h: Harness, t: Tally, name: str, dirname: str, ids: list[str], bad_digest: bool = False,
    keep: bool = False,
) -> None:  # fmt: skip
    refused = wait(lambda: (h.health() or {}).get("models_refused", {}).get(dirname), 10)
    uid = h.run(2)
    wait(lambda: h.bus.stopped([uid]), 20)
    live = serving(h)
    served = any(b in ids for b, _ in live) or any(r[3] in ids for r in h.bus.rows_of([uid]))
    if bad_digest:  # same id: served if the edited manifest's digest is what serves
        from xasflow.models.bundle import sha256_file

        served = any(d == sha256_file(h.models / dirname / "manifest.json") for _, d in live)
    t.tampered += int(bool(served))
    reason = str(refused).split(":", 1)[0] if refused else None
    t.fault(name, bool(refused) and not served and h.alive(), reason=reason, served=served)
    if not keep:
        path = h.models / dirname
        path.unlink() if path.is_symlink() else shutil.rmtree(path)


def removal_fault(h: Harness, t: Tally, base: Path, n: int) -> None:
    """The newer of two Cu bundles removed while spectra stream: no spectrum lacks a model."""
    redeploy(base, h.models / "cu-k-newer", "cu-k-newer", "2999-01-01T00:00:00+00:00")
    wait(lambda: serving(h)[0][0] == "cu-k-newer", 15)
    box: list[str] = []
    feeder = threading.Thread(target=lambda: box.append(h.run(n, rate=n / 3.0)))
    feeder.start()
    time.sleep(1.0)  # the removal lands mid-stream (the feeder runs for ~3 s)
    shutil.rmtree(h.models / "cu-k-newer")
    feeder.join()
    acc = losses(h, box, n)
    no_model = sum(1 for r in h.bus.rows_of(box) if r[2] == "no_model")
    t.silent += acc["silent"]
    t.fault("bundle_removal", no_model == 0 and h.alive(), no_model=no_model, **acc)


def swap_fault(h: Harness, t: Tally, base: Path, swaps: int, name: str = "hot_swaps") -> float:
    """``swaps`` hot swaps of the serving bundle; RSS after each minus RSS before the first."""
    h.run(2)
    before = h.rss_mb()
    rss = []
    for k in range(swaps):
        redeploy(base, h.models / "cu-k", f"{name}-{k}")
        wait(lambda k=k: serving(h)[0][0] == f"{name}-{k}", 30)
        uid = h.run(1)
        wait(lambda uid=uid: h.bus.stopped([uid]), 20)
        time.sleep(0.5)  # a watch tick or two: the old predictor is trimmed at the next scan
        rss.append(round(h.rss_mb(), 1))
    growth = round(max(rss) - before, 1)
    t.fault(name, h.alive(), swaps=swaps, rss_before_mb=round(before, 1), growth_mb=growth,
            rss_mb=rss)  # fmt: skip
    return growth


# --------------------------------------------------------------------------- input faults


class _Shell:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.cmd,))


def wire_fault(h: Harness, t: Tally, huge_mb: int) -> None:
    """Garbage frames, malicious pickles, a huge frame and bad arrays: each counted once."""
    import msgpack

    pwned = h.workdir / "pwned"
    evil = pickle.dumps({"uid": "x", "data": _Shell(f"touch {pwned}")})
    nd = {b"nd": True, b"type": "<f8", b"shape": [3], b"data": b"x"}
    bad: list[bytes | list[bytes]] = [
        b" \x80abc ", b" start ", b" start abc", b"", b"GET / HTTP/1.1\r\n\r\n",
        b" start " + pickle.dumps([1, 2]), b" bulk_events " + pickle.dumps({}),
        [b"too", b"many", b"frames"], b" event " + evil, b" start " + evil,
        b" start \x80\x04garbage", b" event " + msgpack.packb({"a": nd}),
        b" event " + os.urandom(huge_mb << 20), b" start " + pickle.dumps({"u": 1}) + b"tail",
        *(os.urandom(k * 37 % 300) for k in range(20)),
    ]  # fmt: skip
    before = counted_errors(h)
    for msg in bad:
        h.raw(msg)
    h.run(1)  # same pipe: arrives after the garbage
    wait(lambda: counted_errors(h) - before >= len(bad), 20)
    got = counted_errors(h) - before
    t.bad_tried += len(bad)
    t.bad_counted += min(got, len(bad))
    t.fault("wire_garbage", h.alive() and not pwned.exists(), sent=len(bad), counted=got,
            executed=pwned.exists())  # fmt: skip


def document_fault(h: Harness, t: Tally) -> None:
    """Out-of-order, duplicate and bad-array documents: each rejected and counted, no crash."""
    import numpy as np

    now = time.time()
    ch = h.pool[0]
    good = {"energy": h.energy, "I0": ch["I0"], "It": ch["It"], "Ir": ch["Ir"]}
    nan = {**good, "I0": np.full_like(ch["I0"], np.nan), "It": np.full_like(ch["It"], np.nan)}
    short = {**good, "It": ch["It"][:-7]}
    missing = {k: v for k, v in good.items() if k != "It"}
    before = counted_errors(h)
    orphan = {"uid": str(uuid.uuid4()), "time": now, "seq_num": 1, "descriptor": "nope",
              "data": good, "timestamps": dict.fromkeys(good, now), "filled": {}}  # fmt: skip
    h.send("event", orphan)  # unknown descriptor
    h.send("stop", {"uid": str(uuid.uuid4()), "run_start": "nope", "time": now})  # unknown run
    h.send("descriptor", {"uid": "d", "run_start": "nope", "time": now, "data_keys": {}})
    datas = [good, nan, short, missing, good]
    uid = h.run(len(datas), datas=datas, seqs=[1, 2, 3, 4, 1], stop=False)  # seq 1 twice
    h.send("start", {"uid": uid, "time": now, "element": "Cu", "edge": "K"})  # duplicate start
    h.send("stop", {"uid": str(uuid.uuid4()), "run_start": uid, "time": time.time(),
                    "exit_status": "success", "num_events": {"primary": 5}})  # fmt: skip
    n_bad = 3 + 3 + 1 + 1
    wait(lambda: h.bus.stopped([uid]), 20)
    wait(lambda: counted_errors(h) - before >= n_bad, 5)
    counters = counted_errors(h) - before
    rows = h.bus.rows_of([uid])
    rejected_rows = sum(1 for _i, s, _r, _b in rows if s != "ok")
    t.bad_tried += n_bad
    t.bad_counted += min(n_bad, counters)
    t.fault("bad_documents", h.alive() and counters >= n_bad, sent=n_bad, counted=counters,
            rejected_rows=rejected_rows, rows=[r[:3] for r in rows])  # fmt: skip


def stall_fault(h: Harness, t: Tally, sig: str, rate: float, seconds: float, pause: float) -> None:
    """SIGSTOP (``pause`` s) or SIGKILL (then restart) while spectra stream at ``rate``/s for
    ``seconds`` (one run)."""
    assert h.proc is not None
    box: list[str] = []
    n = int(rate * seconds)
    feeder = threading.Thread(target=lambda: box.append(h.run(n, rate=rate)))
    feeder.start()
    time.sleep(1.0)
    if sig == "SIGSTOP":
        os.kill(h.proc.pid, signal.SIGSTOP)
        time.sleep(pause)
        os.kill(h.proc.pid, signal.SIGCONT)
        feeder.join()
        acc = losses(h, box, n)
        t.silent += acc["silent"]
        out = (h.health() or {}).get("output", {})
        gate = {k.split(".", 1)[1]: v for k, v in out.items() if k.startswith("after_store.")}
        t.fault("sigstop_under_load", h.alive(), pause_s=pause, rate_hz=rate, **acc,
                after_store=bool(gate), released_unstored=gate.get("released_unstored"))  # fmt: skip
        return
    h.proc.kill()
    h.proc.wait(10)
    feeder.join()
    seen = {(i, s) for i, s, _r, _b in h.bus.rows_of(box)}
    h.start()  # same store, same models: the restarted daemon reconciles what it can
    uid = h.run(1)
    wait(lambda: h.bus.stopped([uid]), 20)
    stop_process(h.proc)
    stored: set[tuple[int, str]] = set()
    store_note = ""
    try:
        from xasflow.adapters.tiled_store import read_analysis

        _md, rows = read_analysis(h.workdir / "store", box[0])
        stored = {(int(i), str(s)) for i, s in zip(rows["index"], rows["status"], strict=True)}
    except (KeyError, FileNotFoundError) as exc:  # the run is not in the store at all
        store_note = f"{type(exc).__name__}: {exc}"[:200]
    not_stored = len(seen - stored)
    t.not_stored += not_stored
    h.start()
    t.fault("sigkill_under_load", h.alive(), published=n, published_rows=len(seen),
            stored_rows=len(stored), published_not_stored=not_stored, store=store_note)  # fmt: skip


def prep_fault(h: Harness, t: Tally, rate: float, seconds: float) -> None:
    """``analysis.prep_process``: its child SIGKILLed, then SIGSTOPped past the daemon's
    5 s answer timeout, while spectra stream: the thread takes over, nothing is lost."""
    for sig in ("SIGKILL", "SIGSTOP"):
        wait(lambda: ((h.health() or {}).get("prep_process") or {}).get("ready"), 60)
        before = (h.health() or {})["prep_process"]
        box: list[str] = []
        n = int(rate * seconds)
        feeder = threading.Thread(target=lambda b=box, k=n: b.append(h.run(k, rate=rate)))
        feeder.start()
        time.sleep(1.0)
        os.kill(before["pid"], getattr(signal, sig))
        feeder.join()
        acc = losses(h, box, n)
        t.silent += acc["silent"]
        after = (h.health() or {}).get("prep_process") or {}
        if sig == "SIGSTOP":  # killed by the daemon by now; let the stopped process go
            with contextlib.suppress(ProcessLookupError):
                os.kill(before["pid"], signal.SIGCONT)
        fallbacks = after.get("fallbacks", 0) - before["fallbacks"]  # this round's own
        restarts = after.get("restarts", 0) - before["restarts"]
        t.fault(f"prep_process_{sig.lower()}", h.alive() and fallbacks > 0 and acc["lost"] == 0,
                rate_hz=rate, **acc, fallbacks=fallbacks, restarts=restarts,
                pid_before=before["pid"], pid_after=after.get("pid"))  # fmt: skip


def web_fault(h: Harness, t: Tally, clients: int) -> None:
    """``clients`` open dashboard event streams at once; the daemon keeps answering."""
    import socket

    socks = []
    for _ in range(clients):
        s = socket.create_connection(("127.0.0.1", h.port), timeout=5)
        s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        socks.append(s)
    uid = h.run(1)
    answered = bool(wait(lambda: h.bus.stopped([uid]), 30)) and h.alive()
    accepted = 0
    for s in socks:
        try:
            s.settimeout(2)
            accepted += int(s.recv(64).startswith(b"HTTP/1.1 200"))
        except OSError:
            pass
        s.close()
    t.fault("many_web_clients", answered, clients=clients, accepted=accepted)


# --------------------------------------------------------------------------- main


def prepare_models(models: Path | None, workdir: Path) -> Path:
    """A sealed copy of a Cu K bundle in the bench's own models directory; its path."""
    from xasflow.models.bundle import inspect_bundle
    from xasflow.models.bundle_write import seal_bundle

    src = models or paths.REPO_ROOT / "models" / "cu-k"
    if (src / "cu-k").is_dir():
        src = src / "cu-k"
    dest = workdir / "models" / "cu-k"
    shutil.copytree(src, dest)
    if not (dest / "manifest.sha256").exists():
        seal_bundle(dest)  # the bench's copy of a bundle exported before digests
    inspect_bundle(dest)
    return dest


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the catalogue (shortened with ``--quick``); the figures as a dict."""
    quick = args.quick
    t = Tally()
    with tempfile.TemporaryDirectory(prefix="xasflow-faults-") as tmp:
        workdir = Path(tmp)
        bundle = prepare_models(args.models, workdir)
        base = Path(shutil.copytree(bundle, workdir / "pristine"))
        h = Harness(workdir, bundle.parent, points=400 if quick else 600)
        try:
            h.start()
            tamper_faults(h, t, base)
            removal_fault(h, t, base, 15 if quick else 120)
            wire_fault(h, t, 2 if quick else 50)
            document_fault(h, t)
            if quick:  # paused longer than analysis.run_timeout_s (5 s): nothing may time out
                stall_fault(h, t, "SIGSTOP", 20, 8.0, 6.0)
            else:
                stall_fault(h, t, "SIGSTOP", 100, 16.0, 10.0)
                stall_fault(h, t, "SIGKILL", 50, 4.0, 0.0)
            web_fault(h, t, 20 if quick else 500)
            t.rss_growth = swap_fault(h, t, base, 3 if quick else 20)
            if not quick:  # the baseline: the same swaps with heap trimming off
                stop_process(h.proc)  # type: ignore[arg-type]
                h.start(env={"XASFLOW_MALLOC_TRIM": "0"})
                untrimmed = swap_fault(h, t, base, 20, name="hot_swaps_untrimmed")
            stop_process(h.proc)  # type: ignore[arg-type]  (last: the swaps above ran warm)
            h.start(env={"XASFLOW__ANALYSIS__PREP_PROCESS": "true"})
            prep_fault(h, t, 400, 4.0 if quick else 10.0)  # stacks form from ~200/s
        finally:
            h.close()
    out = t.report()
    out["max_rss_growth_mb_untrimmed"] = None if quick else untrimmed
    out["quick"] = quick
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="the short catalogue (tests)")
    parser.add_argument("--models", type=Path, help="a bundle (or models dir) to serve")
    args = parser.parse_args(argv)
    result = run_bench(args)
    write_report(args.json, result, {k: v for k, v in result.items() if k != "faults"})
    return 0 if result["faults_survived"] == result["faults_tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
