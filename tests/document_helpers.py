"""Analysis-run documents for the tests: composed with event-model, unpacked from pages, and
traced back to the raw run each belongs to, and compared with numpy arrays inside."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from event_model import compose_run, unpack_event_page

Docs = list[tuple[str, dict[str, Any]]]


_KEY = {"source": "test", "dtype": "number", "shape": []}


def analysis_run_docs(
    events: Sequence[tuple[str, Mapping[str, Any]]],
    raw_uid: str = "raw-run-7",
    metadata: Mapping[str, Any] | None = None,
    stop: Mapping[str, Any] | None = None,
) -> Docs:
    """An analysis run composed with event-model: start, one descriptor per stream named in
    ``events`` (``primary`` first), the events (``(stream, data)``) in order, and the stop.

    Each stream's data keys are the union of its events' keys (absent values None);
    ``stop`` adds fields to the stop document (e.g. ``exit_status``, ``raw_missing_events``).
    """
    run = compose_run(metadata={"analysis": "xasflow", "raw_uid": raw_uid, **(metadata or {})})
    keys: dict[str, list[str]] = {"primary": []}
    for stream, data in events:
        known = keys.setdefault(stream, [])
        known.extend(k for k in data if k not in known)
    docs: Docs = [("start", dict(run.start_doc))]
    composers = {}
    for stream, names in keys.items():
        desc = run.compose_descriptor(name=stream, data_keys=dict.fromkeys(names, _KEY))
        composers[stream] = desc.compose_event
        docs.append(("descriptor", dict(desc.descriptor_doc)))
    validated: set[str] = set()
    for stream, data in events:
        row = {k: data.get(k) for k in keys[stream]}
        # event-model validates the first event of each stream; the schema constrains only an
        # event's structure (data/timestamps any objects, seq_num, uid, time, descriptor),
        # which the composer makes the same for every later one, and their keys are the
        # descriptor's by construction: validating 45,000 events took ~30 s of jsonschema
        event = composers[stream](
            data=row, timestamps=dict.fromkeys(row, 0.0), validate=stream not in validated
        )
        validated.add(stream)
        docs.append(("event", dict(event)))
    stop = dict(stop or {})
    exit_status = stop.pop("exit_status", "success")
    docs.append(("stop", {**run.compose_stop(exit_status=exit_status), **stop}))
    return docs


def unpaged(docs: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``docs`` with each event page unpacked into its events (the daemon pages a batch)."""
    out: list[tuple[str, Any]] = []
    for name, doc in docs:
        if name == "event_page":
            out.extend(("event", e) for e in unpack_event_page(doc))
        else:
            out.append((name, doc))
    return out


def raw_uids(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str | None]:
    """The raw run uid each analysis document belongs to (None for a run never started)."""
    by_start: dict[str, str] = {}
    by_descriptor: dict[str, str] = {}
    out: list[str | None] = []
    for name, doc in docs:
        if name == "start":
            by_start[doc["uid"]] = doc["raw_uid"]
            out.append(doc["raw_uid"])
        elif name in ("descriptor", "stop"):
            raw = by_start.get(doc["run_start"])
            if name == "descriptor" and raw is not None:
                by_descriptor[doc["uid"]] = raw
            out.append(raw)
        else:
            out.append(by_descriptor.get(doc["descriptor"]))
    return out


def burst_docs(n: int, uid: str) -> list[tuple[str, dict[str, Any]]]:
    """An analysis run as the daemon emits it: start, descriptor, ``n`` events, stop."""
    rows = [
        {
            "index": i,
            "status": "ok",
            "cn": 2 + 2 * (i % 2),
            "cn_probability": 0.5 + 0.4 * (i % 2),
            "distance": 1.8 + 1e-4 * i,
            "charge": 1.0,
            "valence": 1,
        }
        for i in range(n)
    ]
    return analysis_run_docs([("primary", r) for r in rows], uid, {"scan_kind": "fly"})


def assert_docs_equal(a: Any, b: Any, path: str = "doc") -> None:
    """Deep equality that compares numpy arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_docs_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_docs_equal(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"
