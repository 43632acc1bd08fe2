"""The analysis pipeline: assembly outputs -> predictions -> valid analysis-run documents."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("event_model")

from event_model import DocumentNames, compose_run, schema_validators
from helpers import raw_uids
from pipeline_helpers import KINDS, T0, channels, events, opened, redeploy, scan

from xasflow.daemon.assembly import Rejected, RunAssembler, RunClosed
from xasflow.daemon.counters import Counters, register_prometheus
from xasflow.daemon.documents import CODE_VERSION, DATA_KEYS
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.predictor import OUT_OF_DOMAIN, Predictor
from xasflow.spectra import Spectrum

# --------------------------------------------------------------------------- bundle


@pytest.fixture(scope="module")
def bundle(tiny_cu_bundle: Path) -> Path:
    return tiny_cu_bundle


@pytest.fixture
def model_dir(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "models" / "cu-k")
    return tmp_path / "models"


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def registry(model_dir: Path, counters: Counters) -> ModelRegistry:
    return ModelRegistry(model_dir, counters)


class Clock:
    """A wall clock that reads ``t``."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def pipeline(registry: ModelRegistry, counters: Counters) -> Pipeline:
    return Pipeline(registry, counters, validate=True, clock=Clock(T0 + 0.004))


# --------------------------------------------------------------------------- spectra


def closed(raw_uid: str, status: str = "success", reason: str = "", n: int = 1) -> RunClosed:
    return RunClosed(raw_uid, status, reason, n, 0, 0)  # type: ignore[arg-type]


def validate(docs: list[tuple[str, dict]]) -> None:
    names = {
        "start": DocumentNames.start,
        "descriptor": DocumentNames.descriptor,
        "event": DocumentNames.event,
        "event_page": DocumentNames.event_page,
        "stop": DocumentNames.stop,
    }
    for name, doc in docs:
        schema_validators[names[name]].validate(doc)
        if name in ("event", "event_page"):
            assert set(doc["data"]) == set(DATA_KEYS) == set(doc["timestamps"])
    # the stream is a well-formed run: start, descriptor, events, stop
    json.dumps([d for _, d in docs])  # plain data, publishable as JSON / msgpack


def only(docs: list[tuple[str, dict]], name: str) -> dict[str, Any]:
    (doc,) = [d for n, d in docs if n == name]
    return doc


# --------------------------------------------------------------------------- tests


def science_flags(row: dict) -> list[str]:
    """A row's flags but the out-of-domain one: the tiny test bundle sets its out-of-domain
    threshold on a few dozen synthetic spectra, so these hand-made scans may exceed it."""
    return [f for f in row["flags"].split(",") if f and f != OUT_OF_DOMAIN]


def test_predictions_alignment_and_documents(
    pipeline: Pipeline, registry: ModelRegistry, counters: Counters
) -> None:
    bundle_id = registry.get("Cu", "K").bundle_id  # type: ignore[union-attr]
    docs = pipeline.handle_batch(
        [
            opened("raw-1", plan_name="fly_xas"),
            scan("raw-1", 0, "CuCl", offset=3.0),
            scan("raw-1", 1, "CuO", offset=3.0),
            scan("raw-1", 2, "Cu2O", offset=3.0),
            closed("raw-1", n=3),
        ]
    )
    # one batch: its three spectra leave as one event page (one routing, one bus message)
    assert [n for n, _ in docs] == ["start", "descriptor", "event_page", "stop"]
    assert only(docs, "event_page")["seq_num"] == [1, 2, 3]
    validate(docs)
    start = only(docs, "start")
    assert start["raw_uid"] == "raw-1" and start["analysis"] == "xasflow"
    assert (start["element"], start["edge"], start["bundle_id"]) == ("Cu", "K", bundle_id)
    assert start["code_version"] == CODE_VERSION and start["raw_scan_id"] == 7
    assert start["raw_plan_name"] == "fly_xas" and start["scan_kind"] == "fly"
    desc = only(docs, "descriptor")
    assert desc["run_start"] == start["uid"] and desc["name"] == "primary"
    assert desc["data_keys"]["cn"]["dtype"] == "integer"
    assert desc["data_keys"]["distance"]["units"] == "angstrom"

    tet, octa, lin = events(docs)
    assert [e["cn"] for e in (tet, octa, lin)] == [4, 6, 2]
    assert [e["index"] for e in (tet, octa, lin)] == [0, 1, 2]
    assert all(e["status"] == "ok" and e["reason"] == "" for e in (tet, octa, lin))
    assert tet["motif"] == "CN4-tetrahedral" and octa["motif"] == "CN6-octahedral"
    assert json.loads(tet["motif_ranking"])[0][0] == "CN4-tetrahedral"
    probs = json.loads(tet["cn_probabilities"])
    assert set(probs) == {"2", "4", "6"} and tet["cn_probability"] == max(probs.values())
    assert tet["cn_probability"] > 0.9
    assert tet["valence"] == 1 and octa["valence"] == 2
    assert 2.2 < tet["distance"] < 2.45 and 2.0 < octa["distance"] < 2.2
    assert tet["bundle_id"] == bundle_id and science_flags(tet) == []
    # the foil edge sits 3 eV low on the measured axis: alignment shifts it back
    for e in (tet, octa, lin):
        assert e["energy_shift"] == pytest.approx(3.0, abs=0.05)
        assert e["latency_ms"] == pytest.approx(4.0, abs=1e-3)
    # E0 on the aligned axis is where the synthetic sample's edge really is
    energy, ch = channels("CuCl", offset=3.0)
    sample = Spectrum(energy, np.log(ch["i0"] / ch["it"]), "Cu", "K")
    unaligned = registry.get("Cu", "K").predict(sample)  # type: ignore[union-attr]
    assert tet["e0"] == pytest.approx(unaligned.e0 + 3.0, abs=0.05)
    assert tet["edge_step"] == pytest.approx(unaligned.edge_step, rel=1e-6)

    stop = only(docs, "stop")
    assert stop["run_start"] == start["uid"] and stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 3}
    assert stop["bundle_ids"] == [bundle_id] and stop["n_analysed"] == 3
    assert stop["n_rejected"] == 0 and stop["raw_exit_status"] == "success"
    assert pipeline.open_runs == []
    assert set(raw_uids(docs)) == {"raw-1"}  # every document names its raw run

    snap = counters.snapshot()
    assert snap["spectra_received"] == 3 and snap["spectra_analysed"] == 3
    assert snap["spectra_rejected"] == 0
    assert snap["runs_opened"] == 1 and snap["runs_closed"] == {"success": 1}
    assert snap["latency"]["count"] == 3 and snap["latency"]["p99_ms"] == pytest.approx(
        4.0, abs=1e-3
    )
    assert snap["models"] == {"Cu-K": bundle_id}


def test_alignment_is_best_effort_and_flagged(pipeline: Pipeline, registry: ModelRegistry) -> None:
    energy, flat = channels("CuCl", offset=2.0)
    flat["ir"] = flat["it"] * 0.5  # a reference channel without any edge
    docs = pipeline.handle_batch(
        [
            opened("raw-a"),
            scan("raw-a", 0, offset=2.0, reference=False),
            scan("raw-a", 1, energy=energy, chans=flat),
            scan("raw-a", 2, offset=30.0),  # beyond max_shift (20 eV)
            scan("raw-a", 3, offset=-4.0, flags=("seq_gap",)),
            closed("raw-a"),
        ]
    )
    validate(docs)
    rows = events(docs)
    assert [science_flags(r) for r in rows] == [
        ["no_reference"],
        ["align_failed"],
        ["align_out_of_range"],
        ["seq_gap"],
    ]
    assert [r["energy_shift"] for r in rows[:3]] == [None, None, None]
    assert rows[3]["energy_shift"] == pytest.approx(-4.0, abs=0.05)
    # the model works relative to E0, so unaligned spectra are still analysed correctly
    assert [r["cn"] for r in rows] == [4, 4, 4, 4]
    assert rows[0]["e0"] == pytest.approx(rows[3]["e0"] - 2.0, abs=0.1)

    no_align = Pipeline(registry, Counters(), align=False, clock=Clock(T0))
    (row,) = events(no_align.handle_batch([scan("raw-b", 0, offset=5.0)]))
    assert science_flags(row) == [] and row["energy_shift"] is None and row["cn"] == 4


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


def test_batch_predicts_once_per_predictor_and_equals_single(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["CuCl", "CuO", "Cu2O"] * 7
    outs = [scan("raw-b", i, k, offset=0.5 * (i % 5)) for i, k in enumerate(kinds)]
    single = Pipeline(registry, Counters(), clock=Clock(T0))
    one_by_one = [d for o in [opened("raw-b"), *outs] for d in single.handle(o)]

    calls: list[int] = []
    real = Predictor.predict_prepared

    def counting(self: Predictor, prepared: list) -> list:
        calls.append(len(prepared))
        return real(self, prepared)

    monkeypatch.setattr(Predictor, "predict_prepared", counting)
    batched = Pipeline(registry, Counters(), clock=Clock(T0)).handle_batch([opened("raw-b"), *outs])
    # one call for the whole batch; at most one more of one row: the run's HERFD check, made
    # at its first out-of-domain spectrum (tests/test_herfd_hint.py)
    assert calls[0] == len(kinds) and calls[1:] in ([], [1])
    skip = {"latency_ms"}
    a = [{k: v for k, v in r.items() if k not in skip} for r in events(one_by_one)]
    b = [{k: v for k, v in r.items() if k not in skip} for r in events(batched)]
    # equal answers; numbers equal to float32 rounding (a network's batched matrix products
    # sum in another order than one row at a time)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-6), key
            elif key == "cn_probabilities":
                assert json.loads(vb) == pytest.approx(json.loads(va), rel=1e-5, abs=1e-6)
            elif key == "motif_ranking":
                pa, pb = json.loads(va), json.loads(vb)
                assert [label for label, _ in pa] == [label for label, _ in pb]
                assert [v for _, v in pb] == pytest.approx([v for _, v in pa], rel=1e-5, abs=1e-6)
            else:
                assert va == vb, key
    assert [r["cn"] for r in b] == [KINDS[k][4] for k in kinds]


def test_swapped_bundle_is_used_for_later_spectra(
    pipeline: Pipeline, registry: ModelRegistry, model_dir: Path, counters: Counters
) -> None:
    old = registry.get("Cu", "K").bundle_id  # type: ignore[union-attr]
    first = pipeline.handle_batch([opened("raw-s"), scan("raw-s", 0)])
    redeploy(model_dir / "cu-k", model_dir / "cu-k", "cu-k-retrained")
    assert [e.kind for e in registry.refresh()] == ["swapped"]
    rest = pipeline.handle_batch([scan("raw-s", 1), closed("raw-s", n=2)])
    docs = first + rest
    validate(docs)
    assert [r["bundle_id"] for r in events(docs)] == [old, "cu-k-retrained"]
    assert only(docs, "start")["bundle_id"] == old
    assert only(docs, "stop")["bundle_ids"] == [old, "cu-k-retrained"]
    assert counters.snapshot()["model_swaps"] == 1


def _docs_step(md: dict[str, Any]) -> list[tuple[str, dict]]:
    """A step scan over the CuCl sample, as a RunEngine would emit it (plus a baseline)."""
    energy, ch = channels("CuCl", offset=1.0, n=181)
    run = compose_run(metadata=md)
    keys = {
        k: {"source": "sim", "dtype": "number", "shape": []} for k in ("energy", "I0", "It", "Ir")
    }
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    base = run.compose_descriptor(
        name="baseline",
        data_keys={"ring_current": {"source": "sim", "dtype": "number", "shape": []}},
    )
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    docs.append(("descriptor", base.descriptor_doc))
    docs.append(
        ("event", base.compose_event(data={"ring_current": 400.0}, timestamps={"ring_current": T0}))
    )
    for i, e in enumerate(energy):
        data = {"energy": e, "I0": ch["i0"][i], "It": ch["it"][i], "Ir": ch["ir"][i]}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, T0))))
    docs.append(("stop", run.compose_stop()))
    return docs


def _docs_fly(kinds: list[str], nan_event: bool = False) -> list[tuple[str, dict]]:
    """A quick-XAS fly scan: one whole spectrum per event (up/down sweeps), I0/It/Ir arrays."""
    n = 800
    run = compose_run(metadata={"plan_name": "fly_xas", "scan_id": 11})
    keys = {
        k: {"source": "sim", "dtype": "array", "shape": [n]} for k in ("energy", "I0", "It", "Ir")
    }
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for k, kind in enumerate(kinds):
        energy, ch = channels(kind, offset=-2.0, n=n)
        arrays = {"energy": energy, "I0": ch["i0"], "It": ch["it"], "Ir": ch["ir"]}
        if k % 2:
            arrays = {name: a[::-1] for name, a in arrays.items()}  # down sweep
        data = {name: a.tolist() for name, a in arrays.items()}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, T0))))
    if nan_event:
        data = {name: [float("nan")] * n for name in keys}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, T0))))
    docs.append(("stop", run.compose_stop()))
    return docs


def test_real_assembler_step_and_fly(pipeline: Pipeline, counters: Counters) -> None:
    asm = RunAssembler()
    step = _docs_step({"element": "Cu", "edge": "K", "plan_name": "list_scan", "scan_id": 10})
    fly = _docs_fly(["CuCl", "CuO", "Cu2O"], nan_event=True)
    # the two runs interleave on the bus
    stream = [doc for pair in zip(step, fly, strict=False) for doc in pair]
    stream += step[len(fly) :] if len(step) > len(fly) else fly[len(step) :]
    docs: list[tuple[str, dict]] = []
    for name, doc in stream:
        docs.extend(pipeline.handle_batch(asm.feed(name, doc)))
    validate(docs)
    by_raw: dict[str, list[tuple[str, dict]]] = {}
    for raw, (name, doc) in zip(raw_uids(docs), docs, strict=True):
        assert raw is not None
        by_raw.setdefault(raw, []).append((name, doc))
    step_uid, fly_uid = step[0][1]["uid"], fly[0][1]["uid"]
    assert set(by_raw) == {step_uid, fly_uid}

    s = by_raw[step_uid]
    assert [n for n, _ in s] == ["start", "descriptor", "event", "stop"]
    (row,) = events(s)
    assert (row["cn"], row["index"], row["status"], row["element"]) == (4, 0, "ok", "Cu")
    assert row["energy_shift"] == pytest.approx(1.0, abs=0.1)
    assert only(s, "start")["scan_kind"] == "step" and only(s, "start")["raw_scan_id"] == 10

    f = by_raw[fly_uid]
    rows = events(f)
    assert [(r["index"], r["status"], r["reason"], r["cn"]) for r in rows] == [
        (0, "ok", "", 4),
        (1, "ok", "", 6),
        (2, "ok", "", 2),
        (3, "rejected", "nan_data", None),
    ]
    # no element in the fly scan's start: inferred from the energy range
    assert all("element_inferred" in r["flags"] for r in rows[:3])
    assert all(r["energy_shift"] == pytest.approx(-2.0, abs=0.1) for r in rows[:3])
    assert only(f, "start")["element"] == "Cu" and only(f, "start")["scan_kind"] == "fly"
    assert only(f, "stop")["num_events"] == {"primary": 4}

    snap = counters.snapshot()
    assert snap["spectra_received"] == 4 and snap["spectra_analysed"] == 4
    assert snap["rejected_by_stage"] == {"assembly": {"nan_data": 1}}
    assert snap["runs_opened"] == 2 and snap["runs_closed"] == {"success": 2}


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


def test_uncertainty_and_out_of_domain_reach_the_documents_and_counters(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conformal sets, intervals and the out-of-domain flag are typed data keys; an
    out-of-domain answer is counted (and in /metrics); a bundle without them gives None."""
    from prometheus_client import CollectorRegistry, generate_latest

    real = Predictor.predict_prepared

    def doubtful(self: Predictor, prepared: list) -> list:
        out = []
        for i, p in enumerate(real(self, prepared)):
            res = dict(p.results)
            res["cn"] = dataclasses.replace(res["cn"], prediction_set=[4.0, 6.0])
            if "distance" in res:
                res["distance"] = dataclasses.replace(res["distance"], interval=(1.9, 2.05))
            kept = [f for f in p.flags if f != OUT_OF_DOMAIN]
            flags = [*kept, OUT_OF_DOMAIN] if i == 1 else kept
            out.append(dataclasses.replace(p, results=res, flags=flags, ood_score=0.5 + 9 * i))
        return out

    plain = pipeline.handle_batch([opened("raw-u"), scan("raw-u", 0)])
    (row,) = events(plain)
    # the calibrated bundle fills them: the answer lies in its set and inside its interval
    assert str(row["cn"]) in row["cn_set"].split(",")
    # ... but the tiny bundle's distance calibration had too few rows for a finite bound:
    # its ends are null, not the -1e6 / +1e6 that stand for infinity in its manifest
    assert row["distance"] is not None and (row["distance_lo"], row["distance_hi"]) == (None, None)
    assert isinstance(row["ood_score"], float)
    assert row["out_of_domain"] is (OUT_OF_DOMAIN in row["flags"].split(","))
    before = counters.out_of_domain
    monkeypatch.setattr(Predictor, "predict_prepared", doubtful)
    docs = pipeline.handle_batch([scan("raw-u", 1), scan("raw-u", 2, "CuO"), closed("raw-u", n=3)])
    validate(plain + docs)
    inside, outside = events(docs)
    assert inside["cn_set"] == "4,6" and inside["out_of_domain"] is False
    assert inside["ood_score"] == pytest.approx(0.5)
    assert inside["distance"] is not None  # the tiny bundle has a distance regressor
    assert (inside["distance_lo"], inside["distance_hi"]) == (1.9, 2.05)
    assert outside["out_of_domain"] is True and OUT_OF_DOMAIN in outside["flags"].split(",")
    assert outside["ood_score"] == pytest.approx(9.5) and outside["status"] == "ok"
    # the run's count holds the first spectrum too when the tiny bundle flagged it
    assert only(docs, "stop")["n_out_of_domain"] == 1 + int(row["out_of_domain"])
    assert counters.snapshot()["out_of_domain"] == before + 1 == counters.out_of_domain
    reg = CollectorRegistry()
    register_prometheus(counters, reg)
    total = f"xasflow_spectra_out_of_domain_total {before + 1:.1f}"
    assert total in generate_latest(reg).decode()


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


def test_herfd_from_the_start_document_or_config_reaches_prepare(
    registry: ModelRegistry, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start document's ``herfd`` (true: the tabulated width, a number: that FWHM) reaches
    ``prepare``, which broadens the spectrum (flagged ``herfd_broadened``); without the key
    the pipeline's setting (``analysis.herfd``) applies; a value that is no width is rejected
    ``bad_broadening`` and counted."""
    from xasflow.daemon.pipeline import REASONS
    from xasflow.spectra import herfd_fwhm

    assert {"edge_step", "herfd_width", "bad_broadening"} <= REASONS
    # the widths reach the spectra whichever path prepares them (one by one or as a stack)
    import xasflow.spectra.process as herfd_module  # where prepare() looks the width up

    seen: list[Any] = []
    real = herfd_module.herfd_width

    def recording(spectrum: Spectrum, *args: Any, **kwargs: Any) -> Any:
        width = real(spectrum, *args, **kwargs)
        seen.append((spectrum.meta.get("herfd"), width))
        return width

    monkeypatch.setattr(herfd_module, "herfd_width", recording)
    # the undeclared-HERFD check broadens on its own (tests/test_herfd_hint.py): left out here
    monkeypatch.setattr(Predictor, "with_herfd_hint", lambda self, spectrum, pred: pred)
    pipeline = Pipeline(registry, counters, clock=Clock(T0 + 0.004))
    docs = pipeline.handle_batch(
        [
            opened("raw-h1", herfd=1.5),
            scan("raw-h1", 0, "Cu2O"),
            closed("raw-h1"),
            opened("raw-h2", herfd=True),
            scan("raw-h2", 0, "Cu2O"),
            opened("raw-h3"),
            scan("raw-h3", 0, "Cu2O"),
            opened("raw-h4", herfd="yes"),
            scan("raw-h4", 0, "Cu2O"),
        ]
    )
    declared = [entry for entry in seen if entry[0] is not None]
    assert declared == [(1.5, 1.5), (True, pytest.approx(herfd_fwhm("Cu", "K")))]
    assert all(width is None for herfd, width in seen if herfd is None)
    h1, h2, h3, h4 = events(docs)
    assert "herfd_broadened" in h1["flags"] and "herfd_broadened" in h2["flags"]
    assert "herfd_broadened" not in h3["flags"]
    assert h1["e0"] != h3["e0"]  # the broadened edge is found elsewhere
    assert (h4["status"], h4["reason"]) == ("rejected", "bad_broadening")
    assert "'yes'" in h4["detail"]
    assert counters.snapshot()["rejected_by_stage"]["analysis"] == {"bad_broadening": 1}
    assert "raw-h1" not in pipeline._declared  # forgotten with its run
    # analysis.herfd: the default for runs that do not say; a start's false switches it off
    seen.clear()
    configured = Pipeline(registry, counters, clock=Clock(T0 + 0.004), herfd=2.0)
    configured.handle_batch(
        [
            opened("raw-c1"),
            scan("raw-c1", 0, "Cu2O"),
            opened("raw-c2", herfd=False),
            scan("raw-c2", 0, "Cu2O"),
            opened("raw-c3", herfd=None),  # a metadata template's null: nothing declared
            scan("raw-c3", 0, "Cu2O"),
            opened("raw-c4", herfd="False"),  # text, as templates often hold it
            scan("raw-c4", 0, "Cu2O"),
        ]
    )
    # the configured width (also where the start says null), none where it says false
    assert [entry for entry in seen if entry[0] is not None] == [(2.0, 2.0), (2.0, 2.0)]
    assert all(width is None for herfd, width in seen if herfd is None)


def test_a_reopened_runs_herfd_survives_batches_in_flight(
    registry: ModelRegistry, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches begun before the last one ended (as with a preparation process): a run closed
    in one and reopened under its uid with ``herfd`` in the next keeps that declaration for
    its later batches (it was dropped when the first batch ended after the second began)."""
    monkeypatch.setattr(Predictor, "with_herfd_hint", lambda self, spectrum, pred: pred)
    pipeline = Pipeline(registry, counters, clock=Clock(T0 + 0.004))
    first = pipeline.begin([opened("raw-r"), scan("raw-r", 0, "Cu2O"), closed("raw-r")])
    second = pipeline.begin([opened("raw-r", herfd=1.5), scan("raw-r", 0, "Cu2O")])
    docs = pipeline.end(first) + pipeline.end(second)
    docs += pipeline.handle_batch([scan("raw-r", 1, "Cu2O"), closed("raw-r")])
    validate(docs)
    assert ["herfd_broadened" in row["flags"] for row in events(docs)] == [False, True, True]
    assert [d["exit_status"] for n, d in docs if n == "stop"] == ["success", "success"]
    assert "raw-r" not in pipeline._declared
    reopened = pipeline.begin([opened("raw-s", herfd=True), scan("raw-s", 0, "Cu2O")])
    pipeline.end(reopened)
    pipeline.close_all("shutdown")  # forgets the declarations of the runs it stops
    assert pipeline._declared == {}


def test_a_page_on_one_axis_is_prepared_as_one_stack_and_equals_single(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spectra sharing an energy axis go through ``prepare_batch`` once; every row, bad ones
    included, ends as it does alone (reason, flags, shift, E0, step, answer)."""
    from xasflow.daemon import stack_job

    axis = np.linspace(8940.0, 9120.0, 600)
    kinds = ["CuCl", "CuO", "Cu2O"] * 4
    outs = []
    for i, k in enumerate(kinds):
        o = 0.5 * (i % 5)
        _, ch = channels(k, offset=o, lo=8940.0 + o, hi=9120.0 + o)
        if i == 4:  # a NaN in a channel: rejected before the stack
            ch["it"] = ch["it"].copy()
            ch["it"][7] = np.nan
        elif i == 5:  # no foil: analysed unaligned
            del ch["ir"]
        elif i == 6:  # a broken foil channel: alignment fails, analysed unaligned
            ch["ir"] = -ch["ir"]
        elif i == 7:  # mu never rises: rejected by the preparation, inside the stack
            ch["it"] = 0.5 * ch["i0"]
        outs.append(scan("raw-p", i, k, energy=axis, chans=ch))
    stacks: list[int] = []
    real = stack_job.prepare_batch

    def counting(energy: np.ndarray, mu: np.ndarray, *a: Any, **kw: Any) -> list:
        stacks.append(len(mu))
        return real(energy, mu, *a, **kw)

    monkeypatch.setattr(stack_job, "prepare_batch", counting)
    batched = Pipeline(registry, Counters(), clock=Clock(T0)).handle_batch([opened("raw-p"), *outs])
    assert stacks == [len(kinds) - 1]
    single = Pipeline(registry, Counters(), clock=Clock(T0))
    alone = [d for o in [opened("raw-p"), *outs] for d in single.handle(o)]
    assert stacks == [len(kinds) - 1]  # one by one: never stacked
    rows_b, rows_a = events(batched), events(alone)
    assert [r["reason"] for r in rows_b] == [r["reason"] for r in rows_a]
    assert [r["reason"] for r in rows_b][4:8] == ["not_finite", "", "", "no_edge"]

    def flags(r: dict) -> list[str]:
        return [f for f in r["flags"].split(",") if f and f != "out_of_domain"]

    assert [flags(r) for r in rows_b] == [flags(r) for r in rows_a]
    assert flags(rows_b[5]) == ["no_reference"] and flags(rows_b[6]) == ["align_failed"]
    for b, a in zip(rows_b, rows_a, strict=True):
        for key in ("e0", "edge_step", "energy_shift", "distance"):
            if a[key] is None or (isinstance(a[key], float) and math.isnan(a[key])):
                assert b[key] is None or math.isnan(b[key])
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
        assert (b["status"], b["cn"], b["motif"], b["valence"]) == (
            a["status"],
            a["cn"],
            a["motif"],
            a["valence"],
        )
    shifts = [r["energy_shift"] for i, r in enumerate(rows_b) if i not in (4, 5, 6, 7)]
    assert shifts == pytest.approx(
        [0.5 * (i % 5) for i in range(12) if i not in (4, 5, 6, 7)], abs=0.05
    )


def test_a_failing_hint_or_dashboard_copy_never_costs_the_batch_its_documents(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HERFD hint and the dashboard's copy of the latest spectrum run after the graphs
    and before the documents are built: either one raising left the batch's start, events
    and stop unbuilt (the run never opened on the bus)."""

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline.herfd_hints, "apply", broken)
    pipeline.on_latest = broken
    docs = pipeline.handle_batch(
        [opened("raw-h"), scan("raw-h", 0, "CuO"), scan("raw-h", 1, "Cu2O"), closed("raw-h", n=2)]
    )
    assert [n for n, _ in docs] == ["start", "descriptor", "event_page", "stop"]
    assert [e["status"] for e in events(docs)] == ["ok", "ok"]


def test_an_exafs_scan_without_an_element_is_read_by_the_edge_its_mu_jumps_at(
    pipeline: Pipeline,
) -> None:
    """A start naming no element: the element is the tabulated edge mu jumps across, not the
    one nearest a quarter of the range. An EXAFS scan 8786-11300 eV of Cu holds Cu K near its
    start and Hf L3 (9561 eV) nearer the quarter: before, it was taken for Hf L3 and refused
    no_model; now it is analysed as Cu K, flagged element_inferred."""
    from scan_helpers import step_scan, transmission

    energy = np.concatenate((np.arange(8786.0, 8960.0, 5.0), np.arange(8960.0, 9040.0, 0.5),
                             np.arange(9040.0, 11300.0, 5.0)))  # fmt: skip
    ch = transmission(energy, seed=7)
    _, docs = step_scan(energy, ch, {"element": None, "edge": None})
    asm = RunAssembler()
    out: list[tuple[str, dict]] = []
    for name, doc in docs:
        out.extend(pipeline.handle_batch(asm.feed(name, doc)))
    (row,) = events(out)
    assert (row["status"], row["reason"], row["element"]) == ("ok", "", "Cu"), row
    assert "element_inferred" in row["flags"]


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
