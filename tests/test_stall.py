"""A daemon that stood still (SIGSTOP, swapping) must not time out what it was waiting for.

Issue 13: after a 10 s SIGSTOP under a 100/s stream, the run was closed "timeout" before its
queued events were read (they became ``late_document`` rejections, the stop said nothing of
them), and held results went out unstored because the commit gate's timeout ran on the wall
clock. Timeouts now count live time (:class:`xasflow.adapters.live_clock.LiveClock`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from helpers import RecordingPipeline, fly_scan, transmission, wait_for

from xasflow.adapters.commit_gate import CommitGate
from xasflow.adapters.live_clock import LiveClock
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.outputs import Rejected, RunClosed, SpectrumReady
from xasflow.daemon.processor import Processor

STALL: tuple[str, dict[str, Any]] = ("stall", {})


class _Input:
    """The processor's ``get``: scripted documents; ``STALL`` sleeps (the process stood still:
    nothing arrives meanwhile) and returns None, as does the end of each take."""

    def __init__(self, script: list[tuple[str, dict[str, Any]] | None], stall_s: float) -> None:
        self.script = list(script)
        self.stall_s = stall_s
        self.drained = threading.Event()

    def __call__(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        if not self.script:
            self.drained.set()
            return None
        item = self.script.pop(0)
        if item is STALL:
            time.sleep(self.stall_s)  # the stall itself (the fault), not a wait for a result
            return None
        return item


def test_a_stall_longer_than_the_run_timeout_does_not_close_the_run() -> None:
    energy = np.linspace(8800.0, 9400.0, 300)
    uid, docs = fly_scan(energy, [transmission(energy, seed=i) for i in range(4)])
    start, desc, *events, stop = docs
    # a take, then the process stands still for twice the run timeout (nothing read), then
    # the rest of the run comes out of the input buffers
    script = [start, desc, events[0], None, STALL, *events[1:], stop, None]
    get = _Input(script, stall_s=2.0)
    assembler = RunAssembler(run_timeout=1.0)
    pipeline = RecordingPipeline()
    analysis = AnalysisConfig(run_timeout_s=1.0, timeout_check_s=0.01)
    proc = Processor(get, assembler, pipeline, Counters(), analysis)  # type: ignore[arg-type]
    thread = threading.Thread(target=proc.run, daemon=True)
    thread.start()
    wait_for(get.drained.is_set, "the scripted input read")
    proc.drain.set()
    thread.join(10)
    assert not thread.is_alive()
    closed = [o for o in pipeline.outputs if isinstance(o, RunClosed)]
    rejected = [o.reason for o in pipeline.outputs if isinstance(o, Rejected)]
    spectra = [o for o in pipeline.outputs if isinstance(o, SpectrumReady)]
    assert rejected == []  # no late_document: the run was still open when its events came
    assert len(closed) == 1 and closed[0].raw_uid == uid
    assert (closed[0].exit_status, closed[0].missing_events) == ("success", 0)
    assert [s.spectrum.index for s in spectra] == [0, 1, 2, 3]
    assert proc.clock.discounted_s >= 1.5  # the stall was seen, and not counted


def test_live_clock_counts_each_pass_up_to_its_expected_length() -> None:
    wall = [0.0]
    clock = LiveClock(max_step_s=0.25, wall=lambda: wall[0])
    wall[0] += 0.125
    assert clock.tick() == 0.125 and clock() == 0.125
    wall[0] += 10.0  # stood still
    assert clock.tick() == 0.375
    wall[0] += 3.0  # a 2 s wait that came back 1 s late
    assert clock.tick(expected_s=2.0) == 2.625
    wall[0] += 1.0  # a pass that must not count (a backlog)
    assert clock.tick(counts=False) == 2.625
    assert clock.discounted_s == 9.75 + 0.75 + 1.0


def test_commit_gate_does_not_release_unstored_after_the_process_stood_still() -> None:
    wall = [0.0]
    clock = LiveClock(max_step_s=0.05, wall=lambda: wall[0])
    sent: list[str] = []
    gate = CommitGate(lambda name, doc: sent.append(doc["uid"]), timeout_s=1.0, clock=clock)
    try:
        gate.row_submitted()
        gate("event", {"uid": "e1"})
        wall[0] += 60.0  # SIGSTOP while e1 waits for its row: a minute on the wall clock
        wait_for(lambda: clock.discounted_s >= 59.0, "the gate to see the stall")
        assert sent == [] and gate.stats()["released_unstored"] == 0
        gate.row_resolved()  # the store commits once the process runs again
        wait_for(lambda: sent == ["e1"], "e1 after its commit")
        assert gate.stats()["released_unstored"] == 0
    finally:
        gate.close()


def test_commit_gate_asks_for_one_commit_per_batch_of_rows() -> None:
    sent: list[str] = []
    requests: list[int] = []
    gate: CommitGate

    def commit_now() -> None:  # a store that commits what it holds when asked
        requests.append(1)
        gate.row_resolved()
        gate.row_resolved()

    gate = CommitGate(lambda name, doc: sent.append(doc["uid"]), 30.0, commit_now=commit_now)
    try:
        gate("start", {"uid": "s"})  # no rows: out at once, no commit asked for
        wait_for(lambda: sent == ["s"], "the start")
        gate.row_submitted()
        gate.row_submitted()
        gate("event", {"uid": "e1"})
        gate("event", {"uid": "e2"})
        gate("stop", {"uid": "x"})
        wait_for(lambda: sent == ["s", "e1", "e2", "x"], "the rest, in order")
        stats = gate.stats()
        assert len(requests) == stats["commit_requests"] == 1  # one request covered both rows
        assert stats["released_unstored"] == stats["dropped_on_close"] == 0
    finally:
        gate.close()


def test_commit_gate_close_counts_what_it_could_not_send() -> None:
    release = threading.Event()
    sent: list[str] = []

    def slow_publish(name: str, doc: dict[str, Any]) -> None:
        release.wait(10)
        sent.append(doc["uid"])

    gate = CommitGate(slow_publish, timeout_s=30.0)
    gate("start", {"uid": "s"})  # taken by the publish thread, which then blocks
    gate("stop", {"uid": "x"})
    wait_for(lambda: gate.stats()["held"] == 1, "the start being sent")
    gate.close(timeout=0.1)
    release.set()
    wait_for(lambda: sent == ["s"], "the start")
    assert gate.stats()["dropped_on_close"] == 1 and gate.stats()["held"] == 0
