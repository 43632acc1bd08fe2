"""Review of the feedback to the control system (recommendations, queueserver, adaptive agent,
EPICS advice PVs): each test fails on the reviewed code and says what it should do instead."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from feedback_helpers import (
    REC,
    ZMQ_KEY,
    FakeApi,
    FakePredictor,
    advice_ioc,
    advice_pipeline,
    demo_scan,
)
from helpers import analysis_run_docs, fly_scan, processor_parts, unpaged
from pydantic import ValidationError
from recommend_helpers import SURE, VAL_SURE, demo_channels, manifest, prediction

from xasflow.adapters.queueserver import (
    QueueServerConfig,
    QueueServerSubmitter,
    plan_item,
    region_points,
)
from xasflow.daemon.recommend import RecommenderConfig

# --------------------------------------------------------------------------- EPICS advice PVs


def test_the_last_runs_late_advice_does_not_set_stop_early_after_the_next_raw_start(
    tmp_path: Path,
) -> None:
    """epics_ioc.py clears the advice PVs at the next raw run's start "so a plan watching
    STOP_EARLY never stops this scan on the last one's certainty". But the processor calls the
    raw-start hook while *feeding* a turn's documents (processor.py), and analyses the
    turn's spectra afterwards (processor.py): when run A's last event, A's stop and B's
    start arrive in one turn (or A's batch is still in flight in the prep process), A's last
    ``recommendations`` event (stop_early 1) reaches the IOC after B's start cleared it, and
    publish_advice (epics_ioc.py) writes STOP_EARLY=1, ADVICE_UID=A while B scans.
    Expected: advice of a run other than the one in ADVICE_UID after a raw start is not
    written (STOP_EARLY stays 0 for B)."""
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_processor

    pipe = advice_pipeline(tmp_path)

    def channels(seed: int) -> dict[str, np.ndarray]:
        _, c = demo_channels("CuO", seed)
        return {"I0": c["i0"], "It": c["it"]}

    energy = demo_channels("CuO", 0)[0]
    _, run_a = fly_scan(energy, [channels(s) for s in (2, 3, 4)])  # CuO: cn {4} each time
    uid_b, run_b = fly_scan(energy, [channels(0)])
    ioc = advice_ioc()
    try:
        parts = processor_parts(ioc, pipe)  # what the processor is built from, as the daemon does
        proc = build_processor(parts, DaemonConfig(), Counters(), [ioc], lambda: None)  # type: ignore[arg-type]
        proc._turn(list(run_a[:-2]), check=False)
        proc.outlet.complete(0)
        ioc.flush()
        assert ioc.group.stop_early.value == 1  # run A settled (cn {4} twice)
        # run A's last spectrum, its stop, and run B's start in one turn
        proc._turn([run_a[-2], run_a[-1], run_b[0]], check=False)
        proc.outlet.complete(0)
        ioc.flush()
        stop, advice = ioc.group.stop_early.value, ioc.group.advice_uid.value
        assert (stop, advice) == (0, uid_b), (
            f"run B has started, yet STOP_EARLY={stop} ADVICE_UID={advice!r} (run A's advice)"
        )
    finally:
        ioc.stop()


def test_stop_early_is_withdrawn_when_the_next_spectrum_is_rejected(tmp_path: Path) -> None:
    """README: stop_early "once two spectra in a row (none rejected between them)", and the
    pipeline's tracker forgets the row at a rejection (pipeline_runs.py). But a rejected
    spectrum emits no ``recommendations`` event, and the IOC keeps STOP_EARLY=1 from the
    advice before it (epics_ioc.py touches only STATUS): a plan watching STOP_EARLY stops
    on a row the daemon itself no longer counts. Expected: STOP_EARLY reads 0 after the
    rejection (cleared by the IOC, or an advice event that says the decision turned)."""
    from xasflow.daemon.assembly import RunClosed, RunOpened

    pipe = advice_pipeline(tmp_path)
    outputs = [
        RunOpened("raw-1", {"uid": "raw-1", "time": 1.0}, "fly"),
        demo_scan("raw-1", 0, "CuO", 2),
        demo_scan("raw-1", 1, "CuO", 3),
        demo_scan("raw-1", 2, "CuO", 4, flat=True),
    ]
    ioc = advice_ioc()
    try:
        for name, doc in pipe.handle_batch(outputs[:3]):
            ioc(name, doc)
        ioc.flush()
        assert ioc.group.stop_early.value == 1
        for name, doc in pipe.handle_batch(outputs[3:]):
            ioc(name, doc)
        ioc.flush()
        assert ioc.group.status.value.startswith("rejected")
        assert ioc.group.stop_early.value == 0, "STOP_EARLY still 1 after a rejected spectrum"
        pipe.handle_batch([RunClosed("raw-1", "success", "", 3, 0, 0)])
    finally:
        ioc.stop()


def test_advice_that_follows_an_out_of_domain_answer_is_not_shown_as_actionable() -> None:
    """The queueserver never queues advice that follows an out-of-domain answer ("a plan
    would chase a guess", queueserver.py), but the IOC writes its regions to REGIONS and
    N_REGIONS with no alarm (epics_ioc.py ignores the row's ``out_of_domain``): a plan
    that follows the PVs chases the guess. Expected: such advice leaves N_REGIONS 0, or
    REGIONS carries an alarm as the answer PVs do (MAJOR when out of domain)."""
    from caproto import AlarmSeverity

    advice = {
        "waveform": json.dumps([8978.0, 8990.0, 0.5, 2.0]),
        "stop_early": False,
        "out_of_domain": True,
    }
    ood_answer = {"status": "ok", "cn": 4, "out_of_domain": True, "ood_score": 9.0}
    ioc = advice_ioc()
    try:
        for name, doc in analysis_run_docs(
            [("primary", ood_answer), ("recommendations", advice)], raw_uid="raw-ood"
        ):
            ioc(name, doc)
        ioc.flush()
        n = ioc.group.n_regions.value
        severity = ioc.group.regions.alarm.severity
        assert n == 0 or severity != AlarmSeverity.NO_ALARM, (
            f"N_REGIONS={n}, REGIONS alarm {severity!r}: out-of-domain advice looks actionable"
        )
    finally:
        ioc.stop()


# --------------------------------------------------------------------------- queueserver


def test_advice_older_than_the_runs_out_of_domain_answers_is_not_queued(tmp_path: Path) -> None:
    """With throttled advice (recommend.interval_s, 0.1 s by default; one event per interval
    unless stop-early turns, advice.py) the run's last ``recommendations`` event can
    follow an early in-domain spectrum while every later answer is out of domain: an answer
    turning out of domain is no turn of stop-early, so no event says so. The submitter looks
    only at that last event's ``out_of_domain`` (queueserver_follow.py) and queues its plan.
    Expected: no plan for a run whose latest answer is out of domain."""
    from xasflow.daemon.assembly import RunClosed, RunOpened

    pipe = advice_pipeline(tmp_path, interval=3600.0)
    outputs = [
        RunOpened("raw-1", {"uid": "raw-1", "time": 1.0}, "fly"),
        demo_scan("raw-1", 0, "CuO", 0),  # in domain
        *(demo_scan("raw-1", i, "CuCl", i) for i in (1, 2, 3)),  # out of domain (README)
        RunClosed("raw-1", "success", "", 4, 0, 0),
    ]
    docs = unpaged(pipe.handle_batch(outputs))
    stop = docs[-1][1]
    assert stop["n_out_of_domain"] == 3 and stop["exit_status"] == "success"
    fake = FakeApi()
    sub = QueueServerSubmitter(
        QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0),
        api_factory=lambda _: fake,
    )
    try:
        for name, doc in docs:
            sub(name, doc)
        assert sub.join(5.0)
        assert fake.items == [], (
            "a plan was queued from the advice of spectrum 0 though spectra 1-3, the run's "
            "latest answers, are out of domain"
        )
    finally:
        sub.close()


def test_a_run_replayed_after_a_restart_is_not_queued_again() -> None:
    """queueserver.py: "A raw run gets its plan once, however often its analysis is
    replayed (a Kafka redelivery after a restart)". The memory of queued runs (``_queued``,
    queueserver.py) lives in the process only; after a restart Kafka redelivers the runs
    not yet committed (commit_interval_s, or a commit hold), the daemon analyses them anew
    (processor.py) and the new submitter queues the same plan a second time. Expected: one
    plan per raw run across restarts (e.g. ask the queue/history for md.xasflow.raw_uid)."""
    fake = FakeApi()
    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0)
    docs = analysis_run_docs(
        [
            ("primary", {"status": "ok", "cn": 4}),
            ("recommendations", {**REC, "regions": json.dumps(REC["regions"])}),
        ],
        raw_uid="raw-1",
    )
    for _process in range(2):  # the daemon, then the daemon after a restart
        sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
        try:
            for name, doc in docs:
                sub(name, doc)
            assert sub.join(5.0)
        finally:
            sub.close()
    assert len(fake.items) == 1, f"raw run raw-1 queued {len(fake.items)} times"


def test_nothing_is_submitted_after_close_returns() -> None:
    """QueueServerSubmitter.close (queueserver.py) puts the stop marker behind what is
    queued and joins the worker for ``timeout``; when the server is slow (each item_add may
    take timeout_s, 5 s; 8 pending), close returns with the worker still running, drops the
    client (``_api = None``), and the worker builds a *new* client (``api()``) and keeps
    submitting after the daemon has shut down (that client is never closed). Expected: once
    close returns nothing more reaches the queueserver."""
    made: list[FakeApi] = []

    def factory(_: QueueServerConfig) -> FakeApi:
        made.append(FakeApi(delay=0.5))
        return made[-1]

    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0, max_pending=2)
    sub = QueueServerSubmitter(cfg, api_factory=factory)
    before = set(threading.enumerate())
    for i in range(3):
        assert sub.enqueue(REC, f"raw-{i}")
        time.sleep(0.02)
    (worker,) = [t for t in threading.enumerate() if t not in before]  # the submitter's
    sub.close(timeout=0.1)
    closed_at = time.monotonic()
    worker.join(10.0)  # it ends after the request it was in; nothing else submits
    assert not worker.is_alive(), "the submitter's worker still runs 10 s after close"
    late = [ts for api in made for ts, _ in api.items if ts > closed_at]
    assert not late, f"{len(late)} plan(s) submitted after close returned ({len(made)} clients)"


@pytest.mark.parametrize(
    "row",
    [
        [8978.0, 8990.0, 0.5, math.inf],  # an infinite dwell
        [-100.0, -50.0, 1.0, 1.0],  # negative energies
        [8978.0, math.inf, 1.0, 1.0],  # OverflowError, not the ValueError callers catch
        [8978.0, 8990.0, 1e-5, 1.0],  # 1.2 million points (1e-9: the worker hangs for hours)
    ],
)
def test_a_plan_refuses_regions_no_beamline_should_run(row: list[float]) -> None:
    """region_points (queueserver_plan.py), the plan's and plan_item's only check, wants
    step > 0, dwell > 0, stop >= start: an infinite dwell and negative energies pass into the
    queued plan, an infinite stop raises OverflowError, and nothing bounds the point count
    (a tiny step loops in the submitter's worker and in the RE worker's plan). Expected:
    ValueError for non-finite values, non-positive energies and absurd point counts."""
    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY)
    rec = {**REC, "regions": [dict(zip(("start", "stop", "step", "dwell"), row, strict=True))]}
    with pytest.raises(ValueError):
        plan_item(cfg, rec)
    with pytest.raises(ValueError):
        region_points([row])


def test_extra_kwargs_cannot_replace_the_recommended_scan() -> None:
    """plan_item (queueserver_plan.py) spreads ``extra_kwargs`` after ``regions``, ``motor``,
    ``detectors`` and ``md``: a config key of the same name silently replaces the recommended
    regions (every plan then scans the fixed ones) or the motor. Expected: the config is
    refused with a clear error naming the reserved key."""
    with pytest.raises(ValidationError, match="regions"):
        QueueServerConfig(
            enabled=True, zmq_public_key=ZMQ_KEY, extra_kwargs={"regions": [[0.0, 1e4, 1e-3, 1.0]]}
        )


def test_extra_kwargs_need_a_plan_that_takes_them() -> None:
    """The packaged plan ``xas_regions_scan(detectors, motor, regions, md=None)`` takes no
    other argument, yet ``extra_kwargs: {sample_name: CuO}`` was accepted with it: every plan
    then failed in the RE Manager (TypeError: unexpected keyword argument), was retried and
    given up. Expected: refused when the configuration loads, naming the plan; a plan of the
    beamline's own (``plan_name``) may take them."""
    with pytest.raises(ValidationError, match="xas_regions_scan"):
        QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, extra_kwargs={"sample": "CuO"})
    own = QueueServerConfig(plan_name="sample_scan", extra_kwargs={"sample": "CuO"})
    assert own.extra_kwargs == {"sample": "CuO"}


@pytest.mark.parametrize(
    "knobs",
    [{"dwell": math.inf}, {"e0_margin": math.inf}, {"fine_step": 1e-4}],
)
def test_recommender_config_refuses_values_that_break_the_advice(knobs: dict[str, float]) -> None:
    """RecommenderConfig (recommend_types.py) checks only signs: ``dwell: .inf`` is
    accepted and every region is advised with an infinite dwell (and queued so, since the
    plan's check lets it through); ``e0_margin: .inf`` and ``fine_step: 1e-4`` are accepted
    and every recommendation then raises (OverflowError; ZeroDivisionError from a region
    rounded to zero width), which the pipeline logs per spectrum while no advice goes out.
    Expected: a ValidationError at config load, or advice that is finite."""
    from xasflow.daemon.recommend import Recommender

    try:
        cfg = RecommenderConfig(**knobs)
    except ValidationError:
        return
    rec = Recommender(manifest(), cfg).recommend(prediction(SURE, VAL_SURE))
    assert all(math.isfinite(v) for r in rec.regions for v in r.row()), rec.waveform()


# --------------------------------------------------------------------------- adaptive agent


def test_the_adaptive_agent_ends_when_one_energy_never_gives_a_valid_outcome() -> None:
    """adaptive.py: a pass completes only when every energy has a finite mu; an outcome
    that is not one (I0 = 0: a beam dump, a shutter, a detector dropout at that energy;
    adaptive.py) is skipped and ``suggest`` hands the same energy out again, forever:
    ``should_stop`` never turns and ``optimize(iterations=None)`` never ends, while
    ``max_passes`` cannot help (the pass never finishes). Expected: after a bounded number of
    retries the energy is given up (the pass finishes without it) or the agent stops."""
    from xasflow.daemon.adaptive import RecommenderOptimizer

    energies = np.linspace(8800.0, 9100.0, 50)
    opt = RecommenderOptimizer(FakePredictor(), initial_energies=energies, max_passes=3)
    dead = float(energies[10])
    for _ in range(200):
        if opt.should_stop()[0]:
            break
        batch = opt.suggest(64)
        opt.ingest(
            [{"_id": s["_id"], "I0": 0.0 if s["energy"] == dead else 1e6, "It": 5e5} for s in batch]
        )
    assert opt.should_stop()[0] or len(opt.passes) > 1, (
        f"still on pass 0 after 200 rounds, asking {dead} eV again and again"
    )


def test_the_adaptive_agent_does_not_stop_early_across_a_failed_pass() -> None:
    """README: stop_early "once two spectra in a row (none rejected between them)"; the
    daemon resets the row at a rejection (tracker.interrupt). RecommenderOptimizer's
    _finish_pass (adaptive.py) records the failed pass's error but never interrupts
    the tracker, so pass 0 (cn {4}), pass 1 (refused: no edge), pass 2 (cn {4}) stops the
    adaptive scan. Expected: no stop at pass 2; the row restarts after the failed pass."""
    from xasflow.daemon.adaptive import RecommenderOptimizer

    energies = np.linspace(8800.0, 9100.0, 50)
    opt = RecommenderOptimizer(
        FakePredictor(fail={2}), RecommenderConfig(stop_count=2), initial_energies=energies
    )
    for _ in range(3):  # pass 0 predicted, pass 1 refused, pass 2 predicted
        if opt.should_stop()[0]:
            break
        opt.ingest([{"_id": s["_id"], "mu": 1.0} for s in opt.suggest(1000)])
    assert len(opt.passes) >= 3 and opt.passes[2].prediction is not None
    assert [p.error for p in opt.passes[:2]] == ["", "no_edge"]
    assert not opt.should_stop()[0], f"stopped after pass 2: {opt.should_stop()[1]}"


def test_a_spectrum_rejected_in_assembly_also_breaks_the_row(tmp_path: Path) -> None:
    """README: stop_early "once two spectra in a row (none rejected between them)". A spectrum
    refused by the pipeline restarts the row (pipeline_runs.py, advice.interrupt), but one
    refused by the assembler (a fly-scan row with mismatched lengths, a missing channel, a
    malformed row: ``Rejected`` with its index, assembly_run.py) goes through
    PipelineRuns._rejected (pipeline_runs.py), which then never interrupted: ok, rejected, ok settles.
    Expected: no stop_early at index 2."""
    from xasflow.daemon.assembly import RunClosed, RunOpened
    from xasflow.daemon.outputs import Rejected

    pipe = advice_pipeline(tmp_path)
    outputs = [
        RunOpened("raw-1", {"uid": "raw-1", "time": 1.0}, "fly"),
        demo_scan("raw-1", 0, "CuO", 2),
        Rejected("raw-1", 1, "length_mismatch", "energy has 2000 points, {'it': 1999}"),
        demo_scan("raw-1", 2, "CuO", 3),
        RunClosed("raw-1", "success", "", 3, 0, 0),
    ]
    docs = unpaged(pipe.handle_batch(outputs))
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    advice = {
        d["data"]["index"]: bool(d["data"]["stop_early"])
        for n, d in docs
        if n == "event" and names[d["descriptor"]] == "recommendations"
    }
    statuses = [
        d["data"]["status"] for n, d in docs if n == "event" and names[d["descriptor"]] == "primary"
    ]
    assert statuses == ["ok", "rejected", "ok"]
    assert advice == {0: False, 2: False}, f"stop-early across a rejected spectrum: {advice}"
