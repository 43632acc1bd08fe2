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
scan, lets the daemon finish what it holds, and stops everything this command started. The
printer stops after the daemon: the answers the daemon gives as it stops (the runs it closes
then, a scan cut short) are printed too.

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
import os
import shutil
import signal
import socket
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

from xasflow import paths
from xasflow.adapters.probes import PROBE_KEY
from xasflow.sim.demo_printer import LastDocument, Printer, format_counts, format_result, say

__all__ = ["DemoError", "beamline_main", "find_bundle", "format_result", "run_demo"]

#: How long the demo waits for the last results after the beamline has finished.
_DRAIN_TIMEOUT_S = 30.0
#: How long the printer waits, once the daemon has stopped, for what it published last.
_PRINT_TIMEOUT_S = 10.0
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
    if (models_dir / "manifest.json").is_file():  # the bundle itself, not its directory
        raise DemoError(
            f"{models_dir} is a model bundle: --models takes the directory holding bundles "
            f"(here {models_dir.parent})"
        )
    raise DemoError(
        f"no verified {element} {edge}-edge model bundle in {models_dir}{why}.\n"
        f"Build the shipped one with `make train-cu` (it writes models/cu-k from the shared "
        f"FEFF data), or point --models at a directory holding one."
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
                say(out, f"beamline: {line}")
                continue
            if isinstance(msg, dict) and "run" in msg:
                on_run(msg)
            elif isinstance(msg, dict) and "error" in msg:
                say(out, f"beamline error: {msg['error']}")

    thread = threading.Thread(target=pump, name="xasflow-demo-beamline", daemon=True)
    thread.start()
    return thread


def _finish_printing(
    printer: Printer, daemon: Callable[[], Any], last: LastDocument, out: TextIO
) -> None:
    """Stop ``printer`` once it has printed all that the stopped ``daemon()`` (None when none
    was made) published, runs it closed as it stopped included (``last``: its last document);
    say what never came."""
    made = daemon()
    sent = made.view.output_stats().get("sent", 0) if made is not None else 0
    missing = printer.finish(sent, _PRINT_TIMEOUT_S, last.uid)
    if missing:
        say(out, f"{missing} analysis documents the daemon published did not arrive to print")


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


#: The demo's dashboard port when it is free on loopback; when not (a second demo, another
#: user on the machine) any free port, printed with the dashboard's address.
DEMO_HTTP_PORT = 8620


def pick_http_port(port: int | None) -> int:
    """``port`` as asked (0: any free one); None: :data:`DEMO_HTTP_PORT` if it is free on
    loopback, else 0."""
    if port is not None:
        return port
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", DEMO_HTTP_PORT))
        except OSError:
            return 0
    return DEMO_HTTP_PORT


def run_demo(
    scans: int = 0,
    fly: bool = False,
    duration: float = 0.0,
    *,
    models_dir: str | Path | None = None,
    store_dir: str | Path | None = None,
    http_port: int | None = None,
    fly_spectra: int = 5,
    seed: int | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run the demo until ``scans`` scans are analysed, ``duration`` s pass, or Ctrl-C.

    Returns a summary: ``runs`` (raw uid -> what the beamline said of it), ``runs_finished``
    (analysis runs seen ending on the bus), ``spectra_printed``, the daemon's ``counters``
    and the ``store`` directory. Raises DemoError when something it needs is missing; a
    store directory it made itself is removed then (the daemon never started: it is empty).
    """
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.service import Daemon, DaemonError

    out = out if out is not None else sys.stdout
    models = Path(models_dir) if models_dir is not None else paths.REPO_ROOT / "models"
    bundle = find_bundle(models)
    from xasflow.sim.feff_demo import load_demo_spectra

    if not load_demo_spectra():
        raise DemoError("no demo spectra packaged in xasflow/data/demo (see xasflow.sim.feff_demo)")
    made_store = not store_dir
    store = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="xasflow-demo-"))

    from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig
    from xasflow.sim.beamline import start_proxy

    restore = _interrupt_on_signals()
    started: list[Callable[[], Any]] = [restore]  # stoppers, in start order
    printer: Printer | None = None
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
        # the printer first: stopped after the daemon, it prints what the daemon gives last
        source = ZmqDocumentSource(
            ZmqInputConfig(address=proxy.out_address, prefix=_ANALYSIS_PREFIX.encode())
        )
        source.start()
        started.append(source.close)
        printer = Printer(source, out)
        printer.start()
        last = LastDocument()  # the daemon's last document: the printer's drain ends there
        started.append(functools.partial(_finish_printing, printer, lambda: daemon, last, out))
        config = DaemonConfig().with_updates(
            {
                "input": {"address": proxy.out_address},
                "output": {"address": proxy.in_address, "prefix": _ANALYSIS_PREFIX},
                "models": {"directory": str(models)},
                "storage": {"directory": str(store)},
                "http": {"port": pick_http_port(http_port)},
                "analysis": {"run_timeout_s": 30.0},
            }
        )
        daemon = Daemon(config)
        daemon.add_listener(last)
        try:
            daemon.start()
        except DaemonError as exc:
            hint = " (--http-port 0 picks a free port)" if "HTTP" in str(exc) else ""
            if made_store:  # nothing was stored: no directory left behind, never printed
                shutil.rmtree(store, ignore_errors=True)
            raise DemoError(f"{exc}{hint}") from None
        started.append(daemon.stop)
        bundles = ", ".join(m["bundle_id"] for m in daemon.view.models()) or "none"
        print(
            f"daemon: ready, model {bundles} (from {bundle}); dashboard {daemon.http_url}/, "
            f"{daemon.http_url}/metrics, {daemon.http_url}/health; results stored in {store}",
            file=out,
            flush=True,
        )

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
    if summary["counters"]:
        print(
            f"done: {format_counts(summary['counters'])}; results in {store}", file=out, flush=True
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
