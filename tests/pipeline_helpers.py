"""What the pipeline and registry tests share: synthetic Cu scans (a sample and a foil) as
assembled spectra and as a raw fly run's documents, a run's opening and closing, the events
of its documents (validated, and the one document of a name), a bundle redeployed under a new
id, and a clock that stands still."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from helpers import unpaged
from synthetic_feff import model_mu

from xasflow.daemon.assembly import RunClosed, RunOpened, ScanSpectrum, SpectrumReady
from xasflow.models.bundle import read_manifest
from xasflow.models.bundle_write import write_bundle
from xasflow.spectra import edge_energy

T0 = 1_700_000_000.0  # event time of every hand-made spectrum (epoch s)


# name: (edge shift from 8980 eV, white-line height, width, NN distance, expected CN)
KINDS = {
    "Cu2O": (0.0, 0.6, 3.0, 4.27 * np.sqrt(3) / 4, 2),
    "CuCl": (1.5, 1.0, 4.0, 5.41 * np.sqrt(3) / 4, 4),
    "CuO": (4.0, 1.6, 6.0, 4.20 * 0.5, 6),
}


def redeploy(src: Path, dest: Path, bundle_id: str) -> Path:
    """Write a copy of bundle ``src`` at ``dest`` under a new bundle id (atomically)."""
    manifest = read_manifest(src).model_copy(update={"bundle_id": bundle_id})
    files = {name: (src / name).read_bytes() for name in manifest.files}
    return write_bundle(dest, manifest, files)


def channels(
    kind: str,
    *,
    offset: float = 0.0,
    lo: float = 8940.0,
    hi: float = 9120.0,
    n: int = 600,
    reference: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Measured energy and I0/It(/Ir) of a synthetic sample and a Cu foil.

    The monochromator reads ``offset`` eV low: the true energy is ``energy + offset``, so
    reference-foil alignment must find a shift of ``+offset``.
    """
    shift, height, width, nn, _ = KINDS[kind]
    true = np.linspace(lo, hi, n)
    mu_sample = model_mu(true, 8980.0 + shift, height, width, nn)
    mu_foil = model_mu(true, edge_energy("Cu"), 0.0, 1.0, 2.55)
    i0 = 1.0e5 * (1.0 + 0.02 * np.sin(true / 25.0))
    it = i0 * np.exp(-(0.3 + mu_sample))
    chans = {"i0": i0, "it": it}
    if reference:
        chans["ir"] = it * np.exp(-(0.2 + 0.8 * mu_foil))
    return true - offset, chans


def scan(
    raw_uid: str,
    index: int,
    kind: str = "CuCl",
    *,
    element: str | None = "Cu",
    edge: str | None = "K",
    mode: str = "transmission",
    flags: tuple[str, ...] = (),
    energy: np.ndarray | None = None,
    chans: dict[str, np.ndarray] | None = None,
    **kw: Any,
) -> SpectrumReady:
    if energy is None or chans is None:
        energy, chans = channels(kind, **kw)
    return SpectrumReady(
        ScanSpectrum(
            raw_uid=raw_uid,
            index=index,
            energy=energy,
            channels=chans,
            element=element,
            edge=edge,
            mode=mode,
            seq_nums=(index + 1,),
            event_time=T0,
            received=0.0,
            flags=flags,
        )
    )


def opened(raw_uid: str, kind: str = "fly", **md: Any) -> RunOpened:
    return RunOpened(raw_uid, {"uid": raw_uid, "time": T0, "scan_id": 7, **md}, kind)


def events(docs: list[tuple[str, dict]]) -> list[dict[str, Any]]:
    return [d["data"] for n, d in unpaged(docs) if n == "event"]


class Clock:
    """A wall clock that reads ``t``."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def closed(raw_uid: str, status: str = "success", reason: str = "", n: int = 1) -> RunClosed:
    return RunClosed(raw_uid, status, reason, n, 0, 0)  # type: ignore[arg-type]


def validate(docs: list[tuple[str, dict]]) -> None:
    from event_model import DocumentNames, schema_validators

    from xasflow.daemon.analysis_rows import DATA_KEYS

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


def rows_by_run(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Each analysis run's events as (index, status, reason), by raw uid."""
    raw_of_start: dict[str, str] = {}
    raw_of_descriptor: dict[str, str] = {}
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for name, doc in unpaged(docs):
        if name == "start":
            raw_of_start[doc["uid"]] = doc["raw_uid"]
        elif name == "descriptor":
            raw_of_descriptor[doc["uid"]] = raw_of_start[doc["run_start"]]
        elif name == "event":
            d = doc["data"]
            raw = raw_of_descriptor[doc["descriptor"]]
            rows.setdefault(raw, []).append((d["index"], d["status"], d["reason"]))
    return rows


def through_loop(pipeline: Any, counters: Any, *batches: list[Any]) -> list[tuple[str, dict]]:
    """Batches of assembly outputs through the processing loop (``Processor.analyse``, every
    batch ended at last); what it published."""
    from xasflow.daemon.assembly import RunAssembler
    from xasflow.daemon.config import AnalysisConfig
    from xasflow.daemon.processor import Processor

    proc = Processor(lambda timeout: None, RunAssembler(), pipeline, counters, AnalysisConfig())
    published: list[tuple[str, dict[str, Any]]] = []
    proc.outlet.sinks.append(lambda name, doc: published.append((name, doc)))
    for outputs in batches:
        proc.outlet.analyse(outputs)
    proc.outlet.complete(0)
    return published


def fly_run(n: int) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """A raw fly run of ``n`` synthetic Cu K transmission spectra (one event each)."""
    from event_model import compose_run

    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    energy, chans = channels("CuCl")
    data = {"energy": energy, "I0": chans["i0"], "It": chans["it"], "Ir": chans["ir"]}
    keys = {k: {"source": "sim", "dtype": "array", "shape": [len(energy)]} for k in data}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: list[tuple[str, dict[str, Any]]] = [
        ("start", run.start_doc),
        ("descriptor", desc.descriptor_doc),
    ]
    stamps = dict.fromkeys(data, 0.0)
    for _ in range(n):
        docs.append(("event", desc.compose_event(data=data, timestamps=stamps, validate=False)))
    docs.append(("stop", run.compose_stop()))
    return run.start_doc["uid"], docs


def two_runs(pipeline: Any, counters: Any) -> list[tuple[str, dict]]:
    """One micro-batch of two runs (raw-a: 3 spectra, raw-b: 2) through the processing loop;
    what it published."""
    outputs = [
        opened("raw-a"),
        opened("raw-b"),
        *(scan("raw-a", i, "CuCl") for i in range(3)),
        *(scan("raw-b", i, "CuCl") for i in range(2)),
        closed("raw-a", n=3),
        closed("raw-b", n=2),
    ]
    return through_loop(pipeline, counters, outputs)


def assert_a1_refused_alone(
    docs: list[tuple[str, dict[str, Any]]], snap: dict[str, Any], detail: str
) -> None:
    """:func:`two_runs`' documents and counts when a bug hit raw-a's spectrum 1 alone: that
    one refused ``internal_error`` with ``detail``, the other four analysed, both runs stopped
    as successes."""
    validate(docs)
    assert rows_by_run(docs) == {
        "raw-a": [(0, "ok", ""), (1, "rejected", "internal_error"), (2, "ok", "")],
        "raw-b": [(0, "ok", ""), (1, "ok", "")],
    }
    (row,) = [d["data"] for n, d in unpaged(docs) if n == "event" and d["data"]["reason"]]
    assert row["detail"] == detail
    stops = [d for n, d in docs if n == "stop"]
    assert [(s["exit_status"], s["n_analysed"], s["n_rejected"]) for s in stops] == [
        ("success", 2, 1),
        ("success", 2, 0),
    ]
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 4)
    assert snap["rejected_by_stage"]["analysis"] == {"internal_error": 1}
