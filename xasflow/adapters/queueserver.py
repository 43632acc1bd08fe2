"""Submit recommended scans to bluesky-queueserver as plans, only when an operator enables it.

Off by default (:class:`QueueServerConfig` ``enabled: false``). Enabled, it needs a
credential for the transport it uses, and refuses to start without one:

* ``transport: zmq`` (RE Manager's 0MQ control socket, ``bluesky_queueserver_api.zmq``):
  ``zmq_public_key``, the RE Manager's CURVE public key (its private half is
  ``QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER`` on the server; ``qserver-zmq-keys`` makes a pair).
  Without encryption anyone on the network could drive the queue, so a key is required.
* ``transport: http`` (bluesky-httpserver, ``bluesky_queueserver_api.http``): ``api_key``
  or ``token`` (sent as ``Authorization: ApiKey ...`` / ``Bearer ...``).

A recommended scan becomes the queue item ``plan_name`` (default :func:`xas_regions_scan`,
which a beamline profile imports from here) with kwargs ``detectors``, ``motor``,
``regions`` (``[[start, stop, step, dwell], ...]``, eV / s) and ``md`` (the raw run's uid,
the bundle, E0, why). :class:`QueueServerSubmitter` is also a document callback: it keeps
each analysis run's latest ``recommendations`` event and, when the run stops with
``exit_status: success``, queues its advice (``submit_on: run_end``; nothing when the answer
was already certain, nor for a run aborted, failed or closed by a daemon's shutdown) or, with
``submit_on: rescan``, only recommended rescans, each region once per run. Advice that
follows an out-of-domain answer is never queued (``skipped_out_of_domain``): the sample is
not what the bundle knows, and a plan would chase a guess. A raw run gets
its plan once, however often its analysis is replayed (a Kafka redelivery after a restart).
Submissions run on a worker thread, so the daemon's publishing never waits on the network;
at most one per ``min_interval_s``.

Install with the ``queueserver`` extra (``bluesky-queueserver-api``; the server side needs
``bluesky-queueserver`` and Redis).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from xasflow.adapters.routing import SafeRouter, StreamCallback, stream_factory

__all__ = [
    "QueueServerConfig",
    "QueueServerError",
    "QueueServerSubmitter",
    "plan_item",
    "region_points",
    "xas_regions_scan",
]

logger = logging.getLogger(__name__)


class QueueServerError(RuntimeError):
    """The queueserver refused a request or could not be reached."""


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

    @model_validator(mode="after")
    def _credentials(self) -> QueueServerConfig:
        if not self.enabled:
            return self
        if self.transport == "zmq" and not _secret(self.zmq_public_key):
            raise ValueError(
                "queueserver submission is enabled over 0MQ but no zmq_public_key is set: "
                "give the RE Manager's public key (qserver-zmq-keys) or disable it"
            )
        if self.transport == "http" and not (_secret(self.api_key) or _secret(self.token)):
            raise ValueError(
                "queueserver submission is enabled over HTTP but neither api_key nor token "
                "is set: give a bluesky-httpserver API key or disable it"
            )
        if self.api_key is not None and self.token is not None:
            raise ValueError("give api_key or token, not both")
        return self


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


# --------------------------------------------------------------------------- the plan


def region_points(regions: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Energies (ascending, each once) and their dwells for ``[[start, stop, step, dwell], ...]``.

    A region's grid runs from start to stop inclusive with the step shrunk to divide the span
    (as :class:`xasflow.daemon.recommend.Region` does); a shared energy takes the longest dwell.
    """
    import math

    points: dict[float, float] = {}
    for row in regions:
        if len(row) != 4:
            raise ValueError(f"a region is [start, stop, step, dwell], got {list(row)!r}")
        start, stop, step, dwell = (float(v) for v in row)
        if not (step > 0 and dwell > 0 and stop >= start):
            raise ValueError(f"region {list(row)!r}: need stop >= start, step > 0, dwell > 0")
        n = max(1, math.ceil((stop - start) / step - 1e-3))
        for k in range(n + 1):
            e = round(start + (stop - start) * k / n, 6)
            points[e] = max(points.get(e, 0.0), dwell)
    energies = sorted(points)
    return energies, [points[e] for e in energies]


def xas_regions_scan(detectors, motor, regions, md=None):
    """Bluesky plan: one step scan over the regions' energies (a list_scan of ``motor``).

    ``detectors``: readable devices; ``motor``: the energy positioner (eV); ``regions``:
    ``[[start, stop, step, dwell], ...]``; ``md``: extra start-document metadata. Before each
    point a detector with a ``dwell`` or ``count_time`` signal is set to that point's dwell.
    Import it into a queueserver profile to run xasflow's recommendations. The parameters are
    deliberately unannotated: the queueserver turns unannotated device names into devices
    and would have to resolve (string) annotations in the worker's namespace.
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

    ``rescan_only`` submits just the recommended rescan region.
    """
    rec = _decode(recommendation)
    regions = rec.get("regions") or []
    if rescan_only:
        if not rec.get("rescan"):
            raise ValueError("the recommendation has no rescan")
        regions = [rec["rescan"]]
    rows = [[float(r[k]) for k in ("start", "stop", "step", "dwell")] for r in regions]
    if not rows:
        raise ValueError("the recommendation has no regions")
    region_points(rows)  # validate before the server sees it
    md = {
        "xasflow": {
            "raw_uid": raw_uid,
            "bundle_id": rec.get("bundle_id"),
            "e0": rec.get("e0"),
            "uncertainty": rec.get("uncertainty"),
            "kind": "rescan" if rescan_only else "scan",
            "reasons": [str(r.get("reason", "")) for r in regions],
        }
    }
    kwargs = {
        "detectors": list(config.detectors),
        "motor": config.motor,
        "regions": rows,
        "md": md,
        **config.extra_kwargs,
    }
    return {"item_type": "plan", "name": config.plan_name, "args": [], "kwargs": kwargs}


def _decode(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A recommendation dict with JSON-string fields (stream rows) decoded."""
    out = dict(rec)
    for key in ("regions", "rescan"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = json.loads(value) if value else None
    return out


# --------------------------------------------------------------------------- the client


class QueueServerSubmitter:
    """Adds recommended scans to the queue (a no-op unless the config enables it)."""

    def __init__(
        self,
        config: QueueServerConfig | None = None,
        *,
        api_factory: Callable[[QueueServerConfig], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``api_factory`` builds the REManagerAPI (tests may inject one); default: the real one."""
        self.config = config or QueueServerConfig()
        self._api_factory = api_factory or _make_api
        self._api: Any = None
        self._clock = clock
        self._last_submit = -float("inf")
        self._queue: queue.Queue[tuple[dict[str, Any], str | None, bool] | None] = queue.Queue(
            self.config.max_pending
        )
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._router = SafeRouter(
            [stream_factory({"recommendations": lambda st, desc: _AdviceFollower(self, st, desc)})],
            "queueserver submitter",
        )
        self.stats: dict[str, int] = {
            "submitted": 0,
            "failed": 0,
            "skipped_disabled": 0,
            "skipped_certain": 0,
            "skipped_rate": 0,
            "skipped_not_success": 0,
            "skipped_out_of_domain": 0,
            "skipped_repeat": 0,
            "dropped_full": 0,
        }
        #: (raw uid, what) already queued: "run_end", or "rescan <region>" (the newest kept)
        self._queued: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.last_error: str = ""
        self.submitted: list[dict[str, Any]] = []  # server replies, newest last (at most 100)

    @property
    def enabled(self) -> bool:
        """Whether anything will be submitted."""
        return self.config.enabled

    # ------------------------------------------------------------------ synchronous API

    def api(self) -> Any:
        """The REManagerAPI client (created on first use)."""
        if self._api is None:
            self._api = self._api_factory(self.config)
        return self._api

    def submit(
        self,
        recommendation: Mapping[str, Any],
        *,
        raw_uid: str | None = None,
        rescan_only: bool = False,
    ) -> dict[str, Any] | None:
        """Add one recommendation to the queue now; None when disabled. Raises QueueServerError."""
        if not self.enabled:
            self.stats["skipped_disabled"] += 1
            return None
        item = plan_item(self.config, recommendation, raw_uid=raw_uid, rescan_only=rescan_only)
        try:
            reply = self.api().item_add(
                item, user=self.config.user, user_group=self.config.user_group
            )
        except Exception as exc:
            self.stats["failed"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise QueueServerError(f"queueserver refused or unreachable: {exc}") from exc
        if isinstance(reply, Mapping) and reply.get("success") is False:
            self.stats["failed"] += 1
            self.last_error = str(reply.get("msg", ""))
            raise QueueServerError(f"queueserver refused the plan: {reply.get('msg')}")
        self.stats["submitted"] += 1
        self._last_submit = self._clock()
        self.submitted.append(dict(reply) if isinstance(reply, Mapping) else {"reply": reply})
        del self.submitted[:-100]
        return dict(reply) if isinstance(reply, Mapping) else {"reply": reply}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (after what is queued) and close the client."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(None)
            worker.join(timeout)
        self._worker = None
        if self._api is not None:
            try:
                self._api.close()
            except Exception:
                logger.exception("closing the queueserver client failed")
            self._api = None

    def __enter__(self) -> QueueServerSubmitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ background

    def enqueue(
        self,
        recommendation: Mapping[str, Any],
        raw_uid: str | None = None,
        rescan_only: bool = False,
    ) -> bool:
        """Submit in the background (rate-limited); False when disabled, certain, already
        queued for this raw run, limited or full."""
        if not self.enabled:
            self.stats["skipped_disabled"] += 1
            return False
        rec = _decode(recommendation)
        if rec.get("stop_early") and not rescan_only:
            self.stats["skipped_certain"] += 1
            return False
        key = None
        if raw_uid:
            rescan = rec.get("rescan") or {}
            what = f"rescan {rescan.get('name', '')}" if rescan_only else "run_end"
            key = (raw_uid, what)
            if key in self._queued:
                self.stats["skipped_repeat"] += 1
                return False
        if self._clock() - self._last_submit < self.config.min_interval_s:
            self.stats["skipped_rate"] += 1
            return False
        self._ensure_worker()
        try:
            self._queue.put_nowait((rec, raw_uid, rescan_only))
        except queue.Full:
            self.stats["dropped_full"] += 1
            return False
        self._last_submit = self._clock()  # reserve the slot now; the worker submits soon
        if key is not None:
            self._queued[key] = None
            while len(self._queued) > _REMEMBERED:
                self._queued.popitem(last=False)
        return True

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._work, name="xasflow-queueserver", daemon=True
                )
                self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                rec, raw_uid, rescan_only = job
                self.submit(rec, raw_uid=raw_uid, rescan_only=rescan_only)
            except (QueueServerError, ValueError) as exc:
                self._last_submit = -float("inf")  # nothing went in: the slot is free again
                logger.warning("queueserver submission failed: %s", exc)
            except Exception:
                self._last_submit = -float("inf")
                logger.exception("queueserver submission failed")
            finally:
                self._queue.task_done()

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until every queued submission is done (tests); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # ------------------------------------------------------------------ documents

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Follow analysis runs; submit their advice at the stop (or each rescan)."""
        if self.enabled:
            self._router(name, doc)


#: Raw runs (and rescan regions) remembered as queued, so a replay does not queue them again.
_REMEMBERED = 4096


class _AdviceFollower(StreamCallback):
    """The ``recommendations`` stream of one analysis run: keeps the latest advice, submits it
    at the run's stop (``submit_on: run_end``) or at each rescan (``submit_on: rescan``)."""

    def __init__(
        self, submitter: QueueServerSubmitter, start: dict[str, Any], descriptor: dict[str, Any]
    ) -> None:
        super().__init__(start, descriptor)
        self.submitter = submitter
        self.latest: dict[str, Any] | None = None

    def event(self, doc: Any) -> Any:
        data = dict(doc.get("data") or {})
        self.latest = data
        if self.submitter.config.submit_on == "rescan" and data.get("rescan"):
            if data.get("out_of_domain"):
                self.submitter.stats["skipped_out_of_domain"] += 1
                return
            self.submitter.enqueue(data, self.raw_uid, rescan_only=True)

    def stop(self, doc: Any) -> Any:
        if self.latest is None or self.submitter.config.submit_on != "run_end":
            return
        if doc.get("exit_status") != "success":  # aborted, failed, or ended by a shutdown
            self.submitter.stats["skipped_not_success"] += 1
            return
        if self.latest.get("out_of_domain"):  # advice on an answer not to be trusted
            self.submitter.stats["skipped_out_of_domain"] += 1
            return
        self.submitter.enqueue(self.latest, self.raw_uid)


def _make_api(config: QueueServerConfig) -> Any:
    """The bluesky-queueserver-api client for the configured transport and credential."""
    try:
        if config.transport == "zmq":
            from bluesky_queueserver_api.zmq import REManagerAPI
        else:
            from bluesky_queueserver_api.http import REManagerAPI
    except ImportError as exc:
        raise QueueServerError(
            "bluesky-queueserver-api is not installed (pip install 'xasflow[queueserver]')"
        ) from exc
    if config.transport == "zmq":
        return REManagerAPI(
            zmq_control_addr=config.zmq_control_addr,
            zmq_info_addr=config.zmq_info_addr,
            zmq_public_key=_secret(config.zmq_public_key),
            timeout_recv=config.timeout_s,
            timeout_send=config.timeout_s,
        )
    api = REManagerAPI(http_server_uri=config.http_server_uri, timeout=config.timeout_s)
    if config.api_key is not None:
        api.set_authorization_key(api_key=_secret(config.api_key))
    else:
        api.set_authorization_key(token=_secret(config.token))
    return api
