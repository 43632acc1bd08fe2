"""The fixes of the feedback review (tests/test_feedback_safety.py), seen from the other side:
what each fix must also do, or must not break."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from feedback_helpers import advice_ioc, advice_pipeline, demo_scan
from helpers import unpaged

# --------------------------------------------------------------------------- pipeline


def _advice_rows(docs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    return [
        d["data"] for n, d in docs if n == "event" and names[d["descriptor"]] == "recommendations"
    ]


class _Batches:
    """A pipeline fed batch by batch: each batch's documents (unpaged) and advice rows
    (index, out_of_domain), the descriptors remembered across batches."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.names = pipe, {}

    def advice(self, batch: list[Any]) -> list[tuple[int, bool]]:
        return [(r["index"], r["out_of_domain"]) for r in self.rows(self.feed(batch))]

    def feed(self, batch: list[Any]) -> list[tuple[str, Any]]:
        docs = unpaged(self.pipe.handle_batch(batch))
        self.names.update({d["uid"]: d["name"] for n, d in docs if n == "descriptor"})
        return docs

    def rows(self, docs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        advice = [d for n, d in docs if n == "event"]
        return [d["data"] for d in advice if self.names[d["descriptor"]] == "recommendations"]


def test_a_flip_in_or_out_of_domain_is_advised_at_once_then_once_per_interval(
    tmp_path: Path,
) -> None:
    """With advice throttled to one per hour, the first time a run's answer leaves the
    bundle's domain its advice goes out at once; a flip back within the interval is held,
    and advised at the close (or once the interval is over): the run's last advice says
    which the latest answer is (the queueserver never plans from out-of-domain advice).
    Before, every flip was advised at once: a stream flipping at each spectrum computed
    advice at every turn."""
    from xasflow.daemon.assembly import RunClosed, RunOpened

    pipe = advice_pipeline(tmp_path, interval=3600.0)
    outputs = [
        RunOpened("raw-1", {"uid": "raw-1", "time": 1.0}, "fly"),
        demo_scan("raw-1", 0, "CuO", 0),  # in domain: the run's first advice
        demo_scan("raw-1", 1, "CuCl", 1),  # out of domain: advice at once
        demo_scan("raw-1", 2, "CuCl", 2),  # still out: throttled
        demo_scan("raw-1", 3, "CuO", 3),  # back in domain within the interval: held
        RunClosed("raw-1", "success", "", 4, 0, 0),  # ... and advised with the close
    ]
    fed = _Batches(pipe)
    assert [fed.advice([out]) for out in outputs] == [
        [],
        [(0, False)],
        [(1, True)],
        [],
        [],
        [(3, False)],
    ]
    assert pipe.counters.snapshot()["advice_superseded"] == 0


def test_a_held_flip_is_advised_once_the_interval_is_over_and_same_batch_advice_superseded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spectra in and out of domain in one batch (a fly scan at 1,000/s), the run's advice
    interval (1 s) over: the interval's advice and the first flip's are due in the same
    batch; the older is superseded (published in the same instant, it told no one anything)
    and counted on /metrics, the later flips held. Once the interval is over a held flip
    is advised at the processing loop's next pass, with no spectrum since (a flip back within
    its interval held again); after an interval the next spectrum is advised, a flip after
    it at once, and the one after that waits again and goes out with the stop."""
    from prometheus_client import CollectorRegistry, generate_latest

    import xasflow.daemon.advice as advice
    from xasflow.daemon.assembly import RunClosed, RunOpened
    from xasflow.daemon.counters import register_prometheus

    clock = {"now": 100.0}
    monkeypatch.setattr(advice.time, "monotonic", lambda: clock["now"])
    pipe = advice_pipeline(tmp_path, interval=1.0)
    fed = _Batches(pipe)
    start = RunOpened("raw-1", {"uid": "raw-1", "time": 1.0}, "fly")
    assert fed.advice([start, demo_scan("raw-1", 0, "CuCl", 0)]) == [(0, True)]
    clock["now"] += 10.0  # the interval is over
    names = ["CuCl", "CuO", "CuCl", "CuO"]  # each one after the first a flip
    docs = fed.feed([demo_scan("raw-1", i, name, i) for i, name in enumerate(names, start=1)])
    answers = [d["data"] for _, d in docs if "out_of_domain" in d.get("data", {})]
    assert [a["out_of_domain"] for a in answers if "cn" in a] == [True, False, True, False]
    assert [(r["index"], r["out_of_domain"]) for r in fed.rows(docs)] == [(2, False)]
    assert fed.advice([demo_scan("raw-1", 5, "CuCl", 5)]) == []  # a flip held
    assert [(r["index"], r["out_of_domain"]) for r in fed.rows(unpaged(pipe.advise()))] == []
    clock["now"] += 10.0  # no spectrum comes, the loop passes: the held flip is advised
    got = [(r["index"], r["out_of_domain"]) for r in fed.rows(unpaged(pipe.advise()))]
    assert got == [(5, True)]
    assert fed.advice([demo_scan("raw-1", 6, "CuO", 6)]) == []  # within that one's interval
    clock["now"] += 10.0
    assert fed.advice([demo_scan("raw-1", 7, "CuCl", 7)]) == [(7, True)]  # none held since
    assert fed.advice([demo_scan("raw-1", 8, "CuO", 8)]) == [(8, False)]  # a flip, at once
    assert fed.advice([demo_scan("raw-1", 9, "CuCl", 9)]) == []  # the next one held
    assert fed.advice([RunClosed("raw-1", "success", "", 10, 0, 0)]) == [(9, True)]
    assert pipe.counters.snapshot()["advice_superseded"] == 1  # spectrum 1's, by 2's
    reg = CollectorRegistry()
    register_prometheus(pipe.counters, reg)
    assert "xasflow_advice_superseded_total 1.0" in generate_latest(reg).decode()


# --------------------------------------------------------------------------- queueserver


def test_the_submitter_compares_answers_and_advice_by_index() -> None:
    """A daemon pages a batch per stream (its answers before its advice): the submitter looks
    at the spectrum index, not the order. An out-of-domain answer before the last advice
    (which followed an in-domain one) leaves the plan; one after it withholds the plan."""
    import json

    from feedback_helpers import REC, ZMQ_KEY, FakeApi
    from helpers import analysis_run_docs

    from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter

    advice = {**REC, "regions": json.dumps(REC["regions"]), "index": 1, "out_of_domain": False}
    ood = {"status": "ok", "cn": 4, "out_of_domain": True}
    fake = FakeApi()
    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    try:
        for raw_uid, ood_index in (("raw-before", 0), ("raw-after", 2)):
            events = [
                ("primary", {**ood, "index": ood_index}),
                ("primary", {"status": "ok", "cn": 4, "out_of_domain": False, "index": 1}),
                ("recommendations", advice),
            ]
            for name, doc in analysis_run_docs(events, raw_uid=raw_uid):
                sub(name, doc)
        assert sub.join(5.0)
        queued = [item["kwargs"]["md"]["xasflow"]["raw_uid"] for _, item in fake.items]
        assert queued == ["raw-before"] and sub.stats["skipped_out_of_domain"] == 1
    finally:
        sub.close()


def test_close_still_submits_what_is_queued_within_its_timeout() -> None:
    """close() submits the queue's plans while its timeout lasts (a daemon's shutdown does not
    lose a run's plan to a quick server), then refuses anything new."""
    from feedback_helpers import REC, ZMQ_KEY, FakeApi

    from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter

    fake = FakeApi(delay=0.05)
    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    for i in range(3):
        assert sub.enqueue(REC, f"raw-{i}")
    sub.close(timeout=5.0)
    assert len(fake.items) == 3 and fake.closed
    assert not sub.enqueue(REC, "raw-late") and sub.stats["dropped_closed"] == 1


# --------------------------------------------------------------------------- EPICS advice PVs


def test_the_advice_pvs_follow_the_current_run_only() -> None:
    """Run A's analysis start and advice arriving after run B's raw start (A's one spectrum
    analysed in the turn that read B's start) write nothing; out-of-domain advice is
    withheld with a MAJOR alarm that the next advice clears; a rejection of A does not
    withdraw B's STOP_EARLY, one of B does."""
    import json

    from caproto import AlarmSeverity
    from feedback_helpers import advice_ioc
    from helpers import analysis_run_docs

    def advice(stop: bool, ood: bool = False) -> dict[str, Any]:
        return {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": stop, "out_of_domain": ood}

    ok = {"status": "ok", "cn": 4}
    rejected = {"status": "rejected", "reason": "no_edge"}
    ioc = advice_ioc()
    group = ioc.group
    try:
        ioc.raw_run_started("raw-A")
        ioc.raw_run_started("raw-B")  # B's start read before A's spectrum was analysed
        docs_a = analysis_run_docs(
            [("primary", ok), ("recommendations", advice(True)), ("primary", rejected)], "raw-A"
        )
        for name, doc in docs_a[:5]:  # start, descriptors, A's answer and advice
            ioc(name, doc)
        ioc.flush()
        assert (group.advice_uid.value, group.stop_early.value) == ("raw-B", 0)
        assert ioc.advice_dropped == 1
        docs_b = analysis_run_docs(
            [
                ("primary", ok),
                ("recommendations", advice(False, ood=True)),
                ("recommendations", advice(True)),
                ("primary", rejected),
            ],
            "raw-B",
        )
        for name, doc in docs_b[:4]:  # start, descriptors, B's answer
            ioc(name, doc)
        ioc(*docs_b[4])  # B's out-of-domain advice: withheld, in alarm
        ioc.flush()
        assert group.n_regions.value == 0 and group.stop_early.value == 0
        assert group.regions.alarm.severity == AlarmSeverity.MAJOR_ALARM
        ioc(*docs_b[5])  # B's next advice, in domain: written, alarm cleared
        ioc.flush()
        assert group.n_regions.value == 1 and group.stop_early.value == 1
        assert group.regions.alarm.severity == AlarmSeverity.NO_ALARM
        for name, doc in docs_a[5:]:  # a late rejection of A, and A's stop: B's advice stands
            ioc(name, doc)
        ioc.flush()
        assert group.stop_early.value == 1 and group.status.value.startswith("rejected")
        ioc(*docs_b[6])  # a rejection of B: the row restarts
        ioc.flush()
        assert group.stop_early.value == 0
    finally:
        ioc.stop()


def test_a_start_the_assembler_refuses_leaves_the_advice_pvs_to_the_current_run(
    tmp_path: Path,
) -> None:
    """A raw start the assembler refuses (``duplicate_start``: a run still open, or one closed
    and seen again) opens no run and scans nothing: it must not take ADVICE_UID over from the
    run under way, nor clear that run's STOP_EARLY. A start that opens a run still does."""

    from feedback_helpers import advice_ioc
    from helpers import processor_parts

    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_processor

    def start(uid: str) -> tuple[str, dict[str, Any]]:
        return "start", {"uid": uid, "time": 1.0, "scan_id": 1, "plan_name": "fly"}

    ioc = advice_ioc()
    group = ioc.group
    try:
        proc = build_processor(
            processor_parts(ioc, advice_pipeline(tmp_path)),
            DaemonConfig(),
            Counters(),
            [ioc],
            lambda: None,
        )  # type: ignore[arg-type]
        closed = (
            "stop",
            {"uid": "s-C", "run_start": "raw-C", "time": 2.0, "exit_status": "success"},
        )
        proc._turn([start("raw-A"), start("raw-C"), closed, start("raw-B")], check=False)
        proc.outlet.complete(0)
        _run_b_is_sure(ioc)
        for refused in ("raw-A", "raw-C"):  # A is open, C closed: each start is refused
            proc._turn([start(refused)], check=False)
            proc.outlet.complete(0)
            ioc.flush()
            uid, stop = group.advice_uid.value, group.stop_early.value
            assert (uid, stop) == ("raw-B", 1), (
                f"the refused start of {refused} took the advice PVs over from raw-B: "
                f"ADVICE_UID={uid!r} STOP_EARLY={stop}"
            )
        proc._turn([start("raw-D")], check=False)  # a new run: its start takes them over
        proc.outlet.complete(0)
        ioc.flush()
        assert (group.advice_uid.value, group.stop_early.value) == ("raw-D", 0)
    finally:
        ioc.stop()


def test_a_malformed_start_leaves_the_advice_pvs_and_one_no_bundle_serves_takes_them(
    tmp_path: Path,
) -> None:
    """Malformed raw starts (no uid, an empty or non-string one, not a mapping) are refused
    by the assembler and leave ADVICE_UID and STOP_EARLY to the run under way. A start for an
    element no bundle serves is not refused at the start (its run opens; its spectra are
    rejected ``no_model``): a new scan is under way, so it takes them over."""

    from helpers import processor_parts

    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_processor

    def start(uid: Any, **more: Any) -> tuple[str, Any]:
        return "start", {"uid": uid, "time": 1.0, "scan_id": 1, "plan_name": "fly", **more}

    ioc = advice_ioc()
    group = ioc.group
    try:
        parts = processor_parts(ioc, advice_pipeline(tmp_path))
        proc = build_processor(parts, DaemonConfig(), Counters(), [ioc], lambda: None)  # type: ignore[arg-type]
        proc._turn([start("raw-B", element="Cu", edge="K")], check=False)
        proc.outlet.complete(0)
        _run_b_is_sure(ioc)
        malformed = [
            ("start", {"time": 1.0, "scan_id": 2}),
            start(""),
            start(7),
            ("start", ["raw-X", 1.0]),
        ]
        for refused in malformed:
            proc._turn([refused], check=False)
            proc.outlet.complete(0)
            ioc.flush()
            assert (group.advice_uid.value, group.stop_early.value) == ("raw-B", 1), refused
        assert parts.assembler.open_runs == 1
        proc._turn([start("raw-Fe", element="Fe", edge="K")], check=False)  # no Fe bundle
        proc.outlet.complete(0)
        ioc.flush()
        assert (group.advice_uid.value, group.stop_early.value) == ("raw-Fe", 0)
        assert parts.assembler.open_runs == 2
    finally:
        ioc.stop()


# --------------------------------------------------------------------------- adaptive agent


def test_the_adaptive_agent_stops_when_no_energy_gives_a_valid_outcome() -> None:
    """No beam (I0 = 0 everywhere): each energy is asked max_tries times, then the agent stops
    and says why, instead of asking for ever."""
    import numpy as np
    from feedback_helpers import FakePredictor

    from xasflow.daemon.adaptive import RecommenderOptimizer

    energies = np.linspace(8800.0, 9100.0, 20)
    opt = RecommenderOptimizer(FakePredictor(), initial_energies=energies, max_tries=2)
    asked = 0
    for _ in range(50):
        batch = opt.suggest(64)
        if not batch:
            break
        asked += len(batch)
        opt.ingest([{"_id": s["_id"], "I0": 0.0, "It": 5e5} for s in batch])
    stop, reason = opt.should_stop()
    assert stop and reason is not None and "no energy gave a valid outcome" in reason
    assert asked == 2 * energies.size and opt.passes[0].error == "no_valid_outcome"


def test_an_outcome_that_never_comes_back_is_given_up_too() -> None:
    """An energy handed out max_tries times whose outcome never arrives is given up: the pass
    finishes without it and the next pass begins."""
    import numpy as np
    from feedback_helpers import FakePredictor

    from xasflow.daemon.adaptive import RecommenderOptimizer

    energies = np.linspace(8800.0, 9100.0, 20)
    opt = RecommenderOptimizer(FakePredictor(), initial_energies=energies, max_tries=3)
    lost = float(energies[5])
    for _ in range(10):
        if len(opt.passes) > 1 or opt.should_stop()[0]:
            break
        batch = opt.suggest(64)
        opt.ingest([{"_id": s["_id"], "mu": 1.0} for s in batch if s["energy"] != lost])
    first = opt.passes[0]
    assert first.given_up == {5} and first.tries[5] == 3 and first.prediction is not None
    assert first.energies.size - len(first.mu) == 1  # the pass was predicted without it


def _run_b_is_sure(ioc: Any) -> None:
    """Run raw-B, under way, sends advice that is sure: the IOC shows it, STOP_EARLY 1."""
    from helpers import analysis_run_docs

    advice = {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True}
    for name, doc in analysis_run_docs([("recommendations", advice)], "raw-B")[:-1]:
        ioc(name, doc)
    ioc.flush()
    assert (ioc.group.advice_uid.value, ioc.group.stop_early.value) == ("raw-B", 1)
