"""The ``recommendations`` stream of an analysis run: its data keys, rows and documents.

Built here, in one place, from a :class:`~xasflow.daemon.recommend_types.Recommendation`; read
back by the IOC, the queueserver submitter and the dashboard (:func:`parse_recommendation_row`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from xasflow.daemon.analysis_rows import data_key
from xasflow.daemon.recommend_types import Recommendation

__all__ = [
    "RECOMMENDATION_KEYS",
    "RECOMMENDATION_STREAM",
    "parse_recommendation_row",
    "recommendation_docs",
    "recommendation_row",
    "waveform_regions",
]

RECOMMENDATION_STREAM = "recommendations"


#: Data keys of the ``recommendations`` stream (structures JSON-encoded as strings).
RECOMMENDATION_KEYS: dict[str, dict[str, Any]] = {
    "index": data_key("integer", "index of the raw spectrum this advice follows"),
    "regions": data_key(
        "string", "JSON list of {name, start, stop, step, dwell, reason, importance, n_points}"
    ),
    "waveform": data_key("string", "JSON list [start, stop, step, dwell] * n (eV, eV, eV, s)"),
    "n_points": data_key("integer", "distinct energies of the recommended scan"),
    "scan_time": data_key("number", "counting time of the recommended scan", "s"),
    "stop_early": data_key("boolean", "the answer is already certain: the scan may stop"),
    "stop_reason": data_key(
        "string", "why stopping early is safe, or why it is withheld ('' when neither)"
    ),
    "rescan": data_key("string", "JSON region to measure again with a longer dwell ('' for none)"),
    "noise": data_key("string", "JSON object: region -> noise as a fraction of the edge step"),
    "dropped": data_key(
        "string", "JSON list of the regions outside the monochromator's range, as in regions"
    ),
    "uncertainty": data_key("number", "1 - probability of the predicted coordination number"),
    "e0": data_key("number", "E0 the regions are placed around", "eV"),
    "bundle_id": data_key("string", "model bundle whose importances were used"),
    "out_of_domain": data_key(
        "boolean", "the answer this advice follows is out of domain: no plan is queued from it"
    ),
}


def recommendation_row(
    index: int, rec: Recommendation, out_of_domain: bool = False
) -> dict[str, Any]:
    """Event data of the ``recommendations`` stream for one recommendation (``out_of_domain``:
    of the answer it follows)."""
    return {
        "index": int(index),
        "regions": json.dumps([r.to_dict() for r in rec.regions]),
        "waveform": json.dumps(rec.waveform()),
        "n_points": rec.n_points,
        "scan_time": rec.time,
        "stop_early": bool(rec.stop_early),
        "stop_reason": rec.stop_reason,
        "rescan": "" if rec.rescan is None else json.dumps(rec.rescan.to_dict()),
        "noise": json.dumps(rec.noise),
        "dropped": json.dumps([r.to_dict() for r in rec.dropped]),
        "uncertainty": float(rec.uncertainty),
        "e0": float(rec.e0),
        "bundle_id": rec.bundle_id,
        "out_of_domain": bool(out_of_domain),
    }


def recommendation_docs(
    run: Any, index: int, rec: Recommendation, out_of_domain: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """Documents (descriptor the first time, then the event) of ``rec`` in an analysis run.

    ``run`` is a :class:`xasflow.daemon.documents.AnalysisRun` that has already emitted the
    spectrum's ``primary`` event (so its start document exists).
    """
    return run.stream_event(
        RECOMMENDATION_STREAM, RECOMMENDATION_KEYS, recommendation_row(index, rec, out_of_domain)
    )


def parse_recommendation_row(data: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a ``recommendations`` event's data back into plain structures."""
    out = dict(data)
    for key in ("regions", "waveform", "noise", "dropped"):
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = json.loads(value)
    rescan = out.get("rescan")
    out["rescan"] = json.loads(rescan) if isinstance(rescan, str) and rescan else None
    return out


def waveform_regions(waveform: Iterable[float]) -> list[tuple[float, float, float, float]]:
    """Split a flat ``[start, stop, step, dwell] * n`` list back into tuples."""
    values = [float(v) for v in waveform]
    if len(values) % 4:
        raise ValueError(f"a region waveform has 4 numbers per region, got {len(values)}")
    return [tuple(values[i : i + 4]) for i in range(0, len(values), 4)]  # type: ignore[misc]
