"""The preparation process (``analysis.prep_process``): the same answers as the thread, the
thread taking over when the child dies or cannot run a job, and no child left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from helpers import (
    Harness,
    LoopbackProxy,
    daemon_config,
    fly_scan,
    publish,
    transmission,
    unpaged,
    wait_for,
)
from scan_helpers import two_rises

from xasflow.daemon.assembly import RunOpened, ScanSpectrum, SpectrumReady
from xasflow.daemon.batch_prep import start_work
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.prep_worker import JobFailed, PrepWorker
from xasflow.daemon.registry import ModelRegistry
from xasflow.daemon.stack_job import job_for
from xasflow.models.bundle_write import seal_bundle

T0 = 1_700_000_000.0
AXIS = np.linspace(8800.0, 9300.0, 700)


@pytest.fixture
def registry(tiny_cu_bundle: Path, tmp_path: Path) -> ModelRegistry:
    shutil.copytree(tiny_cu_bundle, tmp_path / "models" / "cu-k")
    return ModelRegistry(tmp_path / "models", Counters())


@pytest.fixture
def worker() -> Iterator[PrepWorker]:
    w = PrepWorker(timeout_s=30.0, restart_s=0.0)
    w.start()
    assert w.wait_ready(60.0), "the preparation process never came up"
    yield w
    w.close()


def _page(uid: str, n: int = 10) -> list[Any]:
    """A fly page on one axis, with the rows that leave the stack or fail inside it."""
    outs: list[Any] = [RunOpened(uid, {"uid": uid, "time": T0}, "fly")]
    for i in range(n):
        ch = transmission(AXIS, shift=0.4 * (i % 4), kind=("CuO", "Cu2O")[i % 2], seed=i)
        chans = {"i0": ch["I0"], "it": ch["It"], "ir": ch["Ir"]}
        if i == 2:  # NaN in a channel: rejected before the stack
            chans["it"] = chans["it"].copy()
            chans["it"][5] = np.nan
        elif i == 3:  # no foil: analysed unaligned
            del chans["ir"]
        elif i == 4:  # a broken foil: alignment fails
            chans["ir"] = -chans["ir"]
        elif i == 5:  # mu never rises: rejected inside the stack
            chans["it"] = 0.5 * chans["i0"]
        scan = ScanSpectrum(uid, i, AXIS, chans, "Cu", "K", "transmission", (i + 1,), T0, T0)
        outs.append(SpectrumReady(scan))
    return outs


def _rows(pipeline: Pipeline, outputs: list[Any]) -> list[dict[str, Any]]:
    docs = unpaged(pipeline.handle_batch(outputs))
    return [d["data"] for n, d in docs if n == "event" and "status" in d["data"]]


def test_the_process_gives_the_threads_answers_to_the_last_bit(
    registry: ModelRegistry, worker: PrepWorker
) -> None:
    here = _rows(Pipeline(registry, Counters(), clock=lambda: T0), _page("raw-a"))
    there = _rows(Pipeline(registry, Counters(), clock=lambda: T0, worker=worker), _page("raw-a"))
    assert worker.stats["jobs"] == 1 and worker.stats["fallbacks"] == 0
    assert [r["reason"] for r in there][2:6] == ["not_finite", "", "", "no_edge"]
    assert [r["flags"] for r in there][3:5] == ["no_reference", "align_failed"]
    assert there == here  # every key: E0, step, shift, answers, probabilities, sets, scores


def _two_rise_page(uid: str, n: int = 10) -> list[Any]:
    """A fly page of Cu(II)-like edges rising twice 6 eV apart (the grids on both rises are
    served: ``prep.e0_rivals``), each on its own mono offset and noise."""
    outs: list[Any] = [RunOpened(uid, {"uid": uid, "time": T0}, "fly")]
    for i in range(n):
        true = AXIS + 0.4 * (i % 4)
        rng = np.random.default_rng(i)
        mu = two_rises(true) + 0.002 * rng.standard_normal(AXIS.size)
        foil = 0.5 + np.arctan((true - 8978.9) / 1.5) / np.pi
        i0 = 1e9 * (1 + 0.001 * rng.standard_normal(AXIS.size))
        it = i0 * np.exp(-mu - 0.3)
        chans = {"i0": i0, "it": it, "ir": it * np.exp(-foil)}
        scan = ScanSpectrum(uid, i, AXIS, chans, "Cu", "K", "transmission", (i + 1,), T0, T0)
        outs.append(SpectrumReady(scan))
    return outs


def test_the_process_joins_a_spectrums_grids_as_the_thread_does(
    tiny_rivals_bundle: Path, tmp_path: Path, worker: PrepWorker
) -> None:
    shutil.copytree(tiny_rivals_bundle, tmp_path / "models" / "cu-k")
    registry = ModelRegistry(tmp_path / "models", Counters())
    page = _two_rise_page("raw-r")
    predictor = registry.get("Cu", "K")
    assert predictor is not None
    with_rivals = 0
    for out in page[1:]:
        work = start_work(out.spectrum, registry, False, False)
        assert work.spectrum is not None
        with_rivals += bool(predictor.prepare(work.spectrum).alternates)
    assert with_rivals >= 5  # the page exercises the joined path
    here = _rows(Pipeline(registry, Counters(), clock=lambda: T0), page)
    there = _rows(
        Pipeline(registry, Counters(), clock=lambda: T0, worker=worker), _two_rise_page("raw-r")
    )
    assert worker.stats["jobs"] == 1 and worker.stats["fallbacks"] == 0
    assert [r["reason"] for r in there] == [""] * 10
    assert there == here


def test_a_dead_child_is_replaced_and_the_thread_takes_over_meanwhile(
    registry: ModelRegistry, worker: PrepWorker
) -> None:
    here = _rows(Pipeline(registry, Counters(), clock=lambda: T0), _page("raw-b"))
    pipeline = Pipeline(registry, Counters(), clock=lambda: T0, worker=worker)
    first = worker.pid
    assert first is not None
    os.kill(first, 9)
    wait_for(lambda: worker._proc is not None and not worker._proc.is_alive(), "the kill")
    assert _rows(pipeline, _page("raw-b")) == here  # run in the thread, nothing lost
    assert worker.stats["fallbacks"] == 1
    assert worker.wait_ready(60.0)  # restart_s 0: started anew at the next use
    assert worker.stats["restarts"] == 1 and worker.pid not in (None, first)
    assert _rows(pipeline, _page("raw-b")) == here
    assert worker.stats["fallbacks"] == 1 and worker.stats["jobs"] == 1  # the new child ran it


def test_a_bundle_changed_on_disk_under_the_same_id_is_never_run_there(
    registry: ModelRegistry, worker: PrepWorker, tmp_path: Path
) -> None:
    """The registry keeps serving what it verified; the child loads from disk, so it must
    refuse a manifest rewritten (and re-sealed) under the same bundle_id."""
    works = [start_work(o.spectrum, registry, False) for o in _page("raw-c", 4)[1:]]
    served = works[0].predictor
    assert served is not None
    manifest = tmp_path / "models" / "cu-k" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["code_version"] = "tampered"
    manifest.write_text(json.dumps(doc))
    seal_bundle(manifest.parent, force=True)
    for _ in range(2):  # refused each time it is asked
        ticket = worker.submit([job_for(works, True, 20.0, 40.0, with_bundle=True)])
        assert ticket is not None
        (result,) = worker.collect(ticket)
        assert isinstance(result, JobFailed) and "not the one served" in result.why
    assert worker.stats["fallbacks"] == 2


def test_results_that_cannot_be_collected_are_prepared_in_the_thread(
    registry: ModelRegistry, worker: PrepWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug collecting a batch's results from the process (``collect`` raising) prepares
    its stacks in the thread (the same answers, counted as processing once) and replaces the
    child, whose answers may be out of step; the next batch is analysed as usual. Before,
    the whole batch was lost: 0 events, its 10 spectra refused, its run never stopped."""
    from pipeline_helpers import closed, through_loop

    here = _rows(Pipeline(registry, Counters(), clock=lambda: T0), _page("raw-d"))
    counters = Counters()
    pipeline = Pipeline(registry, counters, clock=lambda: T0, worker=worker)
    first = worker.pid

    def collect(ticket: Any) -> Any:
        raise RuntimeError("a bug in collect")

    monkeypatch.setattr(worker, "collect", collect)
    docs = through_loop(pipeline, counters, [*_page("raw-d"), closed("raw-d", n=10)])
    assert [d["data"] for n, d in unpaged(docs) if n == "event"] == here
    stop = docs[-1][1]
    assert (docs[-1][0], stop["exit_status"], stop["n_analysed"]) == ("stop", "success", 8)
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (10, 8)
    assert worker.stats["fallbacks"] == 1 and worker.pid != first
    monkeypatch.undo()
    assert _rows(pipeline, _page("raw-e")) == here


def test_a_batch_that_fails_to_begin_goes_out_after_the_batch_in_flight(
    registry: ModelRegistry, worker: PrepWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose ``begin`` raises (a bug) is salvaged only once the batch still in the
    process has ended: its run's stop ("fail", the error) follows that batch's events. Else
    the stop would go out first, on a run opened for it alone, and the events after it in a
    run never stopped."""
    from pipeline_helpers import closed, rows_by_run, through_loop

    from xasflow.daemon import pipeline as pipeline_module

    counters = Counters()
    pipeline = Pipeline(registry, counters, clock=lambda: T0, worker=worker)
    real, calls = pipeline_module.prepare_works, []

    def prepare_works(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in begin")
        return real(*args, **kw)

    monkeypatch.setattr(pipeline_module, "prepare_works", prepare_works)
    monkeypatch.setattr(worker, "ready", lambda ticket: False)  # in flight till the next
    docs = through_loop(pipeline, counters, _page("raw-f"), [closed("raw-f", n=10)])
    assert [n for n, _ in unpaged(docs)] == ["start", "descriptor", *["event"] * 10, "stop"]
    assert [r[1] for r in rows_by_run(docs)["raw-f"]].count("ok") == 8
    stop = docs[-1][1]
    assert (stop["exit_status"], stop["reason"]) == ("success", "")
    snap = counters.snapshot()
    assert (snap["internal_errors"]["processing"], snap["spectra_received"]) == (1, 10)
    assert pipeline.open_runs == []


def test_a_bug_asking_whether_a_batch_is_prepared_costs_no_spectrum(
    registry: ModelRegistry, worker: PrepWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs A, B and C (3 spectra each, one stack each in the process) taken in one turn of
    ``Processor.run``, each run's spectra a batch of their own (``max_spectra`` 3), and the
    batch's ``ready`` raising for B's (a bug that stays): B's batch is ended at once (the
    thread waits for its preparation), every spectrum analysed once, each run stopped
    "success", the bug counted once. Before, the exception left the turn at B's batch: B's
    spectra were begun again (6 events, counted twice), A's stop (in that batch) went out
    twice, and B's stop and all of C's documents were never fed (B stopped "abort"
    "shutdown"; C never seen): 9 received for 9 sent, B's 3 twice and C's none."""
    from pipeline_helpers import fly_run, rows_by_run, validate

    from xasflow.daemon import batch_prep
    from xasflow.daemon.assembly import RunAssembler
    from xasflow.daemon.batching import BatchPolicy
    from xasflow.daemon.config import AnalysisConfig
    from xasflow.daemon.processor import Processor

    (a, docs_a), (b, docs_b), (c, docs_c) = fly_run(3), fly_run(3), fly_run(3)
    real, hits = batch_prep.Pending.ready, []

    def ready(self: batch_prep.Pending, w: Any) -> bool:
        if any(x.scan.raw_uid == b for stack in self.stacks for x in stack):
            hits.append(1)
            raise RuntimeError("a bug in ready")
        return real(self, w)

    monkeypatch.setattr(batch_prep.Pending, "ready", ready)
    counters = Counters()
    pipeline = Pipeline(registry, counters, clock=lambda: T0, worker=worker)
    queue = [*docs_a, *docs_b, *docs_c]
    proc = Processor(
        lambda timeout: queue.pop(0) if queue else None,
        RunAssembler(),
        pipeline,
        counters,
        AnalysisConfig(),
        batching=BatchPolicy(max_spectra=3, max_batch_delay_ms=0.0),
    )
    docs: list[tuple[str, dict[str, Any]]] = []
    proc.outlet.sinks.append(lambda name, doc: docs.append((name, doc)))
    proc.drain.set()
    proc.run()
    assert hits == [1] and worker.stats["jobs"] == 3 and worker.stats["fallbacks"] == 0
    validate(docs)
    assert rows_by_run(docs) == {uid: [(i, "ok", "") for i in range(3)] for uid in (a, b, c)}
    stops = [
        (d["exit_status"], d["reason"], d["n_analysed"], d["n_rejected"])
        for n, d in docs
        if n == "stop"
    ]
    assert stops == [("success", "", 3, 0)] * 3
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (9, 9)
    assert snap["rejected_by_stage"].get("analysis", {}) == {}
    assert pipeline.open_runs == [] and proc.assembler.open_runs == 0


@pytest.mark.timeout(60)
def test_a_stopped_child_cannot_hold_the_thread(registry: ModelRegistry) -> None:
    """A batch larger than the pipe holds, sent to a SIGSTOPped child: the send and the
    answer are bounded by the timeout (the child is killed), and the thread takes over."""
    worker = PrepWorker(timeout_s=1.0, restart_s=60.0)
    worker.start()
    try:
        assert worker.wait_ready(60.0)
        pid = worker.pid
        assert pid is not None
        works = [start_work(o.spectrum, registry, False) for o in _page("raw-s", 60)[1:]]
        job = job_for(works, True, 20.0, 40.0, with_bundle=True)
        assert job.mu.nbytes + 2 * job.it.nbytes > 1 << 19  # type: ignore[union-attr]
        os.kill(pid, signal.SIGSTOP)
        ticket = worker.submit([job])
        if ticket is not None:  # the send went through before the kill
            assert isinstance(worker.collect(ticket)[0], JobFailed)
        assert worker.stats["fallbacks"] == 1 and worker.pid is None
        wait_for(lambda: not _alive(pid), "the stopped child to be gone", 10.0)
    finally:
        worker.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_daemon_with_the_process_analyses_and_leaves_no_child(
    models_dir: Path, tmp_path: Path
) -> None:
    proxy = LoopbackProxy()
    harness = Harness(
        daemon_config(models_dir, proxy, tmp_path / "store", prep_process=True), proxy
    )
    try:
        health = harness.daemon.view.health
        wait_for(lambda: (health()["prep_process"] or {}).get("ready"), "the child ready", 60.0)
        pid = health()["prep_process"]["pid"]
        uid, docs = fly_scan(AXIS, [transmission(AXIS, seed=k) for k in range(24)])
        publish(harness.pub, docs)
        run = harness.results.wait([uid])[uid]
        assert [e["status"] for e in run["events"]] == ["ok"] * 24
        assert health()["prep_process"]["jobs"] >= 1
    finally:
        harness.close()
        proxy.close()
    wait_for(lambda: not _alive(pid), f"the preparation process {pid} to end with its daemon")
