"""Analysis runs in event-model form: what the daemon publishes for every raw run it follows.

One ``AnalysisRun`` per raw run, composed with ``event_model.compose_run``:

* **start**: ``raw_uid`` (the raw run's uid), ``analysis: "xasflow"``, ``code_version``,
  ``element`` / ``edge`` / ``bundle_id`` (of the first spectrum's outcome; None when
  unknown), ``scan_kind`` and, when the raw start had them, ``raw_scan_id`` (only an
  integer that fits int64, as msgpack, tiled and SQL need; another ``scan_id`` is left out,
  with a warning) / ``raw_plan_name`` / ``raw_sample_name``. It is composed lazily,
  together with the descriptor, just before the run's first event (or its stop), so it can
  name the model actually used.
* **descriptor** of stream ``"primary"`` with the typed :data:`DATA_KEYS`.
* **uncertainty** keys of each analysed spectrum: ``cn_set`` / ``motif_set`` /
  ``valence_set`` (the 90 % conformal sets, comma-separated labels), ``distance_lo`` /
  ``distance_hi`` and ``charge_lo`` / ``charge_hi`` (the 90 % intervals), ``ood_score`` and
  ``out_of_domain`` (bool; True means the answer must not be trusted). None where the bundle
  gives none (an interval's ends also where its calibration fitted no finite bound);
  ``out_of_domain`` is False on rejected rows, not null: tiled reads a boolean column that
  holds nulls back as the text "True"/"False", so a reader tells a rejected row by
  ``status``.
* **event**: one per raw spectrum analysed (``status "ok"``) or rejected (``status
  "rejected"`` with ``reason`` / ``detail``), plus one per assembly rejection that belongs
  to the run (a malformed event, a duplicate ...). Values that do not apply are None.
* extra streams (:meth:`AnalysisRun.stream_event`): e.g. ``"recommendations"``
  (:mod:`xasflow.daemon.recommend`), one descriptor each, composed before its first event.
* **stop**: ``exit_status`` mirrors the raw run's (``"timeout"``, a raw run whose stop never
  came, becomes ``"fail"`` with reason ``"stop_timeout: ..."``); a run that lost raw events
  (sequence gaps, or fewer events than the raw stop's ``num_events``) is never "success":
  it becomes ``"fail"`` with reason ``"partial: N raw events missing ..."`` and
  ``partial: true`` (event-model allows only success/abort/fail). Extra fields:
  ``raw_exit_status``, ``bundle_ids`` (every bundle used), ``n_analysed``, ``n_rejected``,
  ``n_out_of_domain``, ``raw_seq_gaps``, ``raw_missing_events``, ``raw_dropped_events`` (of
  them, those this daemon's input queue dropped), ``partial``, ``n_duplicate_events``
  (every duplicate raw event; only the first has a rejected row).

Every method returns ``[(name, doc), ...]`` ready to publish, in order; one that fails (a
bug) after composing the run's start or a descriptor leaves them to the run's next document
that succeeds (a retried ``close``: start, descriptor, stop), so no event or stop goes out
without its start. Documents are validated against the event-model schemas when
``validate=True`` (tests do; the hot path leaves it off, the composition is the same).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from xasflow import __version__
from xasflow.adapters.stop_claims import int64_or_none
from xasflow.models.predictor import Prediction

__all__ = [
    "ANALYSIS_STREAM",
    "CODE_VERSION",
    "DATA_KEYS",
    "INTERVAL_KEYS",
    "SET_KEYS",
    "AnalysisRun",
    "Doc",
    "data_key",
    "finite_number",
    "ok_row",
    "rejected_row",
    "uncertainty_fields",
]

logger = logging.getLogger(__name__)

Doc = tuple[str, dict[str, Any]]


def _json(value: Any) -> str:
    """A row's JSON text column (CN probabilities, the motif ranking), compact. orjson, not
    ``json.dumps``: 1-2 against 8-21 us for the two on every spectrum; the same values read
    back (shortest round-trip floats; a non-finite one, which decoding never leaves, is null)."""
    return orjson.dumps(value).decode()


ANALYSIS_STREAM = "primary"
CODE_VERSION = f"xasflow {__version__}"
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

_EXIT = {"success": "success", "abort": "abort", "fail": "fail"}


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
        row["cn_probability"] = cn.confidence
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
        row["valence_probability"] = val.confidence
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


class AnalysisRun:
    """The analysis run that mirrors one raw run; composes its documents in order."""

    def __init__(
        self,
        raw_uid: str,
        raw_start: Mapping[str, Any] | None = None,
        *,
        kind: str = "unknown",
        element: str | None = None,
        edge: str | None = None,
        validate: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.raw_uid = raw_uid
        self.raw_start = dict(raw_start) if raw_start is not None else None
        self.kind = kind
        self.element = element
        self.edge = edge
        self.validate = validate
        self.clock = clock
        self.n_analysed = 0
        self.n_rejected = 0
        self.n_out_of_domain = 0
        self.n_duplicates = 0  # duplicate raw events: one rejected row, the rest counted here
        self.bundle_ids: list[str] = []
        self.start_doc: dict[str, Any] | None = None
        self.descriptor_doc: dict[str, Any] | None = None
        self.stop_doc: dict[str, Any] | None = None
        self._bundle: Any = None
        self._compose_event: Any = None
        self._streams: dict[str, Any] = {}  # extra stream name -> its compose_event
        self.stream_descriptors: dict[str, dict[str, Any]] = {}
        #: Composed, not handed out yet: a call that failed after composing the run's start
        #: or a descriptor leaves them to the run's next document (see :meth:`_handed`).
        self._unsent: list[Doc] = []

    @property
    def started(self) -> bool:
        """Whether the start document has been composed."""
        return self.start_doc is not None

    @property
    def closed(self) -> bool:
        """Whether the stop document has been composed."""
        return self.stop_doc is not None

    def _handed(self, docs: list[Doc]) -> list[Doc]:
        """``docs`` after what was composed and not handed out yet (a start, a descriptor),
        which the caller now publishes: never an event or a stop whose start was lost."""
        out, self._unsent = [*self._unsent, *docs], []
        return out

    def _open(self, row: Mapping[str, Any] | None) -> None:
        """Compose start and descriptor, naming the element/edge/bundle of ``row`` (both
        handed out with the document that needs them, :meth:`_handed`)."""
        if self.start_doc is not None:
            return
        element = self.element or (row or {}).get("element")
        edge = self.edge or (row or {}).get("edge")
        md: dict[str, Any] = {
            "raw_uid": self.raw_uid,
            "analysis": "xasflow",
            "code_version": CODE_VERSION,
            "element": element,
            "edge": edge,
            "bundle_id": (row or {}).get("bundle_id"),
            "scan_kind": self.kind,
            "plan_name": "xasflow_analysis",
            "hints": {"dimensions": [[["index"], ANALYSIS_STREAM]]},
        }
        raw = self.raw_start or {}
        scan_id = int64_or_none(raw.get("scan_id"))  # msgpack, tiled and SQL take int64 only
        if scan_id is not None:
            md["raw_scan_id"] = scan_id
        elif raw.get("scan_id") is not None:
            kind = type(raw["scan_id"]).__name__
            logger.warning(
                "raw run %s: scan_id (a %s) is no int64: not carried", self.raw_uid, kind
            )
        if isinstance(raw.get("plan_name"), str):
            md["raw_plan_name"] = raw["plan_name"]
        if isinstance(raw.get("sample_name"), str):
            md["raw_sample_name"] = raw["sample_name"]
        now = self.clock()
        from event_model import compose_run  # the daemon extra; config loads without it

        self._bundle = compose_run(metadata=md, time=now, validate=self.validate)
        desc = self._bundle.compose_descriptor(
            name=ANALYSIS_STREAM,
            data_keys=DATA_KEYS,
            hints={"xasflow": {"fields": ["cn", "motif", "distance", "valence", "charge"]}},
            object_keys={"xasflow": list(DATA_KEYS)},
            time=now,
            validate=self.validate,
        )
        self._compose_event = desc.compose_event
        self.descriptor_doc = dict(desc.descriptor_doc)
        self.start_doc = dict(self._bundle.start_doc)  # last: a failure above composes anew
        self._unsent += [("start", self.start_doc), ("descriptor", self.descriptor_doc)]

    def event(self, row: Mapping[str, Any]) -> list[Doc]:
        """One event for a result row (see :func:`ok_row` / :func:`rejected_row`)."""
        if self.stop_doc is not None:
            raise RuntimeError(f"analysis run for {self.raw_uid} is closed")
        self._open(row)
        data = {k: row.get(k) for k in DATA_KEYS}
        now = self.clock()
        event = self._compose_event(
            data=data, timestamps=dict.fromkeys(DATA_KEYS, now), time=now, validate=self.validate
        )
        if data["status"] == "ok":
            self.n_analysed += 1
            self.n_out_of_domain += bool(data.get("out_of_domain"))
        else:
            self.n_rejected += 1
        bundle_id = data.get("bundle_id")
        if bundle_id and bundle_id not in self.bundle_ids:
            self.bundle_ids.append(bundle_id)
        return self._handed([("event", dict(event))])

    def stream_event(
        self, stream: str, data_keys: Mapping[str, Mapping[str, Any]], row: Mapping[str, Any]
    ) -> list[Doc]:
        """One event in an extra stream (e.g. ``recommendations``); its descriptor comes first.

        Extra streams do not count as analysed/rejected spectra. The start document is composed
        here only if no ``primary`` event came first (it then names no bundle).
        """
        if self.stop_doc is not None:
            raise RuntimeError(f"analysis run for {self.raw_uid} is closed")
        if stream == ANALYSIS_STREAM:
            raise ValueError(f"use event() for the {ANALYSIS_STREAM!r} stream")
        self._open(None)
        now = self.clock()
        compose = self._streams.get(stream)
        if compose is None:
            desc = self._bundle.compose_descriptor(
                name=stream,
                data_keys={k: dict(v) for k, v in data_keys.items()},
                object_keys={"xasflow": list(data_keys)},
                time=now,
                validate=self.validate,
            )
            compose = self._streams[stream] = desc.compose_event
            self.stream_descriptors[stream] = dict(desc.descriptor_doc)
            self._unsent.append(("descriptor", self.stream_descriptors[stream]))
        data = {k: row.get(k) for k in data_keys}
        event = compose(
            data=data, timestamps=dict.fromkeys(data_keys, now), time=now, validate=self.validate
        )
        return self._handed([("event", dict(event))])

    def close(
        self,
        raw_exit_status: str,
        reason: str = "",
        *,
        seq_gaps: int = 0,
        missing_events: int = 0,
        dropped_events: int = 0,
        error: str = "",
    ) -> list[Doc]:
        """Stop document mirroring the raw run's end (start/descriptor first if none yet);
        ``error``: the daemon failed closing it (a bug), so it stops "fail" with that reason."""
        if self.stop_doc is not None:
            return []
        self._open(None)
        exit_status = _EXIT.get(raw_exit_status, "fail")
        if raw_exit_status == "timeout":
            reason = f"stop_timeout: {reason}" if reason else "stop_timeout"
        elif raw_exit_status not in _EXIT:
            reason = f"raw exit status {raw_exit_status!r}: {reason}"
        partial = missing_events > 0
        if partial and exit_status == "success":  # event-model has no "partial" exit status
            exit_status = "fail"
            lost = f"partial: {missing_events} raw events missing ({seq_gaps} sequence gaps"
            if dropped_events:
                lost += f", {dropped_events} of them dropped by the input queue"
            reason = f"{lost}); {reason}" if reason else f"{lost})"
        if error:  # after the partial note, which needs the raw run's own status
            exit_status = "fail"
            reason = f"internal_error: {error}; {reason}" if reason else f"internal_error: {error}"
        stop = dict(
            self._bundle.compose_stop(
                exit_status=exit_status, reason=reason, time=self.clock(), validate=False
            )
        )
        stop.update(
            raw_exit_status=raw_exit_status,
            bundle_ids=list(self.bundle_ids),
            n_analysed=self.n_analysed,
            n_rejected=self.n_rejected,
            n_out_of_domain=self.n_out_of_domain,
            raw_seq_gaps=int(seq_gaps),
            raw_missing_events=int(missing_events),
            raw_dropped_events=int(dropped_events),
            partial=partial,
            n_duplicate_events=self.n_duplicates,
        )
        if self.validate:
            from event_model import DocumentNames, schema_validators

            schema_validators[DocumentNames.stop].validate(stop)
        self.stop_doc = stop
        return self._handed([("stop", stop)])
