"""What xasflow queues on bluesky-queueserver: the settings, the plan, and the queue item.

:class:`QueueServerConfig` is the ``queueserver`` section of the daemon's configuration;
:func:`xas_regions_scan` is the plan a beamline profile imports; :func:`plan_item` turns a
recommendation into the queue item that names it. :mod:`xasflow.adapters.queueserver` (the
submitter) re-exports all of them.

Nothing unsafe reaches the queue: :func:`region_points`, the one check of the plan's regions
(run by :func:`plan_item` before the server sees the item, and by the plan itself in the RE
worker), refuses non-finite numbers, energies that are not positive and a scan of more than
:data:`MAX_PLAN_POINTS` points (``max_points`` may lower it) with a ``ValueError`` that says
why. ``extra_kwargs`` may add arguments to a plan of the beamline's own (``plan_name``; the
packaged ``xas_regions_scan`` takes none) but never replace the recommended scan: a key of
:data:`RESERVED_KWARGS`, or any with the packaged plan, is refused when the configuration loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "MAX_PLAN_POINTS",
    "PLAN_FIELDS",
    "RESERVED_KWARGS",
    "QueueServerConfig",
    "item_key",
    "plain",
    "plan_fields",
    "plan_item",
    "region_points",
    "submission_key",
    "unwritable",
    "xas_regions_scan",
]

#: The most energies one queued plan may visit. A recommendation has a few hundred (a Cu K
#: scan to k = 16 at its finest steps: about 500); a step of 1e-5 eV over a 12 eV edge would
#: ask 1.2 million, which the submitter and the RE worker would both loop over.
MAX_PLAN_POINTS = 5000

#: The plan arguments xasflow sets from the recommendation: ``extra_kwargs`` cannot name them.
RESERVED_KWARGS = ("detectors", "motor", "regions", "md")


class QueueServerConfig(BaseModel):
    """Where and how to submit plans; disabled unless ``enabled`` and a credential is set."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    transport: Literal["zmq", "http"] = "zmq"
    zmq_control_addr: str = "tcp://localhost:60615"
    zmq_info_addr: str | None = None
    zmq_public_key: SecretStr | None = None
    http_server_uri: str = "http://localhost:60610"
    api_key: SecretStr | None = None
    token: SecretStr | None = None
    plan_name: str = "xas_regions_scan"
    detectors: list[str] = Field(default_factory=lambda: ["xas"])
    motor: str = "energy"
    extra_kwargs: dict[str, Any] = Field(default_factory=dict)
    user: str = "xasflow"
    user_group: str = "primary"
    submit_on: Literal["run_end", "rescan"] = "run_end"
    min_interval_s: float = Field(30.0, ge=0)
    timeout_s: float = Field(5.0, gt=0)
    max_pending: int = Field(8, ge=1)
    #: Tries after a submission the server refused or could not take (0: none), each after
    #: twice the last wait (``retry_backoff_s``, then 2x, 4x...); then the plan is given up.
    retries: int = Field(3, ge=0, le=10)
    retry_backoff_s: float = Field(2.0, gt=0, le=300)
    #: Restarts of the daemon in which a plan given up (beside the store) is tried again
    #: (0: never), while it was given up less than ``given_up_max_age_s`` ago: an older plan
    #: would scan whatever sample is in the beam by now.
    restart_retries: int = Field(1, ge=0, le=10)
    given_up_max_age_s: float = Field(900.0, gt=0)
    #: Replays of a run (Kafka redelivers it) in which its plan given up is tried again, each
    #: with its own ``retries``; at the next one it is given up for good (0: never tried).
    given_up_replays: int = Field(2, ge=0, le=10)
    #: Seconds after a plan is given up (its retries spent, or no room to wait) before the
    #: daemon, running on, tries it again as a replay of its run (within given_up_replays and
    #: given_up_max_age_s), never sooner than the retry backoff's next step (0: never).
    given_up_retry_s: float = Field(60.0, ge=0)
    max_points: int = Field(MAX_PLAN_POINTS, ge=1, le=MAX_PLAN_POINTS)

    @field_validator("extra_kwargs")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(k for k in value if k in RESERVED_KWARGS)
        if clash:
            raise ValueError(
                f"extra_kwargs may not set {', '.join(clash)}: the recommended scan sets "
                f"{', '.join(RESERVED_KWARGS)} (use detectors and motor for those two)"
            )
        return value

    @model_validator(mode="after")
    def _extra_kwargs_taken(self) -> QueueServerConfig:
        if self.extra_kwargs and self.plan_name == "xas_regions_scan":
            raise ValueError(
                f"extra_kwargs {sorted(self.extra_kwargs)} need a plan that takes them: "
                "xas_regions_scan takes only detectors, motor, regions and md (set plan_name "
                "to a plan of the beamline's own, or drop extra_kwargs)"
            )
        return self

    @model_validator(mode="after")
    def _credentials(self) -> QueueServerConfig:
        if not self.enabled:
            return self
        if self.transport == "zmq" and not secret(self.zmq_public_key):
            raise ValueError(
                "queueserver submission is enabled over 0MQ but no zmq_public_key is set: "
                "give the RE Manager's public key (qserver-zmq-keys) or disable it"
            )
        if self.transport == "http" and not (secret(self.api_key) or secret(self.token)):
            raise ValueError(
                "queueserver submission is enabled over HTTP but neither api_key nor token "
                "is set: give a bluesky-httpserver API key or disable it"
            )
        if self.api_key is not None and self.token is not None:
            raise ValueError("give api_key or token, not both")
        return self


def secret(value: SecretStr | None) -> str:
    """The text of a secret setting ("" when unset)."""
    return value.get_secret_value() if value is not None else ""


# --------------------------------------------------------------------------- the plan


def region_points(
    regions: Sequence[Sequence[float]], max_points: int = MAX_PLAN_POINTS
) -> tuple[list[float], list[float]]:
    """Energies (ascending, each once) and their dwells for ``[[start, stop, step, dwell], ...]``.

    A region's grid runs from start to stop inclusive with the step shrunk to divide the span
    (as :class:`xasflow.daemon.recommend.Region` does); a shared energy takes the longest dwell.
    ``ValueError`` (never another error) for a region no beamline should run: a number that is
    not finite, an energy that is not positive, ``stop < start``, a step or dwell that is not
    positive, or more than ``max_points`` points in all (counted region by region, before any
    is built, so a tiny step costs nothing).
    """
    grids: list[tuple[float, float, int, float]] = []
    total = 0
    for row in regions:
        if len(row) != 4:
            raise ValueError(f"a region is [start, stop, step, dwell], got {list(row)!r}")
        try:
            start, stop, step, dwell = (float(v) for v in row)
        except (TypeError, ValueError):
            raise ValueError(f"region {list(row)!r}: not four numbers") from None
        if not all(math.isfinite(v) for v in (start, stop, step, dwell)):
            raise ValueError(f"region {list(row)!r}: every number must be finite")
        if not (start > 0 and step > 0 and dwell > 0 and stop >= start):
            raise ValueError(
                f"region {list(row)!r}: need start > 0 eV, stop >= start, step > 0, dwell > 0"
            )
        intervals = (stop - start) / step
        if not intervals < max_points:  # also catches an overflow to inf
            raise ValueError(
                f"region {list(row)!r}: a step of {step:g} eV makes more than {max_points} points"
            )
        n = max(1, math.ceil(intervals - 1e-3))
        total += n + 1
        if total > max_points:
            raise ValueError(f"the regions make more than {max_points} points (the plan's cap)")
        grids.append((start, stop, n, dwell))
    points: dict[float, float] = {}
    for start, stop, n, dwell in grids:
        for k in range(n + 1):
            e = round(start + (stop - start) * k / n, 6)
            points[e] = max(points.get(e, 0.0), dwell)
    energies = sorted(points)
    return energies, [points[e] for e in energies]


def xas_regions_scan(detectors, motor, regions, md=None):
    """Bluesky plan: one step scan over the regions' energies (a list_scan of ``motor``).

    ``detectors``: readable devices; ``motor``: the energy positioner (eV); ``regions``:
    ``[[start, stop, step, dwell], ...]`` (checked by :func:`region_points`: a region no
    beamline should run raises ``ValueError`` before anything moves); ``md``: extra
    start-document metadata. Before each point a detector with a ``dwell`` or ``count_time``
    signal is set to that point's dwell. Import it into a queueserver profile to run
    xasflow's recommendations. The parameters are deliberately unannotated: the queueserver
    turns unannotated device names into devices and would have to resolve (string)
    annotations in the worker's namespace.
    """
    import bluesky.plan_stubs as bps
    import bluesky.plans as bp

    energies, dwells = region_points(regions)
    dwell_at = dict(zip(energies, dwells, strict=True))
    _md = {"plan_name": "xas_regions_scan", "xasflow_regions": [list(r) for r in regions]}
    _md.update(md or {})

    def per_step(dets: Any, step: Any, pos_cache: Any) -> Any:
        dwell = dwell_at.get(round(float(step[motor]), 6))
        if dwell is not None:
            for det in dets:
                sig = getattr(det, "dwell", None) or getattr(det, "count_time", None)
                if sig is not None and hasattr(sig, "set"):
                    yield from bps.mv(sig, dwell)
        yield from bps.one_nd_step(dets, step, pos_cache)

    plan: Any = bp.list_scan  # its stubs want (motor, list) pairs and a typed per_step
    return (yield from plan(detectors, motor, energies, per_step=per_step, md=_md))


def plan_item(
    config: QueueServerConfig,
    recommendation: Mapping[str, Any],
    *,
    raw_uid: str | None = None,
    rescan_only: bool = False,
) -> dict[str, Any]:
    """The queue item for a recommendation (a ``Recommendation.to_dict()`` or stream row).

    ``rescan_only`` submits just the recommended rescan region. ``md.xasflow`` names the raw
    run and the submission (:func:`submission_key`), which :func:`item_key` reads back from
    the server's queue and history. ``ValueError`` for a recommendation without regions,
    with regions :func:`region_points` refuses, or JSON cannot write (:func:`unwritable`).
    """
    rec = decode(recommendation)
    why = unwritable(rec)
    if why is not None:
        raise ValueError(why)
    regions = rec.get("regions") or []
    if rescan_only:
        if not rec.get("rescan"):
            raise ValueError("the recommendation has no rescan")
        regions = [rec["rescan"]]
    try:
        rows = [[float(r[k]) for k in ("start", "stop", "step", "dwell")] for r in regions]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a region without start, stop, step and dwell numbers: {exc}") from None
    if not rows:
        raise ValueError("the recommendation has no regions")
    region_points(rows, config.max_points)  # validate before the server sees it
    _, what = submission_key(raw_uid or "", rec, rescan_only)
    md = {
        "xasflow": {
            "raw_uid": raw_uid,
            "bundle_id": rec.get("bundle_id"),
            "e0": rec.get("e0"),
            "uncertainty": rec.get("uncertainty"),
            "kind": "rescan" if rescan_only else "scan",
            "submission": what,
            "reasons": [str(r.get("reason", "")) for r in regions],
        }
    }
    kwargs = {  # the recommended scan last: nothing in extra_kwargs replaces it
        **config.extra_kwargs,
        "detectors": list(config.detectors),
        "motor": config.motor,
        "regions": rows,
        "md": md,
    }
    return {"item_type": "plan", "name": config.plan_name, "args": [], "kwargs": kwargs}


def submission_key(raw_uid: str, rec: Mapping[str, Any], rescan_only: bool) -> tuple[str, str]:
    """``(raw uid, what)`` of a submission: ``"run_end"`` for a run's scan, ``"rescan
    <region>"`` for a rescan of one region; each is queued once per raw run."""
    if not rescan_only:
        return raw_uid, "run_end"
    rescan = rec.get("rescan")
    name = rescan.get("name", "") if isinstance(rescan, Mapping) else ""
    return raw_uid, f"rescan {name}"


def item_key(item: Any) -> tuple[str, str] | None:
    """The :func:`submission_key` a queue or history item of the queueserver carries in
    ``kwargs.md.xasflow`` (None for an item xasflow did not queue)."""
    try:
        ours = item["kwargs"]["md"]["xasflow"]
        raw_uid, what = ours.get("raw_uid"), ours.get("submission")
    except (KeyError, TypeError, AttributeError):
        return None
    if not isinstance(raw_uid, str) or not raw_uid:
        return None
    if not isinstance(what, str):  # queued by a version that did not record it
        what = "run_end" if ours.get("kind") == "scan" else ""
    return (raw_uid, what) if what else None


#: What of a decoded recommendation :func:`plan_item` and :func:`submission_key` read: what
#: a plan given up is remembered by, to be rebuilt after a restart.
PLAN_FIELDS = ("regions", "rescan", "e0", "uncertainty", "bundle_id")


def plan_fields(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`PLAN_FIELDS` ``rec`` has."""
    return {key: rec[key] for key in PLAN_FIELDS if key in rec}


def unwritable(rec: Mapping[str, Any]) -> str | None:
    """Why JSON cannot write what a plan of the decoded ``rec`` carries (None: it can): no
    queueserver client could send that plan, nor the memory keep it."""
    try:
        json.dumps(plan_fields(rec))
    except (TypeError, ValueError) as exc:
        return f"the recommendation is not JSON: {exc}"
    return None


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays (anything with ``tolist``, an event's data
    may hold them) as plain Python, in mappings, lists and tuples too (as dicts and lists):
    what JSON writes, for the server and the memory. Anything else is left as it is."""
    if isinstance(value, Mapping):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # np.float64 and np.str_ too: float, str
    return tolist() if callable(tolist) else value


def decode(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A recommendation dict with JSON-string fields (stream rows) decoded, and numpy
    values plain Python (:func:`plain`)."""
    out = {key: plain(value) for key, value in rec.items()}
    for key in ("regions", "rescan"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = json.loads(value) if value else None
    return out
