"""The analysis pipeline's rejections and losses: reasons, run ends, counters and their export."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("event_model")

from pipeline_helpers import channels, closed, events, only, opened, scan, validate

from xasflow.daemon.assembly import Rejected, RunAssembler, RunClosed
from xasflow.daemon.counters import Counters, register_prometheus
from xasflow.daemon.pipeline import Pipeline


def test_rejections_have_reasons_and_are_counted(pipeline: Pipeline, counters: Counters) -> None:
    fe_energy = np.linspace(7050.0, 7300.0, 400)
    fe = {"i0": np.full(400, 1e5), "it": 1e5 * np.exp(-1.0 - (fe_energy > 7112.0))}
    far = np.linspace(3000.0, 3100.0, 100)
    energy, nan = channels("CuCl")
    nan["it"] = nan["it"].copy()
    nan["it"][100] = np.nan
    _, neg = channels("CuCl")
    neg["it"] = -neg["it"]
    cut_energy, cut = channels("CuCl", hi=9010.0, n=300)
    outputs = [
        opened("raw-r"),
        scan("raw-r", 0, element=None, edge=None, energy=fe_energy, chans=fe),  # inferred Fe K
        scan("raw-r", 1, element="Fe", edge="K", energy=fe_energy, chans=fe),
        scan("raw-r", 2, element=None, edge=None, energy=far, chans={"i0": far, "it": far / 2}),
        scan("raw-r", 3, energy=energy, chans=nan),
        scan("raw-r", 4, energy=energy, chans=neg),
        scan("raw-r", 5, energy=cut_energy, chans=cut),
        scan("raw-r", 6, mode="fluorescence"),  # no If channel
        scan("raw-r", 7, "CuCl"),  # and one good one
        closed("raw-r", n=8),
    ]
    docs = pipeline.handle_batch(outputs)
    validate(docs)
    rows = events(docs)
    assert [(r["index"], r["status"], r["reason"]) for r in rows] == [
        (0, "rejected", "no_model"),
        (1, "rejected", "no_model"),
        (2, "rejected", "unknown_element"),
        (3, "rejected", "not_finite"),
        (4, "rejected", "bad_channel"),
        (5, "rejected", "no_post_edge"),
        (6, "rejected", "bad_channel"),
        (7, "ok", ""),
    ]
    assert (rows[0]["element"], rows[0]["edge"], rows[0]["flags"]) == (
        "Fe",
        "K",
        "element_inferred",
    )
    assert "no model bundle for Fe K (serving: Cu K)" in rows[0]["detail"]
    assert "3000-3100 eV" in rows[2]["detail"]
    assert rows[3]["bundle_id"] is not None and rows[3]["cn"] is None
    assert rows[7]["cn"] == 4
    stop = only(docs, "stop")
    assert (stop["n_analysed"], stop["n_rejected"]) == (1, 7)
    assert stop["num_events"] == {"primary": 8}

    snap = counters.snapshot()
    assert snap["spectra_received"] == 8 and snap["spectra_analysed"] == 1
    assert snap["rejected_by_stage"] == {
        "analysis": {
            "bad_channel": 2,
            "no_model": 2,
            "no_post_edge": 1,
            "not_finite": 1,
            "unknown_element": 1,
        }
    }
    # every spectrum received is accounted for exactly once, by the analysis
    rejected = snap["spectra_rejected_by_stage"]
    assert rejected == {"analysis": 7, "assembly": 0} and snap["spectra_rejected"] == 7
    assert snap["spectra_received"] == snap["spectra_analysed"] + rejected["analysis"]


def test_assembly_rejections_and_run_ends(pipeline: Pipeline, counters: Counters) -> None:
    docs = pipeline.handle_batch(
        [
            Rejected(None, None, "malformed_document", "event lacks 'uid'"),  # no run: counted
            opened("raw-x", kind="step", element="Cu"),
            Rejected("raw-x", None, "duplicate_event", "seq_num 3 seen before"),
            Rejected("raw-x", 0, "missing_stop", "12 points but no stop"),
            RunClosed("raw-x", "timeout", "no document for 61.0 s", 0, 2, 1, 4),
            Rejected("raw-x", None, "late_document", "stop for a closed run"),  # closed: counted
        ]
    )
    validate(docs)
    assert [n for n, _ in docs] == ["start", "descriptor", "event_page", "stop"]
    rows = events(docs)
    assert [(r["index"], r["reason"], r["status"]) for r in rows] == [
        (-1, "duplicate_event", "rejected"),
        (0, "missing_stop", "rejected"),
    ]
    assert rows[0]["detail"] == "seq_num 3 seen before"
    stop = only(docs, "stop")
    assert stop["exit_status"] == "fail" and stop["raw_exit_status"] == "timeout"
    assert stop["reason"] == "stop_timeout: no document for 61.0 s"
    assert (stop["raw_seq_gaps"], stop["raw_missing_events"]) == (1, 4)
    assert stop["bundle_ids"] == []
    # the log line keeps the pipeline's count apart from what assembly rejected before it,
    # so no "rejected" exceeds "received"
    line = counters.summary()
    assert line.startswith("0 spectra received by the analysis: 0 analysed, 0 rejected {}")
    assert "rejected in assembly 4 {" in line and "'late_document': 1" in line

    # a run that ends before any spectrum still gets a complete analysis run
    docs = pipeline.handle_batch([opened("raw-y"), closed("raw-y", "abort", "user pressed stop")])
    validate(docs)
    assert [n for n, _ in docs] == ["start", "descriptor", "stop"]
    stop = only(docs, "stop")
    assert (stop["exit_status"], stop["reason"], stop["num_events"]) == (
        "abort",
        "user pressed stop",
        {"primary": 0},
    )
    # close_all ends whatever is open (shutdown)
    pipeline.handle_batch([opened("raw-z"), scan("raw-z", 0)])
    docs = pipeline.close_all("shutdown")
    assert only(docs, "stop")["exit_status"] == "abort" and pipeline.open_runs == []

    snap = counters.snapshot()
    assert snap["rejected_by_stage"] == {
        "assembly": {
            "duplicate_event": 1,
            "late_document": 1,
            "malformed_document": 1,
            "missing_stop": 1,
        }
    }
    assert snap["runs_opened"] == 3
    assert snap["runs_closed"] == {"abort": 2, "timeout": 1}


def test_prometheus_export(pipeline: Pipeline, counters: Counters) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    pipeline.handle_batch(
        [
            opened("raw-p"),
            scan("raw-p", 0),
            scan("raw-p", 1, element="Fe"),
            Rejected("raw-p", None, "duplicate_event", "x"),
            closed("raw-p"),
        ]
    )
    counters.sync_decode_errors({"not_plain_data": 3, "garbage": 2})
    counters.sync_decode_errors({"garbage": 1})  # a lower total never lowers the count
    counters.set_gauge("queue_depth", 5, queue="input")
    counters.model_refusal("digest_mismatch")
    counters.model_refusal("digest_mismatch")
    counters.model_refusal("symlink")
    reg = CollectorRegistry()
    register_prometheus(counters, reg)
    text = generate_latest(reg).decode()
    bundle_id = counters.snapshot()["models"]["Cu-K"]
    for line in [
        "xasflow_spectra_received_total 2.0",
        "xasflow_spectra_analysed_total 1.0",
        'xasflow_spectra_rejected_total{reason="no_model",stage="analysis"} 1.0',
        'xasflow_spectra_rejected_total{reason="duplicate_event",stage="assembly"} 1.0',
        'xasflow_decode_errors_total{reason="garbage"} 2.0',
        'xasflow_decode_errors_total{reason="not_plain_data"} 3.0',
        "xasflow_runs_opened_total 1.0",
        'xasflow_runs_closed_total{exit_status="success"} 1.0',
        "xasflow_model_swaps_total 0.0",
        'xasflow_model_refused_total{reason="digest_mismatch"} 2.0',
        'xasflow_model_refused_total{reason="symlink"} 1.0',
        f'xasflow_model_info{{bundle_id="{bundle_id}",edge="K",element="Cu"}} 1.0',
        'xasflow_latency_seconds_bucket{le="0.005"} 2.0',
        'xasflow_latency_seconds_bucket{le="0.002"} 0.0',
        'xasflow_latency_seconds_bucket{le="+Inf"} 2.0',
        "xasflow_latency_seconds_count 2.0",
        'xasflow_queue_depth{queue="input"} 5.0',
        "# HELP xasflow_queue_depth Documents received and waiting for the processing thread",
        # every known loss cause and refusal reason is there from 0, so the alert rules'
        # increase() sees the first loss or refusal too
        'xasflow_events_lost_total{cause="overflow"} 0.0',
        'xasflow_events_lost_total{cause="interrupted"} 0.0',
        'xasflow_model_refused_total{reason="file_mismatch"} 0.0',
    ]:
        assert line in text, line


def test_lost_events_make_a_partial_run_counted_by_cause(
    pipeline: Pipeline, counters: Counters
) -> None:
    """A raw run that lost events is never "success": its analysis stop says how many were
    lost, and /metrics counts them by cause (issue 13)."""
    from prometheus_client import CollectorRegistry, generate_latest

    docs = pipeline.handle_batch(
        [opened("raw-l"), scan("raw-l", 0), RunClosed("raw-l", "success", "", 1, 0, 2, 5)]
    )
    validate(docs)
    stop = only(docs, "stop")
    assert stop["exit_status"] == "fail" and stop["partial"] is True
    assert stop["reason"].startswith("partial: 5 raw events missing (2 sequence gaps)")
    assert (stop["raw_exit_status"], stop["raw_missing_events"]) == ("success", 5)
    docs = pipeline.handle_batch([opened("raw-w"), scan("raw-w", 0), closed("raw-w")])
    whole = only(docs, "stop")
    assert whole["exit_status"] == "success" and whole["partial"] is False
    snap = counters.snapshot()
    assert snap["events_lost"] == {"seq_gap": 5} and snap["events_lost_total"] == 5
    reg = CollectorRegistry()
    register_prometheus(counters, reg)
    assert 'xasflow_events_lost_total{cause="seq_gap"} 5.0' in generate_latest(reg).decode()


def test_duplicate_events_collapse_into_one_counted_row(
    pipeline: Pipeline, counters: Counters
) -> None:
    """Each duplicate is counted, but a run gets one rejected row for them, not one each."""
    dup = [Rejected("raw-d", None, "duplicate_event", f"seq_num {i} repeated") for i in (3, 4, 4)]
    docs = pipeline.handle_batch([opened("raw-d"), scan("raw-d", 0), *dup, closed("raw-d")])
    validate(docs)
    rows = events(docs)
    assert [r["reason"] for r in rows] == ["", "duplicate_event"]
    assert only(docs, "stop")["n_duplicate_events"] == 3
    assert counters.snapshot()["rejected_by_stage"]["assembly"] == {"duplicate_event": 3}


def test_a_scan_in_kev_without_an_element_is_refused_with_the_unit_named(
    pipeline: Pipeline,
) -> None:
    """Energies in keV and no element in the start: refused unknown_element, and the detail
    says the edge lies in the range times 1000 (as it does with the element given); before it
    said only "no tabulated edge inside 9-9 eV"."""
    from scan_helpers import STEP_GRID, step_scan, transmission

    _, docs = step_scan(
        STEP_GRID / 1000.0, transmission(STEP_GRID), {"element": None, "edge": None}
    )
    asm = RunAssembler()
    out: list[tuple[str, dict]] = []
    for name, doc in docs:
        out.extend(pipeline.handle_batch(asm.feed(name, doc)))
    (row,) = events(out)
    assert (row["status"], row["reason"]) == ("rejected", "unknown_element")
    assert row["detail"].endswith("(energies in keV? an edge lies in their range times 1000)")
    assert "8.8-9.396 eV" in row["detail"]


def test_a_spectrum_whose_document_fails_is_counted_as_an_internal_error(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while the analysis event of one spectrum is made (its row refused by the run
    here) loses that document but not the count: received == analysed + rejected holds, the
    loss reads ``internal_error``, and the rest of the batch is published. Before, the
    spectrum was counted received and then neither analysed nor rejected."""
    from xasflow.daemon.documents import AnalysisRun

    real = AnalysisRun.event

    def event(self: AnalysisRun, row: dict) -> list:
        if row["index"] == 1:
            raise RuntimeError("a bug in the run's documents")
        return real(self, row)

    monkeypatch.setattr(AnalysisRun, "event", event)
    docs = pipeline.handle_batch(
        [opened("raw-e"), *(scan("raw-e", i, "CuCl") for i in range(3)), closed("raw-e", n=3)]
    )
    assert [r["index"] for r in events(docs)] == [0, 2]
    snap = counters.snapshot()
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (3, 2)
    assert snap["rejected_by_stage"]["analysis"] == {"internal_error": 1}


def test_a_run_start_that_fails_is_counted_and_its_spectra_still_analysed(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while a raw run's start is handled is an internal error (``run_start``, in
    ``xasflow_internal_errors_total``), not only a log line; the run's spectra still go to an
    analysis run, opened at its first spectrum without the raw start's metadata, and it stops."""

    def broken(self: Pipeline, out: object) -> list:
        raise RuntimeError("a bug in the run's start")

    monkeypatch.setattr(Pipeline, "_opened", broken)
    docs = pipeline.handle_batch(
        [opened("raw-o"), *(scan("raw-o", i, "CuCl") for i in range(2)), closed("raw-o", n=2)]
    )
    assert [n for n, _ in docs][:2] == ["start", "descriptor"]
    start = only(docs, "start")
    assert (start["raw_uid"], start["scan_kind"], "raw_scan_id" in start) == (
        "raw-o",
        "unknown",
        False,
    )
    assert [(r["index"], r["status"]) for r in events(docs)] == [(0, "ok"), (1, "ok")]
    assert only(docs, "stop")["exit_status"] == "success"
    snap = counters.snapshot()
    assert snap["internal_errors"] == {"processing": 0, "run_start": 1, "run_stop": 0}
    assert (snap["runs_opened"], snap["spectra_received"], snap["spectra_analysed"]) == (1, 2, 2)
    assert pipeline.open_runs == []


@pytest.mark.parametrize("where", ["hint", "stop"])
def test_a_run_stop_that_fails_is_counted_and_the_run_still_stops(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug while a raw run's stop is handled (forgetting its HERFD hint, or composing the
    analysis stop once) is an internal error (``run_stop``), and the analysis run still
    stops, "fail" with the error as its reason, and is not held open: a replay of the raw
    run opens a new one. Before, the run was left without a stop (only logged)."""
    from xasflow.daemon.documents import AnalysisRun
    from xasflow.daemon.herfd_hint import HerfdHints

    if where == "hint":

        def forget(self: HerfdHints, raw_uid: str) -> None:
            raise RuntimeError("a bug in closing the run")

        monkeypatch.setattr(HerfdHints, "forget", forget)
    else:
        real = AnalysisRun.close
        calls: list[str] = []

        def close(self: AnalysisRun, *args: object, **kw: object) -> list:
            calls.append(self.raw_uid)
            if len(calls) == 1:
                raise RuntimeError("a bug in closing the run")
            return real(self, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(AnalysisRun, "close", close)
    docs = pipeline.handle_batch(
        [opened("raw-c"), *(scan("raw-c", i, "CuCl") for i in range(2)), closed("raw-c", n=2)]
    )
    validate(docs)
    assert [r["index"] for r in events(docs)] == [0, 1]
    stop = only(docs, "stop")
    assert (stop["exit_status"], stop["raw_exit_status"], stop["n_analysed"]) == (
        "fail",
        "success",
        2,
    )
    assert stop["reason"] == "internal_error: RuntimeError: a bug in closing the run"
    assert pipeline.open_runs == []
    snap = counters.snapshot()
    assert snap["internal_errors"] == {"processing": 0, "run_start": 0, "run_stop": 1}
    assert snap["runs_closed"] == {"success": 1}


def _stop_fails_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every analysis run's first ``compose_stop`` raises (a bug in the real close path, after
    its start and descriptor are composed)."""
    import event_model

    real = event_model.compose_run

    def compose_run(*args: object, **kw: object) -> object:
        bundle = real(*args, **kw)  # type: ignore[arg-type]
        compose_stop, calls = bundle.compose_stop, []

        def failing_stop(*a: object, **k: object) -> object:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the stop")
            return compose_stop(*a, **k)  # type: ignore[arg-type]

        bundle.compose_stop = failing_stop  # type: ignore[method-assign]
        return bundle

    monkeypatch.setattr(event_model, "compose_run", compose_run)


def test_a_run_without_events_whose_stop_fails_once_still_publishes_a_whole_run(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with no events composes its start and descriptor in ``close``; when the stop then
    fails (a bug), the retried close publishes them before its stop: a whole run, not a stop
    whose start never went out (before: ``["stop"]`` alone, its ``run_start`` unknown)."""
    _stop_fails_once(monkeypatch)
    docs = pipeline.handle_batch([opened("raw-x"), closed("raw-x", n=0)])
    assert [n for n, _ in docs] == ["start", "descriptor", "stop"]
    validate(docs)
    start, desc, stop = (d for _, d in docs)
    assert (desc["run_start"], stop["run_start"], start["raw_uid"]) == (
        start["uid"],
        start["uid"],
        "raw-x",
    )
    assert (stop["exit_status"], stop["reason"]) == (
        "fail",
        "internal_error: RuntimeError: a bug in the stop",
    )
    assert counters.snapshot()["internal_errors"]["run_stop"] == 1
    assert pipeline.open_runs == []


def test_a_failed_event_leaves_its_runs_start_to_the_next_document() -> None:
    """The start and descriptor composed for a run's first event are handed out with the next
    document of the run that succeeds, when that event fails (a bug, here its clock): never an
    event or a stop whose start was lost (before: the next event went out alone)."""
    from xasflow.daemon.analysis_rows import rejected_row
    from xasflow.daemon.documents import AnalysisRun

    calls: list[int] = []

    def clock() -> float:  # the 2nd reading is the first event's own, after the start's
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the clock")
        return 1.7e9

    run = AnalysisRun("raw-y", {"uid": "raw-y"}, validate=True, clock=clock)
    with pytest.raises(RuntimeError, match="a bug in the clock"):
        run.event(rejected_row(0, "no_model"))
    assert run.started and run.n_rejected == 0
    docs = run.event(rejected_row(1, "no_model"))
    assert [n for n, _ in docs] == ["start", "descriptor", "event"]
    docs += run.close("success")
    assert [n for n, _ in docs][3:] == ["stop"]
    validate(docs)
    assert docs[-1][1]["n_rejected"] == 1
