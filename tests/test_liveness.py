"""A stalled analysis shows: the processing loop's last pass ages on /health and /metrics.

From a review (s38 finding 5): with the processing thread held inside one document's
handling (a hung store, a stuck call), ``/health`` said ready, ``/readyz`` 200 and the EPICS
``HEARTBEAT`` kept counting; nothing said when the loop last passed or the input last heard a
document. The daemon now exports both (``last_turn_age_s`` / ``last_document_age_s`` in
``/health``, ``xasflow_processing_last_turn_timestamp_seconds`` and
``xasflow_input_last_document_timestamp_seconds`` in ``/metrics``).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")
pytest.importorskip("caproto")

from helpers import (
    STEP_GRID,
    Harness,
    LoopbackProxy,
    daemon_config,
    free_port,
    publish,
    step_scan,
    transmission,
    wait_for,
)

from xasflow import paths

pytestmark = pytest.mark.timeout(180)


def _health(h: Harness) -> dict[str, Any]:
    with urllib.request.urlopen(f"{h.daemon.http_url}/health", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def _metrics(h: Harness) -> str:
    with urllib.request.urlopen(f"{h.daemon.http_url}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _gauge(h: Harness, name: str) -> float | None:
    """A single-sample gauge's value on /metrics, None if the family has no sample."""
    found = re.search(rf"^{name} (\S+)$", _metrics(h), re.MULTILINE)
    return float(found[1]) if found else None


def test_a_held_processing_thread_shows_a_growing_turn_age(tmp_path: Path) -> None:
    """The processing thread held inside a scan's start (the assembler's ``feed`` waits on an
    event): the loop's last-pass age on /health and /metrics rises above 3 s while the rest
    of the scan waits in the queue and the input keeps hearing documents; released, the age
    falls back under a second and the scan is analysed. Before, /health had no such field."""
    proxy = LoopbackProxy()
    cfg = daemon_config(paths.REPO_ROOT / "models", proxy, tmp_path / "store")
    epics = {"enabled": True, "prefix": "LIVE:XAS:", "port": free_port()}  # LOOP_AGE's source
    h = Harness(cfg.with_updates({"epics": epics}), proxy)
    try:
        assembler = h.daemon.parts.assembler
        feed, entered, release = assembler.feed, threading.Event(), threading.Event()

        def held_feed(name: str, doc: dict[str, Any]) -> Any:
            if name == "start" and doc.get("stall"):
                entered.set()
                release.wait(120)  # a hung call, until the test lets it go
            return feed(name, doc)

        assembler.feed = held_feed
        idle = _health(h)
        assert idle["last_turn_age_s"] < 1.0 and idle["queue_depth"] == 0
        # XasflowRunsTimingOut (the input silent mid-run) reads this series: from 0, so that
        # increase() sees the first run a timeout closes (it used to appear at 1)
        assert 'xasflow_runs_closed_total{exit_status="timeout"} 0.0' in _metrics(h)
        uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID), md={"stall": True})
        publish(h.pub, docs[:1])  # the start alone, then the rest once its turn is held: a
        wait_for(entered.is_set, "the processing thread inside the held start")
        publish(h.pub, docs[1:])  # turn that began with all of them queued took them all
        stalled = wait_for(
            lambda: (b := _health(h))["last_turn_age_s"] > 3.0 and b, "a turn age over 3 s", 60
        )
        assert stalled["ready"] is True  # still: ready means started, not analysing
        assert stalled["queue_depth"] > 0  # the scan's events wait behind the held start
        assert stalled["last_document_age_s"] < stalled["last_turn_age_s"]  # input heard them
        held_at = _gauge(h, "xasflow_processing_last_turn_timestamp_seconds")
        assert held_at is not None and time.time() - held_at > 3.0
        assert _gauge(h, "xasflow_input_last_document_timestamp_seconds") is not None
        ioc = h.daemon.parts.ioc
        wait_for(lambda: ioc.group.loop_age.value > 3.0, "the EPICS LOOP_AGE over 3 s")
        release.set()
        wait_for(lambda: _health(h)["last_turn_age_s"] < 1.0, "the turn age back under 1 s")
        wait_for(lambda: ioc.group.loop_age.value < 1.5, "LOOP_AGE back under 1.5 s")
        h.results.wait([uid], timeout=60)
        passed_at = _gauge(h, "xasflow_processing_last_turn_timestamp_seconds")
        assert passed_at is not None and passed_at > held_at  # the loop passes again
    finally:
        h.close()
        proxy.close()
