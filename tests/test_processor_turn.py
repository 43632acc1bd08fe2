"""A bug in the processing loop's turn outside the per-document guard (the input's drops, a
start's bookkeeping, the hand-over, the run timeouts, the batch's element defaults) costs only
what that step would have given: the turn's raw documents are still fed, their spectra
analysed (or, if their batch fails, refused ``internal_error`` with their runs stopped
"fail"), the failure counted once, and the loop goes on. Before, ``Processor.run``'s outer
catch counted it and dropped the whole turn: nothing published, no run stopped."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("event_model")

from pipeline_helpers import fly_run, rows_by_run, validate

from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.outlet import Outlet
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.processor import Processor

#: where the bug is injected: (class, method, on which call)
WHERE = {
    "input_drops": (Processor, "_input_drops", lambda *a: True),
    "unopened": (Processor, "_unopened", lambda *a: True),
    "replayed_start": (Processor, "_handed_over", lambda *a: len(a) > 1),
    "handed_over": (Processor, "_handed_over", lambda *a: len(a) == 1),
    "check_timeouts": (RunAssembler, "check_timeouts", lambda *a: True),
    "element_defaults": (Outlet, "_element_defaults", lambda *a: True),
}


def _fails_once(monkeypatch: pytest.MonkeyPatch, where: str) -> list[int]:
    """Make the real method of ``where`` raise on its first call that matches; the list
    given back counts the failures injected."""
    owner, name, matches = WHERE[where]
    real = getattr(owner, name)
    hits: list[int] = []

    def once(*args: Any, **kw: Any) -> Any:
        if not hits and matches(*args, *kw.values()):
            hits.append(1)
            raise RuntimeError(f"a bug in {name}")
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, once)
    return hits


def _serve(pipeline: Pipeline, counters: Counters, docs: list[tuple[str, Any]]) -> list[Any]:
    """``docs`` queued, then ``Processor.run`` until the queue is empty (one turn, timeouts
    checked); what it published."""
    queue = list(docs)
    analysis = AnalysisConfig(timeout_check_s=1e-9)  # every turn looks for idle runs
    proc = Processor(
        lambda timeout: queue.pop(0) if queue else None,
        RunAssembler(),
        pipeline,
        counters,
        analysis,
    )
    proc.abandoned = list  # the Kafka input's hook: nothing handed over
    published: list[tuple[str, dict[str, Any]]] = []
    proc.outlet.sinks.append(lambda name, doc: published.append((name, doc)))
    proc.drain.set()
    proc.run()
    return published


@pytest.mark.parametrize("where", [w for w in WHERE if w != "element_defaults"])
def test_a_bug_in_a_turns_step_costs_only_that_step(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The turn's two runs (raw-a 3 spectra, raw-b 2, starts to stops) are analysed and
    stopped as if nothing had failed; the bug is counted once."""
    a, docs_a = fly_run(3)
    b, docs_b = fly_run(2)
    hits = _fails_once(monkeypatch, where)
    docs = _serve(pipeline, counters, docs_a + docs_b)
    assert hits == [1]
    validate(docs)
    assert rows_by_run(docs) == {
        a: [(i, "ok", "") for i in range(3)],
        b: [(i, "ok", "") for i in range(2)],
    }
    stops = [(d["exit_status"], d["n_analysed"], d["n_rejected"]) for n, d in docs if n == "stop"]
    assert stops == [("success", 3, 0), ("success", 2, 0)]
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 5)
    assert pipeline.open_runs == []


def test_a_batch_that_fails_before_the_pipeline_is_salvaged(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug filling the batch's element defaults, before the pipeline begins it: its spectra
    are refused ``internal_error`` in their runs and both runs stop "fail" with the error,
    received 5 = analysed 0 + rejected 5."""
    a, docs_a = fly_run(3)
    b, docs_b = fly_run(2)
    hits = _fails_once(monkeypatch, "element_defaults")
    docs = _serve(pipeline, counters, docs_a + docs_b)
    assert hits == [1]
    validate(docs)
    assert rows_by_run(docs) == {
        a: [(i, "rejected", "internal_error") for i in range(3)],
        b: [(i, "rejected", "internal_error") for i in range(2)],
    }
    stops = [
        (d["exit_status"], d["reason"], d["n_analysed"], d["n_rejected"])
        for n, d in docs
        if n == "stop"
    ]
    why = "internal_error: its batch failed: RuntimeError: a bug in _element_defaults"
    assert stops == [("fail", why, 0, 3), ("fail", why, 0, 2)]
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 0)
    assert snap["rejected_by_stage"]["analysis"] == {"internal_error": 5}
    assert pipeline.open_runs == []


def test_a_bug_at_shutdown_still_stops_the_runs_left_open(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input's drops raising at shutdown (their second look, after the turn's): the run
    left open (raw-b, no stop) is still closed "abort" ("shutdown") with its 2 spectra, and
    the loop ends. Before, ``run`` raised out of ``_finish``: the thread died and raw-b never
    stopped."""
    a, docs_a = fly_run(3)
    b, docs_b = fly_run(2)
    real = Processor._input_drops
    calls: list[int] = []

    def input_drops(self: Processor) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in _input_drops")
        real(self)

    monkeypatch.setattr(Processor, "_input_drops", input_drops)
    docs = _serve(pipeline, counters, docs_a + docs_b[:-1])
    assert len(calls) == 2
    validate(docs)
    assert rows_by_run(docs) == {
        a: [(i, "ok", "") for i in range(3)],
        b: [(i, "ok", "") for i in range(2)],
    }
    stops = [
        (d["exit_status"], d["reason"], d["n_analysed"], d["n_rejected"])
        for n, d in docs
        if n == "stop"
    ]
    assert stops == [("success", "", 3, 0), ("abort", "shutdown", 2, 0)]
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 5)
    assert pipeline.open_runs == []


def test_a_run_whose_timeout_close_fails_still_stops_and_lets_the_others_time_out(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs without stops go idle; closing the first by its run timeout raises (a bug in
    the assembler's ``_Run.abandon``). It still stops, "fail" with the error (counted
    ``run_stop``), and the second times out as usual. Before, ``check_timeouts`` raised at the
    first: neither run stopped at that check (with a bug that stays, at none until shutdown)."""
    from xasflow.daemon.assembly_run import _Run

    a, docs_a = fly_run(3)
    b, docs_b = fly_run(2)
    real = _Run.abandon
    hits: list[str] = []

    def abandon(self: _Run, status: Any, reason: str, replayable: bool = False) -> None:
        if not hits:
            hits.append(self.uid)
            raise RuntimeError("a bug in abandon")
        real(self, status, reason, replayable)

    monkeypatch.setattr(_Run, "abandon", abandon)
    asm = RunAssembler(run_timeout=10.0)
    proc = Processor(lambda timeout: None, asm, pipeline, counters, AnalysisConfig())
    published: list[tuple[str, dict[str, Any]]] = []
    proc.outlet.sinks.append(lambda name, doc: published.append((name, doc)))
    now = [0.0]
    asm.clock = lambda: now[0]  # the processor installed its LiveClock: time by hand
    proc._turn(docs_a[:-1] + docs_b[:-1], check=True)
    now[0] = 100.0
    proc._turn([], check=True)
    proc.outlet.complete(0)
    assert hits == [a]
    validate(published)
    stops = [
        (d["exit_status"], d["reason"], d["n_analysed"], d["n_rejected"])
        for n, d in published
        if n == "stop"
    ]
    assert stops == [
        ("fail", "internal_error: RuntimeError: a bug in abandon", 3, 0),
        ("fail", "stop_timeout: no document for 100.0 s", 2, 0),
    ]
    assert rows_by_run(published) == {
        a: [(i, "ok", "") for i in range(3)],
        b: [(i, "ok", "") for i in range(2)],
    }
    snap = counters.snapshot()
    assert snap["internal_errors"] == {"processing": 0, "run_start": 0, "run_stop": 1}
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 5)
    assert pipeline.open_runs == []
    assert asm.open_runs == 0
