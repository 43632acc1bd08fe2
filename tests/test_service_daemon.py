"""The wired Daemon on a loopback 0MQ proxy: scans analysed, bad input refused, /health, /metrics.

The session's tiny Cu K bundle (conftest, synthetic FEFF tree) serves; documents are
composed here with event-model and published with ``ZmqDocumentPublisher`` through an
in-process 0MQ forwarder (SUB/PUB, like bluesky's proxy), so no ophyd or RunEngine is needed.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from helpers import (
    DEADLINE_S,
    STEP_GRID,
    Harness,
    LoopbackProxy,
    daemon_config,
    fly_scan,
    get,
    publish,
    step_scan,
    transmission,
    wait_for,
)

from xasflow.adapters.tiled_store import read_analysis
from xasflow.adapters.wire import DECODE_ERROR_REASONS
from xasflow.daemon.pipeline import known_rejections


@pytest.fixture(scope="module")
def harness(
    models_dir: Path, shared_proxy: LoopbackProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    store = tmp_path_factory.mktemp("store")
    cfg = daemon_config(models_dir, shared_proxy, store, run_timeout_s=1.5, timeout_check_s=0.1)
    h = Harness(cfg, shared_proxy)
    yield h
    h.close()


def test_step_and_fly_scans_analysed_on_bus_and_in_store(harness: Harness) -> None:
    d = harness.daemon
    before = d.counters.snapshot()
    step_uid, step_docs = step_scan(STEP_GRID, transmission(STEP_GRID, shift=1.5))
    fly_e = np.linspace(8800.0, 9400.0, 1000)
    spectra = [
        transmission(fly_e, shift=-1.0, kind=k, seed=i)
        for i, k in enumerate(("CuO", "Cu2O", "CuO"))
    ]
    fly_uid, fly_docs = fly_scan(fly_e, spectra, {"sample_name": "mixture"})
    publish(harness.pub, step_docs + fly_docs)
    runs = harness.results.wait([step_uid, fly_uid])

    step = runs[step_uid]
    assert step["start"]["raw_uid"] == step_uid and step["start"]["scan_kind"] == "step"
    assert step["start"]["bundle_id"] == d.view.models()[0]["bundle_id"]
    assert [e["status"] for e in step["events"]] == ["ok"]
    ev = step["events"][0]
    assert ev["cn"] in (2, 4, 6) and ev["element"] == "Cu" and ev["edge"] == "K"
    assert ev["energy_shift"] == pytest.approx(1.5, abs=0.3)  # aligned on the foil channel
    assert step["stop"]["exit_status"] == "success" and step["stop"]["n_analysed"] == 1
    fly = runs[fly_uid]
    assert fly["start"]["scan_kind"] == "fly"
    assert [e["index"] for e in fly["events"]] == [0, 1, 2]
    assert all(e["status"] == "ok" for e in fly["events"])
    assert all(e["energy_shift"] == pytest.approx(-1.0, abs=0.3) for e in fly["events"])
    assert fly["stop"]["n_analysed"] == 3
    # recommendations follow analysed spectra, at most one per run per recommend.interval_s
    assert [r["index"] for r in step["recommendations"]] == [0]
    assert fly["recommendations"][0]["index"] == 0 and len(fly["recommendations"]) <= 3

    after = d.counters.snapshot()
    assert after["spectra_analysed"] - before["spectra_analysed"] == 4
    assert after["spectra_received"] - before["spectra_received"] == 4
    # the stored rows equal what was published, readable back by raw uid via tiled
    assert d.parts.store.flush(10)
    for uid, run in runs.items():
        md, rows = read_analysis(d.parts.store, uid)
        assert md["start"]["raw_uid"] == uid and md["stop"]["exit_status"] == "success"
        assert rows["index"].tolist() == [e["index"] for e in run["events"]]
        assert rows["cn"].tolist() == [e["cn"] for e in run["events"]]
        assert rows["distance"].tolist() == pytest.approx([e["distance"] for e in run["events"]])
    assert d.view.echo_dropped > 0  # its own results came back through the proxy and were ignored


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))

    marker = ""


def test_hostile_and_broken_inputs_are_rejected_with_reasons(
    harness: Harness, tmp_path: Path
) -> None:
    d, pub = harness.daemon, harness.pub
    before = d.counters.snapshot()
    # --- wire level: garbage, a port scanner, pickles that are not plain data
    _Evil.marker = str(tmp_path / "pwned")
    pub.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS hello: no spaces
    pub.send_raw(b"GET / HTTP/1.1\r\nHost: daemon\r\n\r\n")
    pub.send_raw(b" start " + pickle.dumps(_Evil(), protocol=4))
    pub.send_raw(b" start " + pickle.dumps({"uid": "x", "time": 1.0, "f": Fraction(1, 3)}))
    pub.send_raw(b" start " + bytes(range(200, 256)))  # random body
    # --- documents: malformed, orphaned
    pub("start", {"time": 1.0})  # no uid
    pub("event", {"descriptor": 42, "uid": "e"})
    pub("stop", {"uid": "s", "run_start": "never-started", "time": 1.0})
    # --- runs that cannot become predictions
    nostop_uid, nostop = step_scan(STEP_GRID, transmission(STEP_GRID), stop=False)
    fe_grid = np.linspace(7000.0, 7400.0, 300)
    fe_uid, fe_docs = fly_scan(fe_grid, [transmission(fe_grid)], {"element": "Fe"})
    nowhere = np.linspace(30000.0, 30100.0, 200)
    unknown_uid, unknown_docs = fly_scan(
        nowhere, [transmission(nowhere)], {"element": None, "edge": None}
    )
    fly_e = np.linspace(8800.0, 9400.0, 800)
    nan_spec = transmission(fly_e)
    nan_spec["It"] = np.full(fly_e.size, np.nan)
    nan_uid, nan_docs = fly_scan(fly_e, [nan_spec, transmission(fly_e, seed=3)])
    for docs in (nostop, fe_docs, unknown_docs, nan_docs):
        publish(pub, docs)
    # --- and after all that, a good scan is still analysed
    good_uid, good_docs = step_scan(STEP_GRID, transmission(STEP_GRID, seed=9))
    publish(pub, good_docs)

    runs = harness.results.wait([fe_uid, unknown_uid, nan_uid, good_uid, nostop_uid])
    assert not Path(_Evil.marker).exists()
    assert runs[good_uid]["events"][0]["status"] == "ok"
    fe_event = runs[fe_uid]["events"][0]
    assert (fe_event["status"], fe_event["reason"]) == ("rejected", "no_model")
    assert "Fe K" in fe_event["detail"]
    assert runs[unknown_uid]["events"][0]["reason"] == "unknown_element"
    assert [(e["index"], e["status"], e["reason"]) for e in runs[nan_uid]["events"]] == [
        (0, "rejected", "nan_data"),
        (1, "ok", ""),
    ]
    nostop_run = runs[nostop_uid]
    assert [e["reason"] for e in nostop_run["events"]] == ["missing_stop"]
    assert nostop_run["stop"]["exit_status"] == "fail"
    assert nostop_run["stop"]["raw_exit_status"] == "timeout"
    assert nostop_run["stop"]["reason"].startswith("stop_timeout")

    def delta(snap_key: str, *path: str) -> int:
        def dig(s: dict[str, Any]) -> int:
            for p in path:
                s = s.get(p, {})
            return int(s) if isinstance(s, int) else 0

        return dig(after[snap_key]) - dig(before[snap_key])

    def folded() -> dict[str, Any] | None:  # decode errors are folded in every 0.25 s
        now = d.view.health()["counters"]
        n = sum(now["decode_errors"].values()) - sum(before["decode_errors"].values())
        return now if n >= 5 else None

    after = wait_for(folded, "the decode errors to be counted", DEADLINE_S)
    assert delta("decode_errors", "bad_framing") == 1
    assert delta("decode_errors", "unknown_document") == 1
    assert delta("decode_errors", "forbidden_global") == 2
    assert delta("decode_errors", "msgpack_invalid") == 1
    assert delta("rejected_by_stage", "assembly", "malformed_document") == 2
    assert delta("rejected_by_stage", "assembly", "unknown_run") == 1
    assert delta("rejected_by_stage", "assembly", "missing_stop") == 1
    assert delta("rejected_by_stage", "assembly", "nan_data") == 1
    assert delta("rejected_by_stage", "analysis", "no_model") == 1
    assert delta("rejected_by_stage", "analysis", "unknown_element") == 1
    assert after["spectra_analysed"] - before["spectra_analysed"] == 2
    assert after["runs_closed"]["timeout"] >= 1
    assert d.view.ready and d.view.health()["internal_errors"] == 0


def test_metrics_and_health_endpoints(harness: Harness) -> None:
    d = harness.daemon
    uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID, seed=4))
    publish(harness.pub, docs)
    harness.results.wait([uid])
    wait_for(lambda: d.view.store_stats().get("stored", 0) >= 1, "the store to commit a row")
    status, body = get(f"{d.http_url}/health")
    assert status == 200
    health = json.loads(body)
    snap = d.counters.snapshot()
    assert health["ready"] is True and health["serving"] is True and health["uptime_s"] > 0
    assert health["counters"]["spectra_analysed"] == snap["spectra_analysed"] >= 1
    assert health["models"][0]["element"] == "Cu" and health["models"][0]["edge"] == "K"
    assert health["queue_depth"] == 0
    assert health["input"]["decode_errors"] == sum(snap["decode_errors"].values())
    assert health["store"]["stored"] >= 1
    reg = health["registry"]
    assert [m["bundle_id"] for m in reg["serving"]] == [health["models"][0]["bundle_id"]]
    assert reg["standby"] == {} and reg["refusals_by_reason"] == {}
    assert (reg["require_digest"], reg["require_signature"], reg["trusted_keys"]) == (
        True,
        False,
        0,
    )
    # the catalog holds every row and the gate every document it was given: the gauges of
    # what waits are 0, exported as the store and the gate count them
    assert d.parts.store is not None and d.parts.store.flush(timeout=30)
    wait_for(lambda: d.view.output_stats()["after_store.held"] == 0, "the gate to empty")
    status, body = get(f"{d.http_url}/metrics")
    assert status == 200
    text = body.decode()
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(lines["xasflow_spectra_analysed_total"]) == snap["spectra_analysed"]
    assert float(lines["xasflow_spectra_received_total"]) == snap["spectra_received"]
    bundle = d.view.models()[0]["bundle_id"]
    assert lines[f'xasflow_model_info{{bundle_id="{bundle}",edge="K",element="Cu"}}'] == "1.0"
    assert float(lines["xasflow_queue_depth"]) == 0.0
    assert float(lines["xasflow_latency_seconds_count"]) == snap["latency"]["count"]
    assert float(lines['xasflow_input_dropped_total{cause="overflow"}']) == 0.0
    assert float(lines['xasflow_store_rows_total{outcome="stored"}']) >= 1
    assert float(lines['xasflow_store_rows_total{outcome="lost"}']) == 0.0
    for cause in ("publish_error", "held_at_close", "delivery_failure"):
        assert float(lines[f'xasflow_output_dropped_total{{cause="{cause}"}}']) == 0.0
    assert float(lines["xasflow_output_released_unstored_total"]) == 0.0
    assert float(lines["xasflow_store_journal_rows"]) == d.view.store_stats()["journal_rows"] == 0
    assert float(lines["xasflow_output_held"]) == d.view.output_stats()["after_store.held"] == 0
    assert float(lines["xasflow_up"]) == 1.0
    for what in ("processing", "run_start", "run_stop"):
        assert float(lines[f'xasflow_internal_errors_total{{what="{what}"}}']) == 0.0
    assert health["internal_errors"] == 0
    # every decode error and rejection the counters hold is exported with its labels
    for reason, n in snap["decode_errors"].items():
        assert float(lines[f'xasflow_decode_errors_total{{reason="{reason}"}}']) == n
    for stage, reasons in snap["rejected_by_stage"].items():
        for reason, n in reasons.items():
            key = f'xasflow_spectra_rejected_total{{reason="{reason}",stage="{stage}"}}'
            assert float(lines[key]) == n
    # and every known rejection reason and decode error is there from 0 (increase() in the
    # alert rules sees the first one)
    for stage, reason in known_rejections():
        key = f'xasflow_spectra_rejected_total{{reason="{reason}",stage="{stage}"}}'
        assert float(lines[key]) == snap["rejected_by_stage"].get(stage, {}).get(reason, 0)
    for reason in DECODE_ERROR_REASONS:
        key = f'xasflow_decode_errors_total{{reason="{reason}"}}'
        assert float(lines[key]) == snap["decode_errors"].get(reason, 0)
    assert get(f"{d.http_url}/nothing")[0] == 404


def test_an_internal_error_is_on_metrics(harness: Harness) -> None:
    """Unexpected errors (bugs) are exported as ``xasflow_internal_errors_total`` by what they
    cost, every kind from 0, for an alert to see: a document the processing loop dropped
    (counted by ``Processor``) and a run's start or stop the pipeline failed on; /health's
    ``internal_errors`` is their sum. Before, only /health said so."""
    d = harness.daemon
    proc = d.parts.processor
    assert proc is not None
    counters = proc.counters
    before = dict(counters.internal_errors)
    counters.internal_error("processing")  # as Processor.run counts a turn that raised
    counters.internal_error("run_stop", 2)  # as Pipeline._closed counts a stop it failed on
    try:
        text = get(f"{d.http_url}/metrics")[1].decode()
        found = sorted(
            ln for ln in text.splitlines() if ln.startswith("xasflow_internal_errors_total")
        )
        assert found == [
            f'xasflow_internal_errors_total{{what="processing"}} {float(before["processing"] + 1)}',
            f'xasflow_internal_errors_total{{what="run_start"}} {float(before["run_start"])}',
            f'xasflow_internal_errors_total{{what="run_stop"}} {float(before["run_stop"] + 2)}',
        ]
        assert proc.internal_errors == before["processing"] + 1
        health = json.loads(get(f"{d.http_url}/health")[1])
        assert health["internal_errors"] == sum(before.values()) + 3
        assert health["counters"]["internal_errors"]["run_stop"] == before["run_stop"] + 2
    finally:
        counters.internal_errors.update(before)


def test_lost_events_are_visible_in_the_stop_health_and_metrics(harness: Harness) -> None:
    """A step scan whose 5th event never arrives: the analysis stop says "partial" (exit
    status fail, the count), /health and /metrics count the loss by cause (issue 13)."""
    d = harness.daemon
    uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID, seed=5))
    events = [i for i, (name, _) in enumerate(docs) if name == "event"]
    del docs[events[4]]
    publish(harness.pub, docs)
    stop = harness.results.wait([uid])[uid]["stop"]
    assert stop["exit_status"] == "fail" and stop["partial"] is True
    assert stop["raw_missing_events"] == 1 and stop["reason"].startswith("partial: 1 raw event")
    health = json.loads(get(f"{d.http_url}/health")[1])
    assert health["events_lost"]["seq_gap"] >= 1 and health["events_lost"]["total"] >= 1
    text = get(f"{d.http_url}/metrics")[1].decode()
    pairs = [x.rsplit(" ", 1) for x in text.splitlines() if x and not x.startswith("#")]
    assert float(dict(pairs)['xasflow_events_lost_total{cause="seq_gap"}']) >= 1
