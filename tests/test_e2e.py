"""End to end on loopback: bluesky's real 0MQ proxy, a real RunEngine in a subprocess (the
simulated beamline), the daemon, and the embedded tiled catalog, driven by ``xasflow demo``.

The model is the tiny synthetic Cu K bundle of ``conftest`` (trained here, seconds), so
the predictions are not judged, only that every spectrum went the whole way.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("bluesky")
pytest.importorskip("ophyd")


from xasflow.adapters.tiled_store import read_analysis
from xasflow.sim.demo import DemoError, find_bundle, run_demo

FLY_SPECTRA = 3
TESTS = Path(__file__).resolve().parent

#: A beamline that scans 2 spectra of a fly scan and is cut before the scan's stop: it warms
#: up against the daemon's /health like the demo's, announces its run, publishes, and exits
#: once the daemon has received both spectra (the run is open there, its answers published).
CUT_SCAN = """
import json, sys, time, urllib.request, uuid
import numpy as np
from helpers import fly_scan, transmission
from xasflow.adapters.probes import PROBE_KEY
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher

args = sys.argv[1:]
publish_to, health = args[args.index("--publish") + 1], args[args.index("--health") + 1]

def daemon():
    try:
        with urllib.request.urlopen(health, timeout=2.0) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return {}

def wait(check):
    deadline = time.monotonic() + 30.0
    while not check():
        assert time.monotonic() < deadline, "the daemon never got there"
        time.sleep(0.05)

pub = ZmqDocumentPublisher(publish_to)
token = uuid.uuid4().hex
def probe():
    uid = f"probe-{token}-{time.monotonic()}"
    pub("start", {"uid": uid, "time": time.time(), PROBE_KEY: token})
    pub("stop", {"uid": uid + "-stop", "run_start": uid, "time": time.time()})
    return token in daemon().get("probes", {}).get("tokens", [])
wait(probe)
energy = np.linspace(8800.0, 9400.0, 800)
uid, docs = fly_scan(energy, [transmission(energy, seed=k) for k in range(2)])
print(json.dumps({"run": uid, "scan": "fly", "sample": "cut-short"}), flush=True)
for name, doc in docs[:-1]:  # the stop never comes: the daemon closes the run as it stops
    pub(name, doc)
wait(lambda: daemon().get("counters", {}).get("spectra_received", 0) >= 2)
pub.close()
"""


def test_demo_streams_a_step_and_a_fly_scan_end_to_end(
    models_dir: Path,
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    summary = run_demo(
        scans=2,
        models_dir=models_dir,
        store_dir=tmp_path / "store",
        http_port=0,
        fly_spectra=FLY_SPECTRA,
        seed=7,
        out=out,
    )
    text = out.getvalue()
    assert not summary["interrupted"] and summary["beamline_exit"] == 0, text
    runs = summary["runs"]
    assert sorted(info["scan"] for info in runs.values()) == ["fly", "step"], text
    assert summary["runs_finished"] == 2, text
    counters = summary["counters"]
    assert counters["spectra_received"] == 1 + FLY_SPECTRA
    assert counters["spectra_analysed"] == 1 + FLY_SPECTRA, counters["rejected"]
    assert counters["decode_errors"] == {} and counters["runs_closed"] == {"success": 2}
    assert summary["spectra_printed"] == 1 + FLY_SPECTRA
    assert text.count(": CN ") == 1 + FLY_SPECTRA  # one printed prediction per spectrum
    # every result is in the tiled catalog, readable by the raw run's uid after shutdown
    for raw_uid, info in runs.items():
        md, rows = read_analysis(tmp_path / "store", raw_uid)
        assert md["start"]["raw_uid"] == raw_uid
        assert md["start"]["scan_kind"] == info["scan"]
        assert md["stop"]["exit_status"] == "success"
        n = 1 if info["scan"] == "step" else FLY_SPECTRA
        assert rows["index"].tolist() == list(range(n))
        assert set(rows["status"]) == {"ok"} and rows["cn"].notna().all()
        # (foil alignment is covered by test_service_daemon: the FEFF demo spectra start above the
        # Cu foil's edge, so here it is flagged align_failed and the spectrum used unaligned)
        assert rows["e0"].between(8970.0, 9010.0).all()


def test_demo_without_a_bundle_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="make train-cu"):
        find_bundle(tmp_path)
    bundle = tmp_path / "cu-k"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(DemoError, match="--models takes the directory holding bundles"):
        find_bundle(bundle)  # the bundle itself, not its directory
    with pytest.raises(DemoError, match=r"no verified Cu K-edge model bundle"):
        run_demo(scans=1, models_dir=tmp_path, store_dir=tmp_path / "s", http_port=0)


def test_demo_lines_from_two_threads_never_run_together() -> None:
    """The beamline relay and the result printer print from two threads; ``print`` writes a
    line and its newline apart, so a slow terminal showed "... valence +1analysis of ..."."""
    import threading
    import time

    from xasflow.sim.demo_printer import say

    class SlowTerminal(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(1e-4)  # the other thread gets the GIL in between
            return super().write(text)

    out = SlowTerminal()
    lines = {who: [f"{who} line {k}" for k in range(40)] for who in ("beamline", "analysis")}
    threads = [
        threading.Thread(target=lambda own=own: [say(out, line) for line in own])
        for own in lines.values()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = out.getvalue().splitlines()
    assert sorted(written) == sorted(lines["beamline"] + lines["analysis"])


def test_the_demo_prints_the_answers_the_daemon_gives_while_it_stops(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan cut before its stop (here by a beamline that exits; Ctrl-C alike): the daemon
    closes the open run as it stops, and publishes that run's end then. Before: the demo
    stopped its printer before the daemon, so that answer was never printed (0 runs
    finished). Now the printer stops after the daemon has closed, once it has printed every
    document the daemon published."""
    import xasflow.sim.demo as demo

    script = tmp_path / "cut_scan.py"
    script.write_text(CUT_SCAN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))

    class Beamline(subprocess.Popen):  # type: ignore[type-arg]
        """The demo's beamline subprocess runs the cut scan instead; anything else as asked."""

        def __init__(self, cmd: list[str], *args: Any, **kwargs: Any) -> None:
            if list(cmd[1:3]) == ["-m", "xasflow.sim.demo"]:
                cmd = [cmd[0], str(script), *cmd[3:]]
            super().__init__(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Beamline)
    monkeypatch.setattr(demo, "_DRAIN_TIMEOUT_S", 0.0)  # the scan never ends: stop at once
    out = io.StringIO()
    summary = run_demo(
        scans=1, models_dir=models_dir, store_dir=tmp_path / "store", http_port=0, out=out
    )
    text = out.getvalue()
    assert summary["beamline_exit"] == 0 and not summary["interrupted"], text
    assert summary["counters"]["runs_closed"] == {"abort": 1}, text  # closed as it stopped
    assert summary["runs_finished"] == 1, text
    assert "analysis of cut-short fly" in text and "(abort" in text, text
    assert summary["spectra_printed"] == 2 == summary["counters"]["spectra_received"], text
