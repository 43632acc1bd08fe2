"""A caproto IOC that serves the daemon's latest answer to EPICS clients.

:class:`XasIoc` runs a caproto asyncio server in its own thread (so the daemon can host it)
with these PVs under a configurable prefix (``XAS:`` below):

==================  ========  =====================================================
PV                  type      meaning
==================  ========  =====================================================
``XAS:CN``          long      latest predicted dominant coordination number
``XAS:CN_UNC``      double    its uncertainty, 1 - top cn probability
``XAS:CN_SET``      string    90 % conformal set of CN, e.g. ``4,6`` ("" if none)
``XAS:OOD``         long      1: the spectrum is out of the bundle's domain, CN not to trust
``XAS:OOD_SCORE``   double    the bundle's out-of-domain score (NaN if none)
``XAS:MOTIF``       string    top-ranked coordination motif
``XAS:DISTANCE``    double    mean nearest-neighbour distance, angstrom
``XAS:VALENCE``     long      oxidation state
``XAS:E0``          double    edge energy E0, eV
``XAS:SCAN_UID``    string    uid of the raw run the answer belongs to
``XAS:BUNDLE_ID``   string    model bundle that made it (40 characters at most)
``XAS:REGIONS``     double[]  recommended regions, ``[start, stop, step, dwell] * n``
``XAS:N_REGIONS``   long      number of regions in ``XAS:REGIONS``
``XAS:STOP_EARLY``  long      1: the recommender says the answer is already certain
``XAS:HEARTBEAT``   long      +1 every ``HEARTBEAT_PERIOD`` s while the IOC runs
``XAS:MODEL_OK``    long      1: a model is loaded and the last spectrum was analysed
``XAS:UPDATES``     long      number of answers published
==================  ========  =====================================================

An answer's uncertainty PVs are written with its CN: a bundle without conformal sets or an
out-of-domain score clears ``CN_SET`` and ``OOD_SCORE`` rather than leaving an older answer's.

Feed it with :meth:`XasIoc.publish` (a ``Prediction.to_dict()``, an analysis ``primary``
event's data, or a ``recommendations`` event's data) or subscribe the IOC itself to the
analysis documents: ``ioc(name, doc)`` follows analysis runs (an event-model ``RunRouter``
with one callback per ``primary`` and ``recommendations`` stream) and publishes their events.
Publishing never blocks: values are coalesced and written by the IOC's event loop.

Network: the IOC listens on ``host`` (default loopback) at ``port`` (UDP searches, and the
first TCP port tried). Beacons go to ``beacon_addresses``; by default, for a loopback host,
only to 127.0.0.1 (never the broadcast addresses caproto would pick from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from xasflow.adapters.routing import SafeRouter, StreamCallback, stream_factory

__all__ = ["HEARTBEAT_PERIOD", "MAX_REGIONS", "XasIoc", "XasPVGroup"]

logger = logging.getLogger(__name__)

#: Seconds between heartbeat increments.
HEARTBEAT_PERIOD = 1.0
#: Regions the waveform can hold (4 numbers each).
MAX_REGIONS = 16
_STRING_MAX = 39  # DBR_STRING holds 40 bytes with the terminator


class XasPVGroup(PVGroup):
    """The PVs (see the module docstring); values are written by :class:`XasIoc`."""

    cn = pvproperty(value=0, name="CN", read_only=True, doc="dominant coordination number")
    cn_uncertainty = pvproperty(
        value=1.0, name="CN_UNC", read_only=True, precision=3, doc="1 - top cn probability"
    )
    cn_set = pvproperty(
        value="", name="CN_SET", dtype=ChannelType.STRING, read_only=True, doc="90% CN set"
    )
    ood = pvproperty(value=0, name="OOD", read_only=True, doc="1: out of domain, do not trust")
    ood_score = pvproperty(value=math.nan, name="OOD_SCORE", read_only=True, precision=3)
    motif = pvproperty(
        value="", name="MOTIF", dtype=ChannelType.STRING, read_only=True, doc="top motif"
    )
    distance = pvproperty(value=0.0, name="DISTANCE", read_only=True, precision=3, units="angstrom")
    valence = pvproperty(value=0, name="VALENCE", read_only=True, doc="oxidation state")
    e0 = pvproperty(value=0.0, name="E0", read_only=True, precision=2, units="eV")
    scan_uid = pvproperty(value="", name="SCAN_UID", dtype=ChannelType.STRING, read_only=True)
    bundle_id = pvproperty(value="", name="BUNDLE_ID", dtype=ChannelType.STRING, read_only=True)
    regions = pvproperty(
        value=[0.0] * 4,
        name="REGIONS",
        dtype=float,
        max_length=4 * MAX_REGIONS,
        read_only=True,
        doc="[start, stop, step, dwell] * n_regions (eV, eV, eV, s)",
    )
    n_regions = pvproperty(value=0, name="N_REGIONS", read_only=True)
    stop_early = pvproperty(value=0, name="STOP_EARLY", read_only=True)
    heartbeat = pvproperty(value=0, name="HEARTBEAT", read_only=True)
    model_ok = pvproperty(value=0, name="MODEL_OK", read_only=True)
    updates = pvproperty(value=0, name="UPDATES", read_only=True)

    @heartbeat.scan(period=HEARTBEAT_PERIOD)  # type: ignore[no-redef]
    async def heartbeat(self, instance: Any, async_lib: Any) -> None:
        """Count up while the IOC's loop is alive (a stuck daemon stops the count)."""
        await instance.write((instance.value + 1) % 2_000_000_000)


#: PV attribute -> how a value is coerced before writing.
_FIELDS: dict[str, type] = {
    "cn": int,
    "cn_uncertainty": float,
    "cn_set": str,
    "ood": int,
    "ood_score": float,
    "motif": str,
    "distance": float,
    "valence": int,
    "e0": float,
    "scan_uid": str,
    "bundle_id": str,
    "regions": list,
    "n_regions": int,
    "stop_early": int,
    "model_ok": int,
}


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    f = _finite(value)
    return round(f) if f is not None else None


def values_from(data: Mapping[str, Any]) -> dict[str, Any]:
    """PV values found in a prediction dict, an analysis event's data or a recommendation row.

    Keys that are absent or None leave their PV alone. A rejected analysis event gives only
    ``model_ok = 0``.
    """
    out: dict[str, Any] = {}
    if data.get("status") == "rejected":
        return {"model_ok": 0}
    tasks = data.get("tasks")
    if isinstance(tasks, Mapping):  # Prediction.to_dict()
        cn = tasks.get("cn") or {}
        probs = cn.get("probabilities") or {}
        if cn.get("value") is not None:
            out["cn"] = _int(cn["value"])
        if probs:
            out["cn_uncertainty"] = 1.0 - max(float(p) for p in probs.values())
        cn_set = cn.get("prediction_set")
        out["cn_set"] = ",".join(_label(v) for v in cn_set) if cn_set else ""
        out["ood"] = int("out_of_domain" in (data.get("flags") or ()))
        out["ood_score"] = _finite(data.get("ood_score"))
        env = tasks.get("environment") or {}
        if env.get("value") is not None:
            out["motif"] = str(env["value"])
        for task, key in (("distance", "distance"), ("valence", "valence")):
            value = (tasks.get(task) or {}).get("value")
            if value is not None:
                out[key] = _finite(value) if key == "distance" else _int(value)
        out["model_ok"] = 1
    else:  # an analysis primary event's data (xasflow.daemon.documents.DATA_KEYS)
        if data.get("cn") is not None:
            out["cn"] = _int(data["cn"])
        if data.get("cn_probability") is not None:
            out["cn_uncertainty"] = 1.0 - float(data["cn_probability"])
        if data.get("status") == "ok":
            out["cn_set"] = str(data.get("cn_set") or "")
            out["ood"] = int(bool(data.get("out_of_domain")))
            out["ood_score"] = _finite(data.get("ood_score"))
        if data.get("motif") is not None:
            out["motif"] = str(data["motif"])
        if data.get("distance") is not None:
            out["distance"] = _finite(data["distance"])
        if data.get("valence") is not None:
            out["valence"] = _int(data["valence"])
        if data.get("status") == "ok":
            out["model_ok"] = 1
    if data.get("e0") is not None:
        out["e0"] = _finite(data["e0"])
    if data.get("bundle_id"):
        out["bundle_id"] = str(data["bundle_id"])
    waveform = data.get("waveform")
    if isinstance(waveform, str) and waveform:
        waveform = json.loads(waveform)
    if waveform is None and isinstance(data.get("regions"), list):  # Recommendation.to_dict()
        waveform = [
            float(r[k]) for r in data["regions"] for k in ("start", "stop", "step", "dwell")
        ]
    if waveform is not None:
        flat = [float(v) for v in waveform][: 4 * MAX_REGIONS]
        out["regions"] = flat
        out["n_regions"] = len(flat) // 4
    if data.get("stop_early") is not None:
        out["stop_early"] = int(bool(data["stop_early"]))
    if "ood" in out and out.get("ood_score") is None:
        out["ood_score"] = math.nan  # an answer without a score clears the previous one
    return {k: v for k, v in out.items() if v is not None}


def _label(value: Any) -> str:
    """A class label as text (4.0 -> "4")."""
    f = _finite(value) if not isinstance(value, str) else None
    return str(round(f)) if f is not None and f == round(f) else str(value)


class _BeaconSocket:
    """An unconnected UDP socket for beacons: no ICMP 'refused' errors when nobody listens."""

    def __init__(self, address: tuple[str, int]) -> None:
        import socket

        self.address = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.sock.setblocking(False)

    async def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a beacon is best effort
            self.sock.sendto(data, self.address)

    def close(self) -> None:
        self.sock.close()


class _Context:
    """Factory for a caproto asyncio server Context with our port and beacon addresses."""

    @staticmethod
    def create(
        pvdb: dict[str, Any],
        host: str,
        port: int,
        beacons: Sequence[tuple[str, int]] | None,
    ) -> Any:
        from caproto.asyncio.server import Context

        class XasContext(Context):
            async def broadcast_beacon_loop(self) -> None:
                """Send beacons only where configured (the env default is broadcast)."""
                if beacons is not None:
                    for _, sock in list(self.beacon_socks.values()):
                        sock.close()
                    self.beacon_socks.clear()
                    for address in beacons:
                        self.beacon_socks[address] = (host, _BeaconSocket(address))
                await super().broadcast_beacon_loop()

        ctx = XasContext(pvdb, interfaces=[host])
        ctx.ca_server_port = int(port)
        return ctx


class XasIoc:
    """The daemon's IOC: ``start()``, ``publish(...)`` from any thread, ``stop()``."""

    def __init__(
        self,
        prefix: str = "XAS:",
        host: str = "127.0.0.1",
        port: int = 5064,
        *,
        beacon_addresses: Sequence[tuple[str, int]] | None = None,
        beacon_port: int = 5065,
    ) -> None:
        """``beacon_addresses`` None: 127.0.0.1 for a loopback host, else caproto's default."""
        if not prefix:
            raise ValueError("an IOC needs a PV prefix")
        self.prefix = prefix
        self.host = host
        self.port = int(port)
        if beacon_addresses is None and (host.startswith("127.") or host == "localhost"):
            beacon_addresses = [("127.0.0.1", int(beacon_port))]
        self.beacon_addresses = None if beacon_addresses is None else list(beacon_addresses)
        self.group = XasPVGroup(prefix=prefix)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[Any] | None = None
        self._ctx: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._flush_scheduled = False
        self.published = 0
        self._router = SafeRouter(
            [
                stream_factory(
                    {
                        "primary": lambda start, desc: _PrimaryFeed(self, start, desc),
                        "recommendations": lambda start, desc: _AdviceFeed(self, start, desc),
                    }
                )
            ],
            f"IOC {prefix}",
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def pvnames(self) -> list[str]:
        """Every PV the IOC serves."""
        return list(self.group.pvdb)

    def pv(self, attr: str) -> str:
        """The full PV name of a field (``"cn"`` -> ``"XAS:CN"``)."""
        return getattr(self.group, attr).pvname

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def tcp_port(self) -> int | None:
        """The TCP port the server listens on (None before it does)."""
        return None if self._ctx is None else self._ctx.port

    def start(self, timeout: float = 10.0) -> XasIoc:
        """Start serving in a daemon thread; returns once listening (raises if it cannot)."""
        if self.running:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name=f"xasflow-ioc-{self.prefix}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"IOC {self.prefix} did not start within {timeout} s")
        if self._error is not None:
            err = self._error
            self.stop()
            raise RuntimeError(f"IOC {self.prefix} failed to start: {err}") from err
        logger.info("IOC %s serving on %s:%s", self.prefix, self.host, self.port)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # recorded for start(); the thread just ends
            if not self._ready.is_set():
                self._error = exc
            else:
                logger.exception("IOC %s stopped with an error", self.prefix)
        finally:
            self._ready.set()
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._ctx = _Context.create(self.group.pvdb, self.host, self.port, self.beacon_addresses)

        async def started(async_lib: Any) -> None:
            self._ready.set()

        self._task = asyncio.ensure_future(self._ctx.run(startup_hook=started))
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and join its thread (idempotent)."""
        loop, thread, task = self._loop, self._thread, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.error("IOC %s thread did not stop within %s s", self.prefix, timeout)
        self._thread = self._task = self._loop = None
        self._ctx = None

    def __enter__(self) -> XasIoc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ publishing

    def publish(self, data: Mapping[str, Any], scan_uid: str | None = None) -> None:
        """Update the PVs from a prediction dict / analysis event data / recommendation row."""
        values = values_from(data)
        if scan_uid is not None:
            values["scan_uid"] = scan_uid
        if any(k in values for k in ("cn", "e0", "motif")):
            values["updates"] = None  # marker: count one answer
        self._submit(values)

    def set_model_ok(self, ok: bool) -> None:
        """Set the model-OK flag (the service: a bundle is loaded, or none is)."""
        self._submit({"model_ok": int(bool(ok))})

    def _submit(self, values: dict[str, Any]) -> None:
        if not values:
            return
        with self._lock:
            if "updates" in values:
                self.published += 1
                values["updates"] = self.published
            self._pending.update(values)
            if self._flush_scheduled:
                return
            loop = self._loop
            if loop is None or loop.is_closed() or not self._ready.is_set():
                return  # kept pending; written at the next publish after start
            self._flush_scheduled = True
        try:
            asyncio.run_coroutine_threadsafe(self._flush(), loop)
        except RuntimeError:
            with self._lock:
                self._flush_scheduled = False

    def flush(self, timeout: float = 5.0) -> None:
        """Write pending values now and wait for it (tests; the daemon needs not call it)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._flush(), loop).result(timeout)

    async def _flush(self) -> None:
        with self._lock:
            values, self._pending = self._pending, {}
            self._flush_scheduled = False
        for attr, value in values.items():
            prop = getattr(self.group, attr)
            if attr in ("motif", "scan_uid", "bundle_id", "cn_set"):
                value = str(value)[:_STRING_MAX]
            elif attr == "regions":
                value = list(value) if value else [0.0] * 4
            try:
                await prop.write(value)
            except Exception:  # one bad value must not stop the others
                logger.exception("IOC %s: cannot write %r to %s", self.prefix, value, attr)

    # ------------------------------------------------------------------ documents

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Follow analysis-run documents: primary and recommendations events update the PVs."""
        self._router(name, doc)


class _PrimaryFeed(StreamCallback):
    """The ``primary`` stream of one analysis run: answers to the PVs, model trouble to MODEL_OK."""

    def __init__(self, ioc: XasIoc, start: dict[str, Any], descriptor: dict[str, Any]) -> None:
        super().__init__(start, descriptor)
        self.ioc = ioc

    def event(self, doc: Any) -> Any:
        data = doc.get("data") or {}
        if data.get("status") == "ok":
            self.ioc.publish(data, scan_uid=self.raw_uid)
        elif data.get("reason") in ("no_model", "prediction_error"):
            self.ioc.set_model_ok(False)


class _AdviceFeed(StreamCallback):
    """The ``recommendations`` stream of one analysis run: regions and stop-early to the PVs."""

    def __init__(self, ioc: XasIoc, start: dict[str, Any], descriptor: dict[str, Any]) -> None:
        super().__init__(start, descriptor)
        self.ioc = ioc

    def event(self, doc: Any) -> Any:
        self.ioc.publish(doc.get("data") or {})
