"""Benchmark: the streaming daemon under fly-scan load through bluesky's real 0MQ proxy.

What runs (all on loopback, each in its own process, so no two share a GIL):

* bluesky's ``Proxy`` (:func:`xasflow.sim.beamline.start_proxy`);
* a publisher (this script, ``--role publisher``) sending fly (quick-XAS) runs with
  bluesky's own ``bluesky.callbacks.zmq.Publisher`` (pickle wire format, one ``event``
  document per 1,000-point spectrum, as a RunEngine does): channels I0, It, Ir counted by
  :class:`xasflow.sim.beamline.BeamlineModel` from the packaged FEFF demo spectra of Cu
  compounds (Poisson noise, I0 drift, a random mono offset per spectrum); each event's
  ``time`` is stamped just before it is handed to the Publisher;
* the daemon as ``xasflow serve --config`` with the shipped bundle ``models/cu-k``, storing
  into an embedded tiled catalog and publishing analysis runs under ``xasflow-analysis``;
* here: a subscriber on the analysis prefix timing every result.

Offered rates rise (``--rates``, spectra/s, ``--seconds`` each). Per rate: ``lost`` =
offered - analysed - rejected (from the analysis events on the bus), latency from the raw
event's ``time`` to the analysis event's ``time`` (result composed and published) and to its
arrival here (received), and ``drain_s``: how long after the last spectrum was published its
last result arrived. A rate is *sustained* when nothing is lost, p99 latency <= 50 ms over
at least 10 s offered (issue 10), the publisher kept the offered rate (>= 95 %), and the
daemon kept up (``drain_s <= --max-drain``; a daemon slower
than the offer builds a backlog that shows here, long before any buffer overflows, since the
input buffers are deep). ``sustained_rate_hz`` is the highest rate sustained with every lower
rate sustained too; ``p99_latency_ms`` (received) is at that rate.
``cpu_ms_per_spectrum`` splits each level's CPU by process (daemon, its catalog server and
preparation process as ``daemon_children``, proxy as ``bus``, publisher, ``bench``; ``cores``: all of them per second of the level; ``cpu_bound_rate_hz``:
the rate at which that CPU per spectrum fills the machine's cores, above which no level can
be sustained here; the report's ``cpu_bound_rate_hz`` is the highest over the levels, since
a daemon's fixed costs per second weigh on each spectrum less as the rate rises).

Baselines in the same run, same publisher, same proxy, same spectra, same criterion:

* ``naive_rate_hz``: bluesky's ``RemoteDispatcher`` with a callback that does the same
  science per event (mu, foil alignment, the bundle's preprocessing and features) and then
  calls scikit-learn ExtraTrees (200 trees each, one per task of the bundle, ``n_jobs=1``).
  The real training estimators are not kept (only ONNX is shipped), so these are fitted on
  synthetic features of the bundle's width (a few hundred rows; the cost of a call is set by
  the number of trees, not by what they learned);
* ``raw_ceiling_rate_hz``: :class:`~xasflow.adapters.zmq_bus.ZmqDocumentSource` receive and
  decode only (a consumer thread takes the documents and does nothing else). When the
  publisher cannot offer more, the ceiling is a lower bound (``raw_ceiling_publisher_bound``).

    .venv/bin/python bench/stream.py --json bench/results/stream.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from report import write_report

from xasflow import paths
from xasflow.adapters.probes import PROBE_KEY
from xasflow.adapters.routing import events_of

ANALYSIS_PREFIX = "xasflow-analysis"
ENERGY_RANGE = (8800.0, 9120.0)  # covered by every demo compound (and the bundle's window)
#: diagnostic only (``p99_latency_ms_after_run_start``): each run's first spectra, which wait
#: for the run's table in the store, left out; the sustained criterion uses every spectrum
RUN_START = 50
TARGETS = {  # issue 10, on 2 cores with 1,000-point spectra
    "sustained_rate_hz": 2000,
    "p99_latency_ms": 50.0,  # at the sustained rate (part of "sustained" itself)
    "p99_latency_ms_at_100hz": 10.0,
    "speedup_vs_naive": 10.0,
    "fraction_of_raw_ceiling": 0.5,
}
#: A level counts as sustained only when nothing is lost and p99 <= this, over >= MIN_SECONDS.
P99_LIMIT_MS = 50.0
MIN_SECONDS = 10.0


# --------------------------------------------------------------------------- spectra


def make_pool(n_points: int, n_spectra: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Energies and ``n_spectra`` noisy I0/It/Ir channel sets from the demo compounds."""
    from xasflow.sim.beamline import BeamlineModel, demo_spectra

    rng = np.random.default_rng(seed)
    energy = np.linspace(*ENERGY_RANGE, n_points)
    samples = demo_spectra()
    pool = []
    for i in range(n_spectra):
        model = BeamlineModel(
            samples[i % len(samples)],
            energy_offset=float(rng.uniform(-3.0, 3.0)),
            i0_flux=float(rng.uniform(5e5, 2e6)),
            seed=int(rng.integers(1 << 31)),
        )
        pool.append(model.channels(energy, rng=rng))
    return energy, pool


# --------------------------------------------------------------------------- child roles


def _say(obj: dict[str, Any], lock: threading.Lock | None = None) -> None:
    text = json.dumps(obj)
    if lock is None:
        print(text, flush=True)
    else:
        with lock:
            print(text, flush=True)


def publisher_role(args: argparse.Namespace) -> int:
    """Publish fly runs with bluesky's Publisher on command (JSON lines on stdin)."""
    import zmq
    from bluesky.callbacks.zmq import Publisher

    energy, pool = make_pool(args.points, args.pool, args.seed)
    pub = Publisher(args.address)
    pub._socket.setsockopt(zmq.LINGER, 2000)  # bluesky leaves it infinite
    keys = {
        k: {"source": "sim", "dtype": "array", "shape": [energy.size], "units": u}
        for k, u in (("energy", "eV"), ("I0", "counts"), ("It", "counts"), ("Ir", "counts"))
    }
    _say({"ready": True})
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "probe":
            _say({"probes": _probe(pub, cmd["token"])})
        elif cmd["cmd"] == "stream":
            _say(_stream(pub, energy, pool, keys, cmd))
        elif cmd["cmd"] == "quit":
            break
    pub.close()
    return 0


def _probe(pub: Any, token: str) -> int:
    """Probe runs (start + stop, no events) every 20 ms until a line arrives on stdin."""
    sent = 0
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        uid = f"xasflow-probe-{token}-{sent}"
        pub("start", {"uid": uid, "time": time.time(), PROBE_KEY: token, "plan_name": "probe"})
        pub("stop", {"uid": uid + "-stop", "run_start": uid, "time": time.time()})
        sent += 1
    sys.stdin.readline()
    return sent


def _stream(pub: Any, energy: np.ndarray, pool: list[dict], keys: dict, cmd: dict) -> dict:
    """``n`` spectra at ``rate`` per second in fly runs of ``per_run`` events."""
    rate, n, per_run = float(cmd["rate"]), int(cmd["n"]), int(cmd["per_run"])
    interval = 1.0 / rate
    runs: list[dict[str, Any]] = []
    late = 0
    i = 0
    t0 = time.perf_counter() + 0.02
    first = last = 0.0
    while i < n:
        k = min(per_run, n - i)
        run_uid, desc_uid = str(uuid.uuid4()), str(uuid.uuid4())
        now = time.time()
        start = {
            "uid": run_uid,
            "time": now,
            "scan_id": len(runs) + 1,
            "plan_name": "bench_fly",
            "element": "Cu",
            "edge": "K",
            "xas_scan": "fly",
            "xas_mode": "transmission",
            "num_points_per_spectrum": int(energy.size),
        }
        pub("start", start)
        pub(
            "descriptor",
            {
                "uid": desc_uid,
                "run_start": run_uid,
                "time": now,
                "name": "primary",
                "data_keys": keys,
                "object_keys": {"qxas": list(keys)},
                "configuration": {},
                "hints": {},
            },
        )
        times = []
        for j in range(k):
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.005:
                late += 1
            ch = pool[i % len(pool)]
            now = time.time()
            data = {"energy": energy, "I0": ch["I0"], "It": ch["It"], "Ir": ch["Ir"]}
            pub(
                "event",
                {
                    "uid": str(uuid.uuid4()),
                    "time": now,
                    "seq_num": j + 1,
                    "descriptor": desc_uid,
                    "data": data,
                    "timestamps": dict.fromkeys(data, now),
                    "filled": {},
                },
            )
            times.append(now)
            first = first or now
            last = now
            i += 1
        pub(
            "stop",
            {
                "uid": str(uuid.uuid4()),
                "run_start": run_uid,
                "time": time.time(),
                "exit_status": "success",
                "reason": "",
                "num_events": {"primary": k},
            },
        )
        runs.append({"uid": run_uid, "descriptor": desc_uid, "times": times})
    span = last - first
    return {
        "runs": runs,
        "sent": n,
        "first": first,
        "last": last,
        "achieved_rate_hz": (n - 1) / span if span > 0 else float("inf"),
        "late_over_5ms": late,
    }


def record_events(
    source: Any,
    records: list[list[Any]],
    other: Callable[[str, dict], Any] | None = None,
    after: Callable[[], None] | None = None,
) -> None:
    """Take documents off an input adapter for good, recording (descriptor, seq_num, event
    time, time taken) per event; ``other`` gets the rest, ``after`` runs after each."""
    while True:
        item = source.get(timeout=0.5)
        if item is None:
            continue
        name, doc = item
        if name == "event":
            records.append([doc["descriptor"], doc["seq_num"], doc["time"], time.time()])
        elif other is not None:
            other(name, doc)
        if after is not None:
            after()


def serve_reports(records: list[list[Any]], lock: threading.Lock) -> None:
    """Answer each ``report`` on stdin with the records so far (taken out), until ``quit``."""
    while True:
        line = sys.stdin.readline()
        if not line or json.loads(line)["cmd"] == "quit":
            return
        n = len(records)
        batch, records[:n] = records[:n], []
        _say({"records": batch}, lock)


def consumer_role(args: argparse.Namespace) -> int:
    """A baseline consumer: ``raw`` (ZmqDocumentSource, decode only) or ``naive``
    (RemoteDispatcher + scikit-learn in the callback). Records (descriptor, seq_num, event
    time, done time) per event; ``report`` on stdin prints and clears them."""
    lock = threading.Lock()
    records: list[list[Any]] = []
    seen: set[str] = set()

    def probe(name: str, doc: dict) -> bool:
        if name == "start" and PROBE_KEY in doc:
            token = doc[PROBE_KEY]
            if token not in seen:
                seen.add(token)
                _say({"seen": token}, lock)
            return True
        return False

    info: dict[str, Any] = {"ready": True}
    if args.mode == "raw":
        from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig

        source = ZmqDocumentSource(ZmqInputConfig(address=args.address))
        source.start()

        threading.Thread(target=record_events, args=(source, records, probe), daemon=True).start()
    else:
        from bluesky.callbacks.zmq import RemoteDispatcher

        t = time.perf_counter()
        work = _naive_work(args.models, args.points, args.seed)
        info["fit_seconds"] = round(time.perf_counter() - t, 1)
        info["sklearn_tasks"] = work.tasks  # type: ignore[attr-defined]

        def callback(name: str, doc: dict) -> None:
            if name == "event":
                work(doc["data"])
                records.append([doc["descriptor"], doc["seq_num"], doc["time"], time.time()])
            else:
                probe(name, doc)

        dispatcher = RemoteDispatcher(args.address)
        dispatcher.subscribe(callback)
        threading.Thread(target=dispatcher.start, daemon=True).start()
    _say(info, lock)
    serve_reports(records, lock)
    os._exit(0)  # the dispatcher's loop thread has no clean stop from here


def _naive_work(models: str, n_points: int, seed: int) -> Callable[[dict], dict]:
    """The naive per-event analysis: the daemon's science, then scikit-learn ExtraTrees."""
    from sklearn.ensemble import ExtraTreesClassifier, ExtraTreesRegressor

    from xasflow.models.bundle import verify_bundle
    from xasflow.spectra import (
        Spectrum,
        SpectrumError,
        align,
        alignment_shift,
        featurize,
        linear_matrix,
        mu_from_channels,
        prepare,
    )

    manifest = verify_bundle(Path(models))
    matrix = linear_matrix(manifest.features, manifest.prep)
    rng = np.random.default_rng(seed)
    # Training rows: features of real pool spectra plus noise (trees fully grown, as trained).
    energy, pool = make_pool(n_points, 32, seed + 1)
    base = []
    for ch in pool:
        spec = Spectrum(energy, mu_from_channels("transmission", ch["I0"], ch["It"]), "Cu", "K")
        base.append(
            featurize(
                prepare(spec, manifest.prep).y[None, :], manifest.features, manifest.prep, matrix
            )[0]
        )
    base_x = np.asarray(base)
    n_rows = 300
    x = base_x[rng.integers(len(base_x), size=n_rows)]
    x = x + rng.normal(scale=0.05, size=x.shape) * (base_x.std(axis=0) + 1e-6)
    estimators: dict[str, tuple[str, Any]] = {}
    for name, task in manifest.tasks.items():
        if task.kind == "classifier":
            y: Any = rng.choice(np.asarray(task.classes), n_rows)
            est: Any = ExtraTreesClassifier(200, max_features=0.2, n_jobs=2, random_state=0)
        else:
            width = len(task.outputs or []) if task.kind == "multi_regressor" else 0
            y = rng.random((n_rows, width)) if width else rng.random(n_rows)
            est = ExtraTreesRegressor(
                200, max_features=0.3, min_samples_leaf=2, n_jobs=2, random_state=0
            )
        est.fit(x, y)
        est.set_params(n_jobs=1)
        estimators[name] = (task.kind, est)

    def work(data: dict) -> dict:
        e = np.asarray(data["energy"], dtype=np.float64)
        i0, it, ir = (np.asarray(data[k], dtype=np.float64) for k in ("I0", "It", "Ir"))
        spec = Spectrum(e, mu_from_channels("transmission", i0, it), "Cu", "K")
        try:
            ref = Spectrum(e, mu_from_channels("reference", it, ir))
            spec = align(spec, alignment_shift(ref, "Cu", "K"))
        except (SpectrumError, KeyError):
            pass
        try:
            prep = prepare(spec, manifest.prep)
        except SpectrumError:
            return {}
        xs = featurize(prep.y[None, :], manifest.features, manifest.prep, matrix)
        return {
            name: est.predict_proba(xs) if kind == "classifier" else est.predict(xs)
            for name, (kind, est) in estimators.items()
        }

    work.tasks = sorted(estimators)  # type: ignore[attr-defined]
    return work


# --------------------------------------------------------------------------- orchestration


class Child:
    """A subprocess speaking JSON lines; stdout is read by a thread into a queue."""

    def __init__(self, argv: list[str], name: str, log: Path) -> None:
        self.name = name
        self._log = open(log, "w")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: set[str] = set()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if "seen" in obj:
                    self.seen.add(obj["seen"])
                else:
                    self.lines.put(obj)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"{self.name} said nothing within {timeout:.0f} s (rc {self.proc.poll()})"
            ) from None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"cmd": "quit"})
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


class Results:
    """Analysis documents on the bus, timed on arrival, grouped by raw run uid."""

    def __init__(self, address: str) -> None:
        from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig

        self.source = ZmqDocumentSource(
            ZmqInputConfig(address=address, prefix=ANALYSIS_PREFIX.encode())
        )
        self.source.start()
        self.cond = threading.Condition()
        self.start_raw: dict[str, str] = {}  # analysis start uid -> raw uid
        self.desc_raw: dict[str, str] = {}  # primary descriptor uid -> raw uid
        self.rows: dict[str, list[tuple[int, str, float, float]]] = {}  # raw -> rows
        self.stops: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.source.get(timeout=0.1)
            if item is None:
                continue
            received = time.time()
            name, doc = item
            with self.cond:
                if name == "start":
                    self.start_raw[doc["uid"]] = doc.get("raw_uid")
                elif name == "descriptor" and doc.get("name") == "primary":
                    raw = self.start_raw.get(doc["run_start"])
                    if raw is not None:
                        self.desc_raw[doc["uid"]] = raw
                elif name in ("event", "event_page"):  # a batch's results come as one page
                    raw = self.desc_raw.get(doc["descriptor"])
                    if raw is not None:
                        rows = self.rows.setdefault(raw, [])
                        for e in [doc] if name == "event" else events_of(doc):
                            d = e["data"]
                            rows.append(
                                (int(d["index"]), str(d["status"]), float(e["time"]), received)
                            )
                elif name == "stop":
                    raw = self.start_raw.get(doc["run_start"])
                    if raw is not None:
                        self.stops[raw] = doc
                self.cond.notify_all()

    def wait(self, raw_uids: list[str], timeout: float) -> bool:
        """Until every run in ``raw_uids`` has its analysis stop; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(u in self.stops for u in raw_uids):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.source.close()


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def find_models(models: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The models directory with a verified Cu K bundle; trains a tiny one if none is there."""
    from xasflow.models.bundle import BundleError, verify_bundle

    for bundle in sorted(models.glob("*/manifest.json")):
        try:
            m = verify_bundle(bundle.parent)
        except BundleError:
            continue
        if (m.element, m.edge) == ("Cu", "K"):
            return bundle.parent, {"bundle_id": m.bundle_id, "source": "shipped"}
    sys.path.insert(0, str(paths.REPO_ROOT / "tests"))
    from synthetic_feff import write_tree

    from xasflow.training.bundle_export import export_bundle
    from xasflow.training.dataset import build_feff_dataset
    from xasflow.training.fit import TrainConfig, train

    os.environ.setdefault("XASFLOW_CACHE", str(workdir / "cache"))
    ds = build_feff_dataset(
        write_tree(workdir / "feff", per_type=4), "Cu", n_jobs=1, progress=False
    )
    cfg = TrainConfig(  # the synthetic tree has three formulas: split by material
        n_estimators=12, n_jobs=1, test_fraction=0.3, val_fraction=0.15, split_by="material"
    )
    out = export_bundle(train(ds, cfg, log=lambda *_: None), workdir / "models" / "cu-k")
    m = verify_bundle(out)
    note = f"no verified Cu K bundle in {models}: a tiny synthetic one (12 trees) was trained"
    return out, {"bundle_id": m.bundle_id, "source": "tiny synthetic", "note": note}


def start_daemon(
    proxy: Any, bundle: Path, workdir: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """``xasflow serve --config`` on the proxy; returns once /health says ready."""
    conf = workdir / "xasflow.yaml"
    conf.write_text(
        f"input:\n  address: {proxy.out_address}\n"
        f"output:\n  address: {proxy.in_address}\n  prefix: {ANALYSIS_PREFIX}\n"
        f"models:\n  directory: {bundle.parent}\n  watch: false\n"
        f"storage:\n  directory: {workdir / 'store'}\n"
        f"http:\n  port: {port}\n"
    )
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xasflow.cli",
                "serve",
                "--config",
                str(conf),
                "--log-level",
                "warning",
            ],
            stdout=err,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while _get_json(f"http://127.0.0.1:{port}/health") is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60.0) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def warm_up(pub: Child, seen: Callable[[str], bool], timeout: float = 30.0) -> int:
    """Publisher probes until the consumer reports the token (0MQ slow joiner)."""
    token = uuid.uuid4().hex
    pub.send({"cmd": "probe", "token": token})
    deadline = time.monotonic() + timeout
    try:
        while not seen(token):
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up probes never arrived")
            time.sleep(0.05)
    finally:
        pub.send({"cmd": "stop"})
    return int(pub.read(30)["probes"])


def _level(rate: float, sent: dict[str, Any], max_drain: float) -> dict[str, Any]:
    return {
        "offered_rate_hz": rate,
        "publisher_rate_hz": round(sent["achieved_rate_hz"], 1),
        "offered": sent["sent"],
        "runs": len(sent["runs"]),
    }


def _judge(level: dict[str, Any], max_drain: float, seconds: float) -> dict[str, Any]:
    """Sustained: nothing lost, the publisher kept the rate, the consumer kept up, p99 <= 50 ms
    (where latency is measured), over at least MIN_SECONDS."""
    publisher_ok = level["publisher_rate_hz"] >= 0.95 * level["offered_rate_hz"]
    drain = level.get("drain_s")
    p99 = level.get("p99_latency_ms")
    level["publisher_kept_rate"] = publisher_ok
    level["kept_up"] = drain is not None and drain <= max_drain
    level["p99_ok"] = p99 is None or p99 <= P99_LIMIT_MS
    level["seconds"] = seconds
    level["sustained"] = bool(
        level["lost"] == 0
        and publisher_ok
        and level["kept_up"]
        and level["p99_ok"]
        and seconds >= MIN_SECONDS
    )
    return level


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc): the daemon's catalog server
    (``storage.catalog_process``) and preparation process (``analysis.prep_process``)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{entry}/stat") as f,
            ):
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return sorted(out)


def cpu_of(pids: dict[str, int | list[int]]) -> dict[str, float]:
    """:func:`cpu_seconds` of each named process (or processes, summed); a name whose
    process has gone is left out."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[name] = sum(cpu_seconds(p) for p in ([pid] if isinstance(pid, int) else pid))
    return out


def cpu_split(
    before: dict[str, float],
    after: dict[str, float],
    spectra: int,
    wall_s: float,
    cpus: int | None = None,
) -> dict[str, Any]:
    """Where a level's CPU went: ms per spectrum of each process measured at both ends,
    ``cores``, all of them together per second of the level, and ``cpu_bound_rate_hz``, the
    rate at which they would fill the machine's ``cpus`` (default: this machine's) at this
    level's CPU per spectrum: no level above it can be sustained on this machine, whatever
    the scheduling, unless the CPU per spectrum falls."""
    used = {k: after[k] - before[k] for k in before if k in after}
    split: dict[str, Any] = {k: round(v / max(spectra, 1) * 1e3, 3) for k, v in used.items()}
    total = sum(used.values())
    split["cores"] = round(total / max(wall_s, 1e-9), 2)
    cores = cpus or os.cpu_count() or 1
    split["cpu_bound_rate_hz"] = round(cores * spectra / total) if total > 0 and spectra else None
    return split


def bus_processes(bus_pid: int, pub: Child) -> dict[str, int]:
    """The processes a daemon level shares the machine with: the 0MQ proxy or the Kafka
    broker (``bus``), and the publisher."""
    return {"bus": bus_pid, "publisher": pub.proc.pid}


def daemon_level(
    pub: Child,
    results: Results,
    health_url: str,
    rate: float,
    args: argparse.Namespace,
    pid: int,
    others: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Offer ``rate`` spectra/s to the daemon for ``args.seconds``; measure what came back.

    ``others``: processes on the same machine whose CPU is counted beside the daemon's
    (``cpu_ms_per_spectrum``: the broker or proxy, the publisher; this process is ``bench``;
    the daemon's own child processes, its catalog server and preparation process, are
    ``daemon_children``, while ``daemon_cpu_ms_per_spectrum`` is its main process alone).
    """
    n = max(round(rate * args.seconds), 20)
    before = (_get_json(health_url) or {}).get("counters", {})
    pids: dict[str, int | list[int]] = {"daemon": pid, **(others or {}), "bench": os.getpid()}
    if children := child_pids(pid):
        pids["daemon_children"] = children
    cpu0, wall0 = cpu_of(pids), time.monotonic()
    pub.send({"cmd": "stream", "rate": rate, "n": n, "per_run": args.per_run})
    sent = pub.read(args.seconds * 5 + 60)
    uids = [r["uid"] for r in sent["runs"]]
    complete = results.wait(uids, timeout=args.wait)
    cpu1, wall = cpu_of(pids), time.monotonic() - wall0
    cpu = cpu1["daemon"] - cpu0["daemon"]
    after = (_get_json(health_url) or {}).get("counters", {})
    level = _level(rate, sent, args.max_drain)
    ok = rejected = 0
    lat_pub: list[float] = []
    lat_recv: list[float] = []
    lat_steady: list[float] = []  # each run's spectra after its first RUN_START ones
    last_recv = 0.0
    with results.cond:
        for run in sent["runs"]:
            times = run["times"]
            for index, status, t_result, t_recv in results.rows.get(run["uid"], []):
                if status == "ok":
                    ok += 1
                else:
                    rejected += 1
                if 0 <= index < len(times):
                    lat_pub.append((t_result - times[index]) * 1e3)
                    lat_recv.append((t_recv - times[index]) * 1e3)
                    if index >= RUN_START:
                        lat_steady.append(lat_recv[-1])
                last_recv = max(last_recv, t_recv)
        stops = [results.stops.get(u) for u in uids]
    level.update(
        analysed=ok,
        rejected=rejected,
        lost=sent["sent"] - ok - rejected,
        all_runs_closed=complete,
        raw_missing_events=sum(int(s.get("raw_missing_events", 0)) for s in stops if s),
        p50_latency_ms=_pct(lat_recv, 50),
        p99_latency_ms=_pct(lat_recv, 99),
        max_latency_ms=_pct(lat_recv, 100),
        p50_latency_published_ms=_pct(lat_pub, 50),
        p99_latency_published_ms=_pct(lat_pub, 99),
        p99_latency_ms_after_run_start=_pct(lat_steady, 99),
        drain_s=round(last_recv - sent["last"], 3) if last_recv else None,
        daemon_cpu_ms_per_spectrum=round(cpu / max(ok + rejected, 1) * 1e3, 3),
        cpu_ms_per_spectrum=cpu_split(cpu0, cpu1, ok + rejected, wall),
        daemon_counters={
            k: after.get(k, 0) - before.get(k, 0)
            for k in ("spectra_received", "spectra_analysed", "spectra_rejected")
        },
        loadavg=[round(x, 2) for x in os.getloadavg()],
    )
    return _judge(level, args.max_drain, args.seconds)


def consumer_level(
    pub: Child, consumer: Child, rate: float, args: argparse.Namespace, wait: float
) -> dict[str, Any]:
    """Offer ``rate`` to a baseline consumer; done = events its callback finished."""
    n = max(round(rate * args.seconds), 20)
    pub.send({"cmd": "stream", "rate": rate, "n": n, "per_run": args.per_run})
    sent = pub.read(args.seconds * 5 + 60)
    times = {r["descriptor"]: r["times"] for r in sent["runs"]}
    records: list[list[Any]] = []
    deadline = time.monotonic() + wait
    idle_since = time.monotonic()
    while True:
        consumer.send({"cmd": "report"})
        got = consumer.read(60)["records"]
        mine = [r for r in got if r[0] in times]
        records += mine
        now = time.monotonic()
        if mine:
            idle_since = now
        if len(records) >= n or now > deadline or now - idle_since > 5.0:
            break
        time.sleep(0.2)
    lat = [(done - t_event) * 1e3 for _, _, t_event, done in records]
    last_done = max((r[3] for r in records), default=0.0)
    level = _level(rate, sent, args.max_drain)
    level.update(
        processed=len(records),
        lost=sent["sent"] - len(records),
        p50_latency_ms=_pct(lat, 50),
        p99_latency_ms=_pct(lat, 99),
        drain_s=round(last_done - sent["last"], 3) if records else None,
        loadavg=[round(x, 2) for x in os.getloadavg()],
    )
    return _judge(level, args.max_drain, args.seconds)


def sustained(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest level sustained with every lower level sustained too."""
    best = None
    for level in sorted(levels, key=lambda lv: lv["offered_rate_hz"]):
        if not level["sustained"]:
            break
        best = level
    return best


def ladder(
    run_level: Callable[[float], dict[str, Any]],
    rates: list[float],
    name: str,
    stop_on_fail: bool = True,
) -> list[dict[str, Any]]:
    """Run rising rates; stop after the first unsustained one when ``stop_on_fail``."""
    levels = []
    for rate in rates:
        level = run_level(rate)
        levels.append(level)
        print(f"[{name}] {json.dumps(level)}", file=sys.stderr, flush=True)
        if stop_on_fail and not level["sustained"]:
            break
    return levels


def decode_cost_us(points: int) -> float:
    """Microseconds to decode one pickled fly event with the daemon's restricted decoder."""
    from bluesky.callbacks.zmq import Publisher  # noqa: F401  (same wire format as below)

    from xasflow.adapters.wire import decode_message, encode_message

    energy, pool = make_pool(points, 1, 0)
    data = {"energy": energy, **pool[0]}
    doc = {
        "uid": "u",
        "time": 0.0,
        "seq_num": 1,
        "descriptor": "d",
        "data": data,
        "timestamps": dict.fromkeys(data, 0.0),
        "filled": {},
    }
    frames = [encode_message("event", doc, b"", "pickle")]
    for _ in range(50):
        decode_message(frames, b"")
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        decode_message(frames, b"")
    return (time.perf_counter() - t) / n * 1e6


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """All three phases; returns the report."""
    from xasflow.sim.beamline import start_proxy

    report: dict[str, Any] = {
        "benchmark": "stream",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "shared machine: other jobs may run; see loadavg",
        },
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "points_per_spectrum": args.points,
            "seconds_per_rate": args.seconds,
            "spectra_per_run": args.per_run,
            "max_drain_s": args.max_drain,
            "publisher": "bluesky.callbacks.zmq.Publisher (pickle), one event per spectrum",
            "proxy": "bluesky.callbacks.zmq.Proxy (subprocess)",
            "daemon": "xasflow serve --config (subprocess), storage and bus output on",
            "spectra": "BeamlineModel(demo FEFF Cu compounds): I0/It/Ir with Poisson noise, "
            "I0 drift, random mono offset",
        },
        "targets": TARGETS,
    }
    t_start = time.monotonic()
    me = [sys.executable, str(Path(__file__).resolve())]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xasflow-bench-")))
        logs = Path(args.logs) if args.logs else workdir
        logs.mkdir(parents=True, exist_ok=True)
        bundle, bundle_info = find_models(Path(args.models), workdir)
        report["bundle"] = bundle_info
        proxy = start_proxy(0, 0)
        stack.callback(proxy.stop)
        pub = Child(
            [
                *me,
                "--role",
                "publisher",
                "--address",
                proxy.in_address,
                "--points",
                str(args.points),
                "--pool",
                str(args.pool),
                "--seed",
                str(args.seed),
            ],
            "publisher",
            logs / "publisher.log",
        )
        stack.callback(pub.close)
        pub.read(120)

        # ---- the daemon
        port = _free_port()
        health_url = f"http://127.0.0.1:{port}/health"
        daemon = start_daemon(proxy, bundle, workdir, port, logs / "daemon.log")
        stack.callback(stop_process, daemon)
        results = Results(proxy.out_address)
        stack.callback(results.close)

        def daemon_seen(token: str) -> bool:
            body = _get_json(health_url) or {}
            return token in body.get("probes", {}).get("tokens", [])

        warm_up(pub, daemon_seen)
        for _ in range(3):  # a small run, until the results subscriber has joined too
            pub.send({"cmd": "stream", "rate": 50, "n": 20, "per_run": 20})
            uids = [r["uid"] for r in pub.read(60)["runs"]]
            if results.wait(uids, 15):
                break
        else:
            raise RuntimeError("no analysis results arrived during warm-up")
        levels = ladder(
            lambda r: daemon_level(
                pub, results, health_url, r, args, daemon.pid, bus_processes(proxy.pid, pub)
            ),
            args.rates,
            "daemon",
            stop_on_fail=False,
        )
        health = _get_json(health_url) or {}
        report["daemon_exit_code"] = stop_process(daemon)
        best = sustained(levels)
        report["daemon_levels"] = levels
        report["sustained_rate_hz"] = best["offered_rate_hz"] if best else 0
        report["p99_latency_ms"] = best["p99_latency_ms"] if best else None
        report["p99_latency_published_ms"] = best["p99_latency_published_ms"] if best else None
        report["p50_latency_ms"] = best["p50_latency_ms"] if best else None
        report["lost"] = sum(lv["lost"] for lv in levels)
        report["lost_at_sustained_and_below"] = (
            sum(lv["lost"] for lv in levels if lv["offered_rate_hz"] <= best["offered_rate_hz"])
            if best
            else None
        )
        report["daemon_health_end"] = {
            k: health.get(k) for k in ("counters", "input", "store", "internal_errors")
        }
        report["loadavg_after_daemon"] = [round(x, 2) for x in os.getloadavg()]

        report["naive_rate_hz"] = report["raw_ceiling_rate_hz"] = 0
        cpu = [lv["daemon_cpu_ms_per_spectrum"] for lv in levels if lv["analysed"]]
        report["daemon_cpu_ms_per_spectrum"] = float(np.median(cpu)) if cpu else None
        bound = [
            lv["cpu_ms_per_spectrum"]["cpu_bound_rate_hz"]
            for lv in levels
            if lv["analysed"] and lv["cpu_ms_per_spectrum"].get("cpu_bound_rate_hz")
        ]
        report["cpu_bound_rate_hz"] = max(bound) if bound else None
        if not args.daemon_only:
            # ---- naive: RemoteDispatcher + scikit-learn in the callback
            naive = Child(
                [
                    *me,
                    "--role",
                    "consumer",
                    "--mode",
                    "naive",
                    "--address",
                    proxy.out_address,
                    "--models",
                    str(bundle),
                    "--points",
                    str(args.points),
                    "--seed",
                    str(args.seed),
                ],
                "naive consumer",
                logs / "naive.log",
            )
            stack.callback(naive.close)
            info = naive.read(600)
            warm_up(pub, lambda t: t in naive.seen)
            naive_levels = ladder(
                lambda r: consumer_level(pub, naive, r, args, args.seconds * 3 + 10),
                args.naive_rates,
                "naive",
            )
            naive.close()
            best_naive = sustained(naive_levels)
            report["naive"] = {
                "consumer": "bluesky RemoteDispatcher; callback: mu, foil alignment, bundle "
                "preprocessing and features, then scikit-learn ExtraTrees (200 trees, n_jobs=1) "
                f"per task {info.get('sklearn_tasks')}, fitted on synthetic features of the "
                f"bundle's width ({info.get('fit_seconds')} s to fit)",
                "levels": naive_levels,
            }
            report["naive_rate_hz"] = best_naive["offered_rate_hz"] if best_naive else 0

            # ---- raw ceiling: ZmqDocumentSource receive + decode only
            raw = Child(
                [*me, "--role", "consumer", "--mode", "raw", "--address", proxy.out_address],
                "raw consumer",
                logs / "raw.log",
            )
            stack.callback(raw.close)
            raw.read(120)
            warm_up(pub, lambda t: t in raw.seen)
            raw_levels = ladder(
                lambda r: consumer_level(pub, raw, r, args, args.seconds + 10),
                args.raw_rates,
                "raw",
            )
            raw.close()
            best_raw = sustained(raw_levels)
            report["raw"] = {
                "consumer": "xasflow ZmqDocumentSource (restricted pickle decoder), consumer "
                "thread only takes documents",
                "levels": raw_levels,
                "decode_us_per_event": round(decode_cost_us(args.points), 1),
            }
            report["raw_ceiling_rate_hz"] = best_raw["offered_rate_hz"] if best_raw else 0
            failed = [lv for lv in raw_levels if not lv["sustained"]]
            report["raw_ceiling_publisher_bound"] = bool(
                not failed or not failed[0]["publisher_kept_rate"]
            )
    sr = report["sustained_rate_hz"]
    report["speedup_vs_naive"] = (
        round(sr / report["naive_rate_hz"], 1) if report["naive_rate_hz"] else None
    )
    report["fraction_of_raw_ceiling"] = (
        round(sr / report["raw_ceiling_rate_hz"], 3) if report["raw_ceiling_rate_hz"] else None
    )
    p99 = report["p99_latency_ms"]
    at100 = [lv for lv in report.get("daemon_levels", []) if lv["offered_rate_hz"] == 100]
    report["p99_latency_ms_at_100hz"] = at100[0]["p99_latency_ms"] if at100 else None
    report["targets_met"] = {
        "sustained_rate_hz": sr >= TARGETS["sustained_rate_hz"],
        "p99_latency_ms": p99 is not None and p99 <= TARGETS["p99_latency_ms"],
        "p99_latency_ms_at_100hz": report["p99_latency_ms_at_100hz"] is not None
        and report["p99_latency_ms_at_100hz"] <= TARGETS["p99_latency_ms_at_100hz"],
        "speedup_vs_naive": (report["speedup_vs_naive"] or 0) >= TARGETS["speedup_vs_naive"],
        "fraction_of_raw_ceiling": (report["fraction_of_raw_ceiling"] or 0)
        >= TARGETS["fraction_of_raw_ceiling"],
    }
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["bench_seconds"] = round(time.monotonic() - t_start, 1)
    return report


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run a role (the benchmark by default)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--rates", type=_rates, default=_rates("100,250,500,750,1000,1500,2000"))
    ap.add_argument("--naive-rates", type=_rates, default=_rates("2,5,10,20,40,80"))
    ap.add_argument("--raw-rates", type=_rates, default=_rates("1000,1500,2500,4000,6000,9000"))
    ap.add_argument(
        "--seconds", type=float, default=MIN_SECONDS, help="seconds offered per rate (>= 10)"
    )
    ap.add_argument("--per-run", type=int, default=1000, help="spectra per fly run")
    ap.add_argument("--points", type=int, default=1000, help="points per spectrum")
    ap.add_argument("--pool", type=int, default=64, help="distinct spectra cycled through")
    ap.add_argument(
        "--max-drain",
        type=float,
        default=1.0,
        help="seconds after the last publish by which the last result must arrive",
    )
    ap.add_argument("--wait", type=float, default=60.0, help="max wait for a rate's results")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--daemon-only", action="store_true", help="skip the naive and raw baselines")
    ap.add_argument("--models", default=str(paths.REPO_ROOT / "models"))
    ap.add_argument("--logs", help="keep the children's logs here (default: a temp dir)")
    ap.add_argument("--role", choices=("bench", "publisher", "consumer"), default="bench")
    ap.add_argument("--mode", choices=("naive", "raw"), default="raw")
    ap.add_argument("--address", default="")
    args = ap.parse_args(argv)
    if args.role == "publisher":
        return publisher_role(args)
    if args.role == "consumer":
        return consumer_role(args)
    if not args.json:
        ap.error("--json FILE is required")
    report = run_bench(args)
    summary = {
        k: report[k]
        for k in (
            "sustained_rate_hz",
            "p99_latency_ms",
            "p99_latency_ms_at_100hz",
            "lost",
            "naive_rate_hz",
            "raw_ceiling_rate_hz",
            "speedup_vs_naive",
            "fraction_of_raw_ceiling",
            "targets_met",
            "bench_seconds",
        )
    }
    write_report(args.json, report, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
