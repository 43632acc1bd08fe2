"""``xasflow demo``: proxy, daemon and a simulated beamline on loopback, with live predictions.

What runs, and who stops it:

* bluesky's 0MQ proxy (:func:`xasflow.sim.beamline.start_proxy`, a subprocess, free ports);
* the :class:`~xasflow.daemon.service.Daemon` in this process, serving the shipped Cu K
  bundle from ``models/`` and storing analysis runs in an embedded tiled catalog;
* the simulated beamline in a subprocess (``python -m xasflow.sim.demo --publish ...``): a
  real RunEngine publishing through bluesky's ``Publisher``, alternating step and fly
  (quick-XAS) scans of the packaged FEFF demo compounds (``xasflow/data/demo``);
* a subscriber on the analysis prefix that prints one line per analysed spectrum.

Ctrl-C or SIGTERM (or ``--scans N`` / ``--duration S``) stops the beamline after its current
scan, lets the daemon finish what it holds, and stops everything this command started.

The beamline subprocess warms up 0MQ (slow joiner) by publishing probe runs until the
daemon's ``/health`` lists the probe token, then prints one JSON line per run it starts
(``{"run": uid, "scan": "step"|"fly", "sample": ..., "expected": {...}}``), which the
demo uses to label the predictions it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from event_model import DocumentRouter

from xasflow import paths
from xasflow.adapters.probes import PROBE_KEY
from xasflow.adapters.routing import SafeRouter, stream_factory

__all__ = ["DemoError", "beamline_main", "find_bundle", "format_result", "run_demo"]

#: How long the demo waits for the last results after the beamline has finished.
_DRAIN_TIMEOUT_S = 30.0
_ANALYSIS_PREFIX = "xasflow-analysis"


class DemoError(RuntimeError):
    """The demo cannot run (no model bundle, no demo spectra, a part failed to start)."""


# --------------------------------------------------------------------------- helpers


def find_bundle(models_dir: Path, element: str = "Cu", edge: str = "K") -> Path:
    """The verified bundle for ``element``/``edge`` in ``models_dir``; DemoError saying how to
    build one when there is none."""
    from xasflow.models.bundle import BundleError, read_manifest, verify_bundle

    refused: list[str] = []
    candidates = sorted(p for p in models_dir.glob("*") if p.is_dir() and p.name[0] != ".")
    for path in candidates:
        try:
            manifest = read_manifest(path)
        except BundleError:
            continue
        if (manifest.element, manifest.edge) != (element, edge):
            continue
        try:
            verify_bundle(path)
        except BundleError as exc:
            refused.append(f"{path}: {exc}")
            continue
        return path
    why = f"; refused: {'; '.join(refused)}" if refused else ""
    raise DemoError(
        f"no verified {element} {edge}-edge model bundle in {models_dir}{why}.\n"
        f"Build the shipped one with `make train-cu` (it writes models/cu-k from the shared "
        f"FEFF data), or point --models at a directory holding one."
    )


def format_result(doc: dict[str, Any], label: str = "") -> str:
    """One line for an analysis event: the predictions, or the rejection reason."""
    d = doc.get("data", {})
    head = f"{label} #{d.get('index')}" if label else f"spectrum #{d.get('index')}"
    if d.get("status") != "ok":
        return f"{head}: rejected {d.get('reason')}: {d.get('detail') or ''}".rstrip()
    parts = []
    if d.get("cn") is not None:
        p = d.get("cn_probability")
        parts.append(f"CN {d['cn']}" + (f" (p {p:.2f})" if isinstance(p, float) else ""))
    if d.get("motif"):
        parts.append(f"motif {d['motif']}")
    if _finite(d.get("distance")):
        parts.append(f"d {d['distance']:.2f} Å")
    if d.get("valence") is not None:
        parts.append(f"valence {d['valence']:+d}")
    if _finite(d.get("charge")):
        parts.append(f"charge {d['charge']:+.2f}")
    if _finite(d.get("e0")):
        parts.append(f"E0 {d['e0']:.1f} eV")
    if _finite(d.get("energy_shift")):
        parts.append(f"shift {d['energy_shift']:+.2f} eV")
    if _finite(d.get("latency_ms")):
        parts.append(f"{d['latency_ms']:.1f} ms")
    flags = f" [{d['flags']}]" if d.get("flags") else ""
    return f"{head}: " + ", ".join(parts) + flags


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _describe_expected(info: dict[str, Any]) -> str:
    exp = info.get("expected") or {}
    if not isinstance(exp, dict) or not exp:
        return ""
    valence = exp.get("oxidation_state")
    shown = f"{valence:+d}" if isinstance(valence, int) else str(valence)
    return f"expected CN {exp.get('cn')}, {exp.get('motif')}, valence {shown}"


class _Printer:
    """Follows analysis runs on the bus and prints them; counts finished runs."""

    def __init__(self, source: Any, out: TextIO) -> None:
        self.source = source
        self.out = out
        self.runs: dict[str, dict[str, Any]] = {}  # raw uid -> beamline info
        self._router = SafeRouter(
            [stream_factory({}, on_run=lambda start: [_RunPrinter(self, start)])], "demo printer"
        )
        self.finished = 0
        self.analysed = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="xasflow-demo-print", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def note_run(self, info: dict[str, Any]) -> None:
        with self._lock:
            self.runs[str(info.get("run"))] = info
        exp = _describe_expected(info)
        self._print(
            f"beamline: {info.get('scan')} scan of {info.get('sample')} started "
            f"({str(info.get('run'))[:8]})" + (f"; {exp}" if exp else "")
        )

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _label(self, raw_uid: str) -> str:
        info = self.runs.get(raw_uid, {})
        sample = info.get("sample") or "run"
        scan = info.get("scan") or ""
        return f"{sample} {scan} {raw_uid[:8]}".replace("  ", " ")

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.source.get(timeout=0.1)
            if item is None:
                continue
            name, doc = item
            with self._lock:
                self._router(name, doc)
                self._changed.notify_all()

    def wait_finished(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` analysis runs have ended; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.finished < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


class _RunPrinter(DocumentRouter):
    """One analysis run on the bus: prints its ``primary`` results and its end."""

    def __init__(self, printer: _Printer, start: dict[str, Any]) -> None:
        super().__init__()
        self.printer = printer
        self.raw_uid = str(start.get("raw_uid"))
        self.primary: str | None = None

    def descriptor(self, doc: Any) -> Any:
        if doc.get("name") == "primary":
            self.primary = doc.get("uid")

    def event(self, doc: Any) -> Any:
        if doc.get("descriptor") != self.primary:
            return  # another stream (recommendations): not a result
        p = self.printer
        if doc.get("data", {}).get("status") == "ok":
            p.analysed += 1
        else:
            p.rejected += 1
        p._print("  " + format_result(doc, p._label(self.raw_uid)))

    def stop(self, doc: Any) -> Any:
        p = self.printer
        p.finished += 1
        p._print(
            f"analysis of {p._label(self.raw_uid)} done: {doc.get('n_analysed')} analysed, "
            f"{doc.get('n_rejected')} rejected ({doc.get('exit_status')}"
            + (f": {doc.get('reason')}" if doc.get("reason") else "")
            + ")"
        )


def _read_beamline(
    proc: subprocess.Popen[str], on_run: Callable[[dict[str, Any]], None], out: TextIO
) -> threading.Thread:
    """Relay the beamline subprocess's JSON lines (runs) and other output."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                print(f"beamline: {line}", file=out, flush=True)
                continue
            if isinstance(msg, dict) and "run" in msg:
                on_run(msg)
            elif isinstance(msg, dict) and "error" in msg:
                print(f"beamline error: {msg['error']}", file=out, flush=True)

    thread = threading.Thread(target=pump, name="xasflow-demo-beamline", daemon=True)
    thread.start()
    return thread


def _stop_process(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM (the beamline finishes its scan), then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def _interrupt_on_signals() -> Callable[[], None]:
    """Make SIGTERM (and SIGINT, even where a shell ignored it) raise KeyboardInterrupt in the
    main thread; returns what restores the previous handlers (a no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    fired: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        if fired:  # already stopping: let the clean-up finish (it has timeouts)
            print("still stopping ...", file=sys.stderr, flush=True)
            return
        fired.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore


# --------------------------------------------------------------------------- the demo


def run_demo(
    scans: int = 0,
    fly: bool = False,
    duration: float = 0.0,
    *,
    models_dir: str | Path | None = None,
    store_dir: str | Path | None = None,
    http_port: int = 8620,
    fly_spectra: int = 5,
    seed: int | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run the demo until ``scans`` scans are analysed, ``duration`` s pass, or Ctrl-C.

    Returns a summary: ``runs`` (raw uid -> what the beamline said of it), ``runs_finished``
    (analysis runs seen ending on the bus), ``spectra_printed``, the daemon's ``counters``
    and the ``store`` directory. Raises DemoError when something it needs is missing.
    """
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.service import Daemon, DaemonError

    out = out if out is not None else sys.stdout
    models = Path(models_dir) if models_dir is not None else paths.REPO_ROOT / "models"
    bundle = find_bundle(models)
    from xasflow.sim.feff_demo import load_demo_spectra

    if not load_demo_spectra():
        raise DemoError("no demo spectra packaged in xasflow/data/demo (see xasflow.sim.feff_demo)")
    store = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="xasflow-demo-"))

    from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig
    from xasflow.sim.beamline import start_proxy

    restore = _interrupt_on_signals()
    started: list[Callable[[], Any]] = [restore]  # stoppers, in start order
    printer: _Printer | None = None
    daemon: Any = None
    proc: subprocess.Popen[str] | None = None
    interrupted = False
    try:
        proxy = start_proxy(0, 0)
        started.append(proxy.stop)
        print(
            f"proxy: publishers -> {proxy.in_address}, subscribers <- {proxy.out_address}",
            file=out,
            flush=True,
        )
        config = DaemonConfig().with_updates(
            {
                "input": {"address": proxy.out_address},
                "output": {"address": proxy.in_address, "prefix": _ANALYSIS_PREFIX},
                "models": {"directory": str(models)},
                "storage": {"directory": str(store)},
                "http": {"port": http_port},
                "analysis": {"run_timeout_s": 30.0},
            }
        )
        daemon = Daemon(config)
        try:
            daemon.start()
        except DaemonError as exc:
            hint = " (--http-port 0 picks a free port)" if "HTTP" in str(exc) else ""
            raise DemoError(f"{exc}{hint}") from None
        started.append(daemon.stop)
        bundles = ", ".join(m["bundle_id"] for m in daemon.models()) or "none"
        print(
            f"daemon: ready, model {bundles} (from {bundle}); {daemon.http_url}/metrics, "
            f"{daemon.http_url}/health; results stored in {store}",
            file=out,
            flush=True,
        )

        source = ZmqDocumentSource(
            ZmqInputConfig(address=proxy.out_address, prefix=_ANALYSIS_PREFIX.encode())
        )
        source.start()
        started.append(source.close)
        printer = _Printer(source, out)
        printer.start()
        started.append(printer.stop)

        cmd = [
            sys.executable,
            "-m",
            "xasflow.sim.demo",
            "--publish",
            proxy.in_address,
            "--health",
            f"{daemon.http_url}/health",
            "--scans",
            str(scans),
            "--duration",
            str(duration),
            "--fly-spectra",
            str(fly_spectra),
        ]
        if fly:
            cmd.append("--fly")
        if seed is not None:
            cmd += ["--seed", str(seed)]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # Ctrl-C reaches us; we stop it cleanly
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        started.append(functools.partial(_stop_process, proc, 20.0))
        pump = _read_beamline(proc, printer.note_run, out)
        print("beamline: starting (Ctrl-C stops the demo)", file=out, flush=True)
        deadline = time.monotonic() + duration if duration > 0 else None
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline + 5.0:
                break  # the beamline should have stopped itself by now
            if scans and printer.finished >= scans:
                break
            time.sleep(0.1)
        pump.join(5.0)
        if proc.poll() not in (None, 0):
            print(f"beamline exited with status {proc.returncode}", file=out, flush=True)
        expected = scans if scans else len(printer.runs)
        printer.wait_finished(expected, _DRAIN_TIMEOUT_S)
    except KeyboardInterrupt:
        interrupted = True
        print(
            "\ninterrupted: stopping the beamline, the daemon and the proxy", file=out, flush=True
        )
    finally:
        for stopper in reversed(started):
            try:
                stopper()
            except Exception as exc:  # keep stopping the rest
                print(f"while stopping: {type(exc).__name__}: {exc}", file=out, flush=True)
    summary: dict[str, Any] = {
        "interrupted": interrupted,
        "store": str(store),
        "runs_finished": printer.finished if printer else 0,
        "runs_started": len(printer.runs) if printer else 0,
        "runs": dict(printer.runs) if printer else {},
        "spectra_printed": (printer.analysed + printer.rejected) if printer else 0,
        "counters": daemon.counters.snapshot() if daemon is not None else {},
        "beamline_exit": proc.returncode if proc is not None else None,
    }
    c = summary["counters"]
    if c:
        print(
            f"done: {c['spectra_received']} spectra received, {c['spectra_analysed']} analysed, "
            f"{c['spectra_rejected']} rejected {c['rejected'] or ''}; "
            f"latency p50 {c['latency']['p50_ms'] or 0:.1f} ms, "
            f"p99 {c['latency']['p99_ms'] or 0:.1f} ms; results in {store}",
            file=out,
            flush=True,
        )
    return summary


# --------------------------------------------------------------------------- beamline process


def _seen_by_daemon(health_url: str) -> Callable[[str], bool]:
    def seen(token: str) -> bool:
        try:
            with urllib.request.urlopen(health_url, timeout=2.0) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return token in body.get("probes", {}).get("tokens", [])

    return seen


def beamline_main(argv: Sequence[str] | None = None) -> int:
    """The simulated beamline subprocess: scans of the demo compounds until told to stop."""
    p = argparse.ArgumentParser(prog="python -m xasflow.sim.demo", description=__doc__)
    p.add_argument("--publish", required=True, help="the proxy's in address")
    p.add_argument("--health", help="daemon /health URL to warm up against")
    p.add_argument("--scans", type=int, default=0, help="stop after this many scans (0: no limit)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    p.add_argument("--fly", action="store_true", help="fly scans only (default: alternate)")
    p.add_argument("--step", action="store_true", help="step scans only")
    p.add_argument("--fly-spectra", type=int, default=5, help="spectra per fly scan")
    p.add_argument("--fly-points", type=int, default=1000, help="points per fly spectrum")
    p.add_argument("--period", type=float, default=0.2, help="seconds between fly spectra")
    p.add_argument("--sample", action="append", help="only these demo compounds (repeatable)")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)

    stop = threading.Event()
    parent = os.getppid()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import numpy as np

    from xasflow.sim.beamline import (
        BeamlineModel,
        SimBeamline,
        demo_spectra,
        fly_energies,
        fly_scan_plan,
        step_energies,
        step_scan_plan,
    )
    from xasflow.sim.feff_demo import load_demo_spectra

    demos = [d for d in load_demo_spectra() if not args.sample or d.name in args.sample]
    if not demos:
        print(json.dumps({"error": "no demo spectra to scan"}), flush=True)
        return 2
    # FEFF's grids start at the edge; the extended spectra give scans a pre-edge, so the foil
    # alignment and the pre-edge line of the normalisation both work
    samples = {s.meta["name"]: s for s in demo_spectra([d.name for d in demos])}
    rng = np.random.default_rng(args.seed)

    def announce(name: str, doc: dict[str, Any]) -> None:
        if name == "start" and PROBE_KEY not in doc:
            msg = {
                "run": doc["uid"],
                "scan": doc.get("xas_scan"),
                "sample": doc.get("sample_name"),
                "expected": doc.get("demo_expected"),
            }
            print(json.dumps(msg), flush=True)

    beamline = SimBeamline(publish_to=args.publish, extra_callbacks=[announce])
    try:
        if args.health:
            beamline.warm_up(_seen_by_daemon(args.health), timeout=30.0, interval=0.1)
        else:
            time.sleep(0.5)
        t0 = time.monotonic()
        done = 0
        while not stop.is_set():
            if args.scans and done >= args.scans:
                break
            if args.duration and time.monotonic() - t0 >= args.duration:
                break
            if os.getppid() != parent:
                break  # the demo went away without stopping us
            demo = demos[done % len(demos)]
            kind = "fly" if args.fly else "step" if args.step else ("step", "fly")[done % 2]
            model = BeamlineModel(
                samples[demo.name],
                energy_offset=float(rng.uniform(-2.0, 2.0)),
                seed=int(rng.integers(2**31)),
            )
            md = {"sample_name": demo.name, "demo_expected": demo.labels}
            if kind == "step":
                grid = step_energies(edge_step=0.5, pre_step=10.0, post_step=5.0, within=model)
                plan = step_scan_plan(model, grid, md=md)
            else:
                grid = fly_energies(args.fly_points, within=model)
                plan = fly_scan_plan(model, grid, args.fly_spectra, md=md, period=args.period)
            beamline.run(plan)
            done += 1
    except TimeoutError as exc:
        print(json.dumps({"error": f"warm-up failed: {exc}"}), flush=True)
        return 3
    finally:
        beamline.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m xasflow.sim.demo`` (the beamline subprocess)."""
    return beamline_main(argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
