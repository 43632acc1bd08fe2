"""Helpers shared by the daemon's tests: condition waits, free ports, reading a PV, a daemon's
HTTP and a daemon in a child process; and, re-exported here, what the topic modules beside it
hold: analysis-run documents (``document_helpers``), synthetic step and fly scans
(``scan_helpers``), a daemon on a loopback 0MQ bus (``bus_helpers``), the store's descriptor
(``store_helpers``) and the processing loop's stand-ins (``processor_helpers``).

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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bus_helpers import (
    ANALYSIS,
    DEADLINE_S,
    Harness,
    LoopbackProxy,
    Results,
    daemon_config,
    publish,
    warm_up,
)
from document_helpers import Docs, analysis_run_docs, burst_docs, raw_uids, unpaged
from processor_helpers import RecordingPipeline, processor_parts
from scan_helpers import CU_K, STEP_GRID, fly_scan, step_scan, transmission
from store_helpers import STORE_DESCRIPTOR, store_row

__all__ = [
    "ANALYSIS",
    "CU_K",
    "DEADLINE_S",
    "STEP_GRID",
    "STORE_DESCRIPTOR",
    "Docs",
    "Harness",
    "LoopbackProxy",
    "RecordingPipeline",
    "Results",
    "analysis_run_docs",
    "burst_docs",
    "daemon_config",
    "daemon_health",
    "fly_scan",
    "free_port",
    "get",
    "held_elsewhere",
    "processor_parts",
    "publish",
    "raw_uids",
    "read_pv",
    "serve_subprocess",
    "step_scan",
    "store_row",
    "strict_json",
    "transmission",
    "unpaged",
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


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity (not JSON: jq, JavaScript, Go, ... reject them)."""

    def refuse(const: str) -> Any:
        raise ValueError(f"not valid JSON: {const}")

    return json.loads(text, parse_constant=refuse)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_pv(pv: Any) -> Any:
    """A caproto client PV's value: a scalar (strings decoded) or a list."""
    data = pv.read(timeout=5.0).data
    value = data[0] if len(data) == 1 else list(data)
    return value.decode() if isinstance(value, bytes) else value


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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


@contextmanager
def held_elsewhere(setup: str) -> Iterator[subprocess.Popen[str]]:
    """Another process that runs ``setup`` (Python that opens what holds a lock, e.g. a
    store) and keeps it open: yielded once it is ready, killed (as a crash would) at exit."""
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from pathlib import Path\n{setup}\n"
            "print('ready', flush=True); sys.stdin.read()",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        yield holder
    finally:
        holder.kill()
        holder.wait(10.0)
