"""Analysis runs in event-model form: what the daemon publishes for every raw run it follows.

One ``AnalysisRun`` per raw run, composed with ``event_model.compose_run``:

* **start**: ``raw_uid`` (the raw run's uid), ``analysis: "xasflow"``, ``code_version``,
  ``element`` / ``edge`` / ``bundle_id`` (of the first spectrum's outcome; None when
  unknown), ``scan_kind`` and, when the raw start had them, ``raw_scan_id`` (only an
  integer that fits int64, as msgpack, tiled and SQL need; another ``scan_id`` is left out,
  with a warning) / ``raw_plan_name`` / ``raw_sample_name``. It is composed lazily,
  together with the descriptor, just before the run's first event (or its stop), so it can
  name the model actually used.
* **descriptor** of stream ``"primary"`` with the typed data keys
  (:data:`~xasflow.daemon.analysis_rows.DATA_KEYS`: each key, the uncertainty keys among
  them, and the rows an event carries are :mod:`~xasflow.daemon.analysis_rows`).
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
import time
from collections.abc import Callable, Mapping
from typing import Any

from xasflow import __version__
from xasflow.adapters.stop_claims import int64_or_none
from xasflow.daemon.analysis_rows import DATA_KEYS

__all__ = ["ANALYSIS_STREAM", "CODE_VERSION", "AnalysisRun", "Doc"]

logger = logging.getLogger(__name__)

Doc = tuple[str, dict[str, Any]]


ANALYSIS_STREAM = "primary"
CODE_VERSION = f"xasflow {__version__}"

_EXIT = {"success": "success", "abort": "abort", "fail": "fail"}


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
        """One event for a result row (see :func:`~xasflow.daemon.analysis_rows.ok_row` /
        :func:`~xasflow.daemon.analysis_rows.rejected_row`)."""
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
