"""The analysis pipeline's predictions: assembled spectra -> predictions -> valid analysis runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("event_model")

from event_model import compose_run
from helpers import raw_uids
from pipeline_helpers import (
    T0,
    Clock,
    channels,
    closed,
    events,
    only,
    opened,
    redeploy,
    scan,
    validate,
)

from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.counters import Counters, register_prometheus
from xasflow.daemon.documents import CODE_VERSION
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.predictor import OUT_OF_DOMAIN, Predictor
from xasflow.spectra import Spectrum


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
