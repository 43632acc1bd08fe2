"""The rows of an analysis run's ``primary`` stream: its typed data keys and each event's data.

One row per raw spectrum analysed (:func:`ok_row`, ``status "ok"``) or rejected
(:func:`rejected_row`, ``status "rejected"`` with ``reason`` / ``detail``; also a rejected
raw document that belongs to the run), every key of :data:`DATA_KEYS` present and those that
do not apply None; :class:`~xasflow.daemon.documents.AnalysisRun` makes each an event.

* **uncertainty** keys of each analysed spectrum: ``cn_set`` / ``motif_set`` /
  ``valence_set`` (the 90 % conformal sets, comma-separated labels), ``distance_lo`` /
  ``distance_hi`` and ``charge_lo`` / ``charge_hi`` (the 90 % intervals), ``ood_score`` and
  ``out_of_domain`` (bool; True means the answer must not be trusted). None where the bundle
  gives none (an interval's ends also where its calibration fitted no finite bound);
  ``out_of_domain`` is False on rejected rows, not null: tiled reads a boolean column that
  holds nulls back as the text "True"/"False", so a reader tells a rejected row by
  ``status``.
* numbers are finite or None (documents and JSON have no NaN); the CN probabilities and
  the motif ranking are JSON text.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from xasflow.models.predictor import Prediction

__all__ = [
    "DATA_KEYS",
    "INTERVAL_KEYS",
    "SET_KEYS",
    "data_key",
    "finite_number",
    "ok_row",
    "rejected_row",
    "uncertainty_fields",
]


def _json(value: Any) -> str:
    """A row's JSON text column (CN probabilities, the motif ranking), compact. orjson, not
    ``json.dumps``: 1-2 against 8-21 us for the two on every spectrum; the same values read
    back (shortest round-trip floats; a non-finite one, which decoding never leaves, is null)."""
    return orjson.dumps(value).decode()


_SOURCE = "xasflow"


def data_key(dtype: str, description: str, units: str | None = None) -> dict[str, Any]:
    """An event-model data key of a scalar in an analysis run (any of its streams)."""
    key: dict[str, Any] = {
        "source": _SOURCE,
        "dtype": dtype,
        "shape": [],
        "description": description,
    }
    if units is not None:
        key["units"] = units
    return key


#: The analysis descriptor's data keys (dtype "string" for JSON-encoded structures).
DATA_KEYS: dict[str, dict[str, Any]] = {
    "index": data_key("integer", "spectrum index in the raw run (-1: not a spectrum)"),
    "status": data_key("string", "'ok' (analysed) or 'rejected'"),
    "reason": data_key("string", "why the spectrum was rejected ('' when ok)"),
    "detail": data_key("string", "human-readable detail of a rejection"),
    "flags": data_key("string", "comma-separated quality flags"),
    "element": data_key("string", "absorbing element"),
    "edge": data_key("string", "absorption edge"),
    "bundle_id": data_key("string", "model bundle that made the prediction"),
    "cn": data_key("integer", "predicted dominant coordination number"),
    "cn_probability": data_key("number", "probability of the predicted coordination number"),
    "cn_probabilities": data_key("string", "JSON object: coordination number -> probability"),
    "motif": data_key("string", "top-ranked coordination motif"),
    "motif_ranking": data_key("string", "JSON list of [motif, score], best first"),
    "distance": data_key("number", "predicted mean nearest-neighbour distance", "angstrom"),
    "valence": data_key("integer", "predicted oxidation state"),
    "valence_probability": data_key("number", "probability of the predicted oxidation state"),
    "charge": data_key(
        "number", "predicted bond-valence score (relative, not valence units; see the bundle)"
    ),
    "e0": data_key("number", "edge energy E0 found in the (aligned) spectrum", "eV"),
    "edge_step": data_key("number", "edge step of mu used for normalisation"),
    "energy_shift": data_key("number", "shift applied by reference-foil alignment", "eV"),
    "latency_ms": data_key("number", "raw event time to result, milliseconds", "ms"),
    # Uncertainty (None where the bundle does not provide it, e.g. bundles trained before it).
    "cn_set": data_key("string", "conformal set of coordination numbers, comma-separated"),
    "motif_set": data_key("string", "conformal set of coordination motifs, comma-separated"),
    "valence_set": data_key("string", "conformal set of oxidation states, comma-separated"),
    "distance_lo": data_key("number", "conformal interval of distance, low end", "angstrom"),
    "distance_hi": data_key("number", "conformal interval of distance, high end", "angstrom"),
    "charge_lo": data_key("number", "conformal interval of charge, low end"),
    "charge_hi": data_key("number", "conformal interval of charge, high end"),
    "ood_score": data_key("number", "distance from the training data (higher: further)"),
    "out_of_domain": data_key(
        "boolean", "spectrum outside what the bundle was trained on: do not trust the answer"
    ),
}

#: Classifier task -> the data key of its conformal prediction set.
SET_KEYS: dict[str, str] = {"cn": "cn_set", "environment": "motif_set", "valence": "valence_set"}
#: Regressor task -> the data keys of its conformal interval (low, high).
INTERVAL_KEYS: dict[str, tuple[str, str]] = {
    "distance": ("distance_lo", "distance_hi"),
    "charge": ("charge_lo", "charge_hi"),
}


def _as_int(value: Any) -> int | None:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    return int(as_float) if math.isfinite(as_float) and as_float == int(as_float) else None


def finite_number(value: Any) -> float | None:
    """A finite float, else None (documents and JSON have no NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _empty_row() -> dict[str, Any]:
    row = dict.fromkeys(DATA_KEYS)
    row["out_of_domain"] = False
    return row


def _label(value: Any) -> str:
    """A class label as text: 4.0 -> "4", "CN4-tetrahedral" unchanged."""
    as_int = _as_int(value) if not isinstance(value, str) else None
    return str(as_int) if as_int is not None else str(value)


def uncertainty_fields(prediction: Prediction) -> dict[str, Any]:
    """The uncertainty data keys of a prediction: conformal sets, intervals, OOD score and flag.

    Absent uncertainty stays None (sets, intervals, score); ``out_of_domain`` is a bool.
    """
    out: dict[str, Any] = {"ood_score": finite_number(prediction.ood_score)}
    out["out_of_domain"] = bool(prediction.out_of_domain)
    for task, key in SET_KEYS.items():
        res = prediction.results.get(task)
        if res is not None and res.prediction_set is not None:
            out[key] = ",".join(_label(v) for v in res.prediction_set)
    for task, (lo, hi) in INTERVAL_KEYS.items():
        res = prediction.results.get(task)
        if res is not None and res.interval is not None:
            out[lo], out[hi] = finite_number(res.interval[0]), finite_number(res.interval[1])
    return out


def ok_row(
    index: int,
    prediction: Prediction,
    *,
    energy_shift: float | None = None,
    flags: list[str] | tuple[str, ...] = (),
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """Event data for an analysed spectrum (tasks the bundle lacks stay None)."""
    row = _empty_row()
    res = prediction.results
    row.update(
        index=int(index),
        status="ok",
        reason="",
        detail="",
        flags=",".join(flags),
        element=prediction.element,
        edge=prediction.edge,
        bundle_id=prediction.bundle_id,
        e0=finite_number(prediction.e0),
        edge_step=finite_number(prediction.edge_step),
        energy_shift=finite_number(energy_shift),
        latency_ms=finite_number(latency_ms),
    )
    cn = res.get("cn")
    if cn is not None:
        row["cn"] = _as_int(cn.value)
        row["cn_probability"] = finite_number(cn.confidence)
        if cn.probabilities is not None:
            row["cn_probabilities"] = _json(cn.probabilities)
    env = res.get("environment")  # top CN-motif label (classifier)
    if env is not None and env.value is not None:  # None: no motif of the CN answered
        row["motif"] = str(env.value)
    motifs = res.get("motifs") or env  # ranked CN-motif label set (multi-output regressor)
    if motifs is not None and motifs.ranking is not None:
        row["motif_ranking"] = _json([[label, score] for label, score in motifs.ranking])
    dist = res.get("distance")
    if dist is not None:
        row["distance"] = finite_number(dist.value)
    val = res.get("valence")
    if val is not None:
        row["valence"] = _as_int(val.value)
        row["valence_probability"] = finite_number(val.confidence)
    charge = res.get("charge")
    if charge is not None:
        row["charge"] = finite_number(charge.value)
    row.update(uncertainty_fields(prediction))
    return row


def rejected_row(
    index: int | None,
    reason: str,
    detail: str = "",
    *,
    flags: list[str] | tuple[str, ...] = (),
    element: str | None = None,
    edge: str | None = None,
    bundle_id: str | None = None,
    energy_shift: float | None = None,
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """Event data for a rejected spectrum or document (``index`` None becomes -1)."""
    row = _empty_row()
    row.update(
        index=-1 if index is None else int(index),
        status="rejected",
        reason=reason,
        detail=detail,
        flags=",".join(flags),
        element=element,
        edge=edge,
        bundle_id=bundle_id,
        energy_shift=finite_number(energy_shift),
        latency_ms=finite_number(latency_ms),
    )
    return row
