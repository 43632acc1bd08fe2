"""The IOC's advice PVs (STOP_EARLY, REGIONS, N_REGIONS, ADVICE_UID, ADVICE_BUNDLE): which run
they belong to, when a run's start or end clears or withdraws them, and advice cut to the
regions REGIONS holds, read by caproto's client on loopback (``ioc_env``: conftest,
epics_support). Which run may advise is :mod:`xasflow.adapters.epics_advice`'s
(test_epics_advice)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("caproto")

from helpers import analysis_run_docs, processor_parts, wait_for
from helpers import read_pv as read

from xasflow.adapters.epics_pvs import MAX_REGIONS
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.health import feedback_health


def test_advice_belongs_to_its_run_and_is_not_an_answer(ioc_env: dict[str, Any]) -> None:
    """A recommendation sets the advice PVs under its run's uid without counting as an answer
    or moving E0; the next run's start clears them, so its scan is not stopped on the last
    run's certainty."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    stop, nreg, advice, e0 = ctx.get_pvs(
        ioc.pv("stop_early"), ioc.pv("n_regions"), ioc.pv("advice_uid"), ioc.pv("e0"), timeout=5.0
    )
    before = ioc.published
    docs = analysis_run_docs(
        [
            ("primary", {"status": "ok", "cn": 4, "e0": 8984.0}),
            (
                "recommendations",
                {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True, "e0": 8990.0},
            ),
        ],
        raw_uid="raw-A",
    )
    for name, doc in docs[:-1]:  # run A still scanning
        ioc(name, doc)
    wait_for(lambda: read(stop) == 1 and read(advice) == "raw-A", what="run A's advice")
    assert read(nreg) == 1 and read(e0) == pytest.approx(8984.0)
    assert ioc.published == before + 1  # the answer, not the advice
    rejected = {"status": "rejected", "reason": "no_edge"}
    for name, doc in analysis_run_docs([("primary", rejected)], raw_uid="raw-B")[:3]:
        ioc(name, doc)  # run B open, nothing analysed yet
    wait_for(lambda: read(advice) == "raw-B", what="run B's start to clear the advice")
    assert read(stop) == 0 and read(nreg) == 0


def test_the_next_runs_raw_start_clears_the_last_runs_stop_early(
    ioc_env: dict[str, Any], tmp_path: Path
) -> None:
    """epics_pvs: the advice PVs are cleared when a run starts, "so a plan watching
    STOP_EARLY never stops a new scan on the last one's certainty". The analysis start
    document only comes with the run's first result (a whole sweep of a quick-XAS run
    later), so the daemon's raw-start hook clears them as the raw start arrives: before,
    STOP_EARLY stayed 1 for run A through run B's first sweep."""

    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_processor

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    stop, advice = ctx.get_pvs(ioc.pv("stop_early"), ioc.pv("advice_uid"), timeout=5.0)
    run_a = analysis_run_docs(
        [
            ("primary", {"status": "ok", "cn": 4, "e0": 8984.0}),
            ("recommendations", {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True}),
        ],
        raw_uid="raw-A",
    )
    for name, doc in run_a[:-1]:  # A's stop not out yet (its last batch in flight)
        ioc(name, doc)
    wait_for(lambda: read(stop) == 1 and read(advice) == "raw-A", what="run A's advice")
    parts = processor_parts(ioc)  # only the IOC matters here
    proc = build_processor(parts, DaemonConfig(), Counters(), [], lambda: None)  # type: ignore[arg-type]
    assert proc.on_raw_start is not None
    proc.on_raw_start({"uid": "raw-B", "time": 1.0, "scan_id": 8, "plan_name": "fly"})
    ioc.flush()
    wait_for(lambda: read(advice) == "raw-B" and read(stop) == 0, what="run A's advice cleared")


def test_a_run_that_ends_withdraws_its_stop_early_and_keeps_its_regions(
    ioc_env: dict[str, Any],
) -> None:
    """A run that has ended (its stop, or closed as timed out) can no longer stop early, yet
    STOP_EARLY stayed 1 after it until the next raw start was read: to a step run D still
    scanning beside a fly run C that started later and ended first, STOP_EARLY read C's
    certainty for the rest of D's scan, and to the next scan for as long as its start took
    to reach the daemon. The end of the run the advice PVs belong to sets it to 0; the
    regions (the advice for the next scan) and ADVICE_UID stay, and the end of another run
    touches nothing."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    stop, nreg, advice = ctx.get_pvs(
        ioc.pv("stop_early"), ioc.pv("n_regions"), ioc.pv("advice_uid"), timeout=5.0
    )
    certain = ("recommendations", {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True})
    answer = ("primary", {"status": "ok", "cn": 4, "e0": 8984.0})
    ioc.raw_run_started("raw-D")  # a step run, scanning on
    ioc.raw_run_started("raw-C")  # a fly run beside it: the advice PVs are its
    timed_out = {"exit_status": "fail", "raw_exit_status": "timeout"}  # as documents has it
    run_c = analysis_run_docs([answer, certain], raw_uid="raw-C", stop=timed_out)
    for name, doc in run_c[:-1]:
        ioc(name, doc)
    wait_for(lambda: (read(stop), read(advice)) == (1, "raw-C"), what="run C's certainty")
    ioc(*run_c[-1])  # closed as timed out: no document for run_timeout_s
    ioc.flush()
    assert (read(stop), read(nreg), read(advice)) == (0, 1, "raw-C")
    run_e = analysis_run_docs([answer, certain], raw_uid="raw-E")
    ioc.raw_run_started("raw-E")
    for name, doc in run_e[:-1]:
        ioc(name, doc)
    wait_for(lambda: (read(stop), read(advice)) == (1, "raw-E"), what="run E's certainty")
    for name, doc in analysis_run_docs([answer], raw_uid="raw-D"):  # D ends: not the advice's
        ioc(name, doc)
    ioc.flush()
    assert (read(stop), read(advice)) == (1, "raw-E")
    ioc(*run_e[-1])  # E's stop
    ioc.flush()
    assert (read(stop), read(nreg), read(advice)) == (0, 1, "raw-E")


def test_advice_cut_to_the_regions_the_pv_holds_is_logged_once_per_run(
    ioc_env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """REGIONS holds 64 regions: advice with more was cut to them without a word, so a plan
    following the PVs scanned part of what was advised and nobody knew. The first 64 are
    still written (N_REGIONS 64), each cut advice is counted, and the IOC logs a warning
    once per run saying how many regions were left out."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    nreg, regions, advice = ctx.get_pvs(
        ioc.pv("n_regions"), ioc.pv("regions"), ioc.pv("advice_uid"), timeout=5.0
    )
    many = [[8900.0 + 10 * k, 8905.0 + 10 * k, 0.5, 1.0] for k in range(MAX_REGIONS + 6)]
    flat = [v for region in many for v in region]
    rec = {"waveform": json.dumps(flat), "stop_early": False}
    with caplog.at_level("WARNING", logger="xasflow.adapters.epics_ioc"):
        for raw_uid in ("raw-A", "raw-B"):
            run = analysis_run_docs(
                [("recommendations", rec), ("recommendations", rec)], raw_uid=raw_uid
            )
            for name, doc in run:
                ioc(name, doc)
            ioc.flush()
            assert (read(advice), read(nreg)) == (raw_uid, MAX_REGIONS)
            assert read(regions) == pytest.approx(flat[: 4 * MAX_REGIONS])
    cut = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(cut) == 2, cut  # one per run, not one per advice
    assert "run raw-A has 70 regions; REGIONS holds the first 64, 6 left out" in cut[0]
    assert "run raw-B" in cut[1]
    assert ioc.regions_cut == 4
    config = DaemonConfig.model_validate({"epics": {"enabled": True}})
    epics = feedback_health(config, ioc, None)["epics"]  # what /health shows of it
    assert (epics["regions_cut"], epics["advice_dropped"]) == (4, 0)


def test_advice_bundle_names_the_advices_bundle_not_the_last_answers(
    ioc_env: dict[str, Any],
) -> None:
    """BUNDLE_ID names the bundle of the last answer, of whichever run: with a step run D
    scanning beside fly run C (whose advice the PVs hold), D's answer from another bundle
    made BUNDLE_ID name it, and no PV said which bundle C's regions came from. ADVICE_BUNDLE
    is written with the advice (withheld advice too) and cleared with it."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    names = ("bundle_id", "advice_bundle", "advice_uid", "n_regions", "cn")
    pvs = dict(zip(names, ctx.get_pvs(*(ioc.pv(n) for n in names), timeout=5.0), strict=True))
    ioc.raw_run_started("raw-D")  # a step run of another element, scanning on
    ioc.raw_run_started("raw-C")  # a fly run beside it: the advice PVs are its
    rec = {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": False}
    answer = {"status": "ok", "cn": 4, "e0": 8984.0, "bundle_id": "cu-k-v1"}
    run_c = analysis_run_docs(
        [("primary", answer), ("recommendations", {**rec, "bundle_id": "cu-k-v1"})],
        raw_uid="raw-C",
    )
    for name, doc in run_c[:-1]:
        ioc(name, doc)
    ioc.flush()
    assert [read(pvs[n]) for n in names] == ["cu-k-v1", "cu-k-v1", "raw-C", 1, 4]
    other = {**answer, "cn": 6, "e0": 8333.0, "bundle_id": "ni-k-v2"}
    run_d = analysis_run_docs(
        [("primary", other), ("recommendations", {**rec, "bundle_id": "ni-k-v2"})],
        raw_uid="raw-D",
    )
    for name, doc in run_d[:-1]:  # D's answer is written, its advice (not the PVs' run) not
        ioc(name, doc)
    ioc.flush()
    assert [read(pvs[n]) for n in names] == ["ni-k-v2", "cu-k-v1", "raw-C", 1, 6]
    ioc.raw_run_started("raw-E")  # the next scan: no advice, no advice bundle yet
    ioc.flush()
    assert [read(pvs[n]) for n in ("advice_bundle", "advice_uid", "n_regions")] == ["", "raw-E", 0]
    doubt = {**rec, "bundle_id": "cu-k-v1", "out_of_domain": True}
    for name, doc in analysis_run_docs([("recommendations", doubt)], raw_uid="raw-E")[:-1]:
        ioc(name, doc)
    ioc.flush()
    assert [read(pvs[n]) for n in ("advice_bundle", "advice_uid", "n_regions")] == [
        "cu-k-v1",
        "raw-E",
        0,
    ]
