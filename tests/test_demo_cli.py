"""`xasflow demo` as a new user meets it: its options refused clearly, its exit status true
to what happened, a second demo on the same machine, and nothing left behind by a failed
start. (From a review of the first-run experience; each test failed before its fix.)"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from xasflow.cli import build_parser
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline, known_rejections
from xasflow.daemon.registry import ModelRegistry
from xasflow.sim.demo_printer import format_counts

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "xasflow.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def test_a_second_demo_finds_a_free_http_port() -> None:
    """Before: ``--http-port`` defaulted to a fixed 8620, so a second demo (or a second user)
    died with "Address already in use". Now the default takes 8620 when it is free on
    loopback, else any free port (the demo prints the dashboard's address)."""
    from xasflow.sim.demo import DEMO_HTTP_PORT, pick_http_port

    assert build_parser().parse_args(["demo"]).http_port is None
    assert pick_http_port(0) == 0 and pick_http_port(9000) == 9000  # as asked
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # else something holds it already: the same case
            held.bind(("127.0.0.1", DEMO_HTTP_PORT))
            held.listen()
        assert pick_http_port(None) == 0


def test_demo_exits_nonzero_when_the_beamline_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a beamline subprocess that died (a traceback, a failed warm-up) printed
    "beamline exited with status 1 ... 0 spectra received" and the demo exited 0."""
    import xasflow.sim.demo as demo
    from xasflow.sim.commands import cmd_demo

    summary = {"interrupted": False, "beamline_exit": 1, "runs_finished": 0}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: summary)
    args = build_parser().parse_args(["demo", "--http-port", "0"])
    assert cmd_demo(args) == 1
    summary["beamline_exit"] = 0
    assert cmd_demo(args) == 0


def test_demo_negative_seed_is_a_usage_error() -> None:
    # Expected: --seed -1 is refused by argparse (exit 2) like the other bad counts, instead of
    # starting everything and printing a numpy traceback from the beamline subprocess.
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", "--seed", "-1"])
    assert exc.value.code == 2


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_demo_bad_http_port_is_a_clean_error(port: str) -> None:
    # Expected: an out-of-range --http-port is a usage error (exit 2, one line), not an
    # uncaught ConfigError traceback with exit 1 (after the proxy has been started).
    proc = _run_cli("--scans", "1", "--http-port", port, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert proc.returncode == 2


def test_demo_failed_start_leaves_no_temp_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Expected: when the demo cannot start (HTTP port taken), it removes the /tmp/xasflow-demo-*
    # directory it created itself (it was never printed, so the user cannot know to delete it).
    # Actual: one empty xasflow-demo-* directory is leaked per failed start.
    from xasflow.sim.demo import DemoError, run_demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DemoError):
            run_demo(scans=1, http_port=s.getsockname()[1], out=io.StringIO())
    assert list(tmp_path.glob("xasflow-demo-*")) == []


def test_demo_unknown_log_level_is_refused() -> None:
    # Expected: --log-level takes "debug, info, warning, error" (its help); anything else is a
    # usage error. Actual: `--log-level bogus` is accepted and silently logs at INFO.
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", "--log-level", "bogus"])
    assert exc.value.code == 2


def _step_scan(points: int, stopped: bool) -> list[tuple[str, dict]]:
    """The documents of a step scan of ``points`` points, with its stop or cut before it."""
    from event_model import compose_run

    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    keys = {k: {"source": "sim", "dtype": "number", "shape": []} for k in ("energy", "I0", "It")}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(points):
        data = {"energy": 8950.0 + 10 * i, "I0": 1.0, "It": 0.5}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, 1.0))))
    return [*docs, ("stop", run.compose_stop())] if stopped else docs


def test_the_demos_counts_add_up_after_a_run_cut_by_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C stops the daemon while a step scan's stop is still on its way: the assembler
    refuses the scan's spectrum ``missing_stop`` at shutdown, before the analysis (which
    never received it). Before, the demo's last line said "1 spectra received, 0 analysed,
    2 rejected": received beside the rejections of both stages. Now received = analysed +
    rejected by the analysis, and what was rejected before it is told apart."""
    counters = Counters(rejections=known_rejections())
    (tmp_path / "models").mkdir()
    pipeline = Pipeline(ModelRegistry(tmp_path / "models", counters), counters)  # no bundle
    assembler = RunAssembler()
    docs = _step_scan(3, stopped=True) + _step_scan(3, stopped=False)
    outputs = [out for name, doc in docs for out in assembler.feed(name, doc)]
    outputs += assembler.flush_all("shutdown")  # what Daemon.stop does with the open run
    pipeline.handle_batch(outputs)
    c = counters.snapshot()
    assert c["rejected_by_stage"] == {
        "analysis": {"no_model": 1},
        "assembly": {"missing_stop": 1},
    }
    line = format_counts(c)
    assert line.startswith(
        "1 spectra received, 0 analysed, 1 rejected {'no_model': 1}; "
        "1 rejected before the analysis {'missing_stop': 1}; latency"
    ), line
