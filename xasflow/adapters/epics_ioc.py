"""A caproto IOC that serves the daemon's latest answer to EPICS clients.

:class:`XasIoc` runs a caproto asyncio server in its own thread (so the daemon can host it)
with the PVs of :mod:`xasflow.adapters.epics_pvs` under a configurable prefix (``XAS:``).

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
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from caproto import AlarmSeverity, AlarmStatus

from xasflow.adapters.epics_advice import AdviceRuns
from xasflow.adapters.epics_network import ServerContext, served_by
from xasflow.adapters.epics_pvs import (
    ADVICE_KEYS,
    ANSWER_PVS,
    COUNT_WRAP,
    DOUBT_PVS,
    HEARTBEAT_PERIOD,
    MAX_REGIONS,
    NO_ADVICE,
    OUT_OF_DOMAIN,
    REGIONS_ADVISED,
    STRING_PVS,
    UNDEFINED,
    XasPVGroup,
    string_value,
    values_from,
)
from xasflow.adapters.routing import SafeRouter, StreamCallback, stream_factory

__all__ = ["HEARTBEAT_PERIOD", "MAX_REGIONS", "XasIoc", "XasPVGroup"]

logger = logging.getLogger(__name__)


#: The alarm of a value not to be trusted (an out-of-domain answer, or the advice after one).
_MAJOR = {"status": AlarmStatus.STATE, "severity": AlarmSeverity.MAJOR_ALARM}
_NO_ALARM = {"status": AlarmStatus.NO_ALARM, "severity": AlarmSeverity.NO_ALARM}
#: The alarm of a PV without a value: the answer has none for it, or none came yet.
_UNDEFINED_ALARM = {"status": AlarmStatus.UDF, "severity": AlarmSeverity.INVALID_ALARM}
#: The value written for UNDEFINED: the answer PVs' placeholders, and those of the PVs beside
#: them (before the first answer, as after a restart, OOD 0 must not read as "in domain").
_PLACEHOLDERS: dict[str, Any] = {**ANSWER_PVS, "cn_set": "", "ood": 0, "ood_score": math.nan}
#: In a pending write: the advice PVs' alarm (True MAJOR, False none); not a PV.
_ADVICE_DOUBT = "_advice_out_of_domain"


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
        # nothing answered yet (a daemon just started): each answer PV, and OOD and the set
        # beside them, in INVALID alarm until the first answer, as an EPICS record before it
        # is processed (UDF); before, CN 0 and E0 0.0 read as an answer with no alarm
        self._pending: dict[str, Any] = dict.fromkeys(_PLACEHOLDERS, UNDEFINED)
        self._flush_scheduled = False
        self.published = 0
        #: Which run the advice PVs belong to (:mod:`xasflow.adapters.epics_advice`); its
        #: lock is held around each decision and the write it leads to.
        self._advice = AdviceRuns()
        self._advice_lock = threading.Lock()
        self.advice_dropped = 0  # advice of a run other than the current one, not written
        self.regions_cut = 0  # advice written with more regions than REGIONS holds
        self._cut_logged: str | None = None  # the last run whose cut advice was logged
        self._router = SafeRouter(
            [
                stream_factory(
                    {
                        "primary": lambda start, desc: _PrimaryFeed(self, start, desc),
                        "recommendations": lambda start, desc: _AdviceFeed(self, start, desc),
                    },
                    on_run=self._run_started,
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
        probe = self.pv("bundle_id")
        other = served_by(probe, self.host, self.port)
        if other is not None:
            raise RuntimeError(
                f"{probe} is already served by {other}: another IOC uses the prefix {self.prefix}"
            )
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
        await self._flush()  # what came before the server (the UDF above): no client yet
        self._ctx = ServerContext.create(
            self.group.pvdb, self.host, self.port, self.beacon_addresses
        )

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
        with self._advice_lock:  # publish_advice counts cuts under it too
            self._note_cut(values.pop(REGIONS_ADVISED, None), scan_uid)
        if scan_uid is not None:
            values["scan_uid"] = scan_uid
        if any(k in values for k in ("cn", "e0", "motif")):
            values["updates"] = None  # marker: count one answer
        self._submit(values)

    def publish_advice(self, data: Mapping[str, Any], raw_uid: str | None) -> None:
        """Update the advice PVs (regions, stop-early) from a recommendation row of
        ``raw_uid``'s analysis; not an answer (``UPDATES`` and ``E0`` stay).

        Written only while ``raw_uid`` is the run the advice PVs belong to: advice of a run
        that a later raw start superseded (its last spectra analysed after that start) is
        dropped (``advice_dropped``). ``ADVICE_BUNDLE`` names the advice's bundle (the row's
        ``bundle_id``). Advice that follows an out-of-domain answer is withheld:
        no regions, ``STOP_EARLY`` 0, and the advice PVs in ``MAJOR`` alarm (as the answer
        PVs are beside ``OOD``), so a plan following the PVs never chases a guess.
        """
        parsed = values_from(data)
        values = {k: v for k, v in parsed.items() if k in ADVICE_KEYS}
        if not values:
            return
        with self._advice_lock:
            if not self._advice.may_advise(raw_uid or ""):
                self.advice_dropped += 1
                return
            doubt = bool(data.get("out_of_domain"))
            if doubt:
                values = dict(NO_ADVICE)
            else:
                self._note_cut(parsed.get(REGIONS_ADVISED), raw_uid)
            bundle = str(data.get("bundle_id") or "")  # not BUNDLE_ID's: another run's, maybe
            self._submit(
                {
                    **values,
                    _ADVICE_DOUBT: doubt,
                    "advice_uid": raw_uid or "",
                    "advice_bundle": bundle,
                }
            )

    def _note_cut(self, advised: int | None, raw_uid: str | None) -> None:
        """Advice of ``advised`` regions is written cut to the first :data:`MAX_REGIONS`:
        counted, and logged once per run (the run's later advice is cut alike). Called with
        ``_advice_lock`` held: the writers of the documents and of the advice race here."""
        if advised is None:
            return
        self.regions_cut += 1
        if raw_uid != self._cut_logged:
            self._cut_logged = raw_uid
            logger.warning(
                "IOC %s: advice of run %s has %d regions; REGIONS holds the first %d, %d left "
                "out (not logged again for this run)",
                self.prefix,
                raw_uid,
                advised,
                MAX_REGIONS,
                advised - MAX_REGIONS,
            )

    def _run_started(self, start: dict[str, Any]) -> list[Any]:
        """An analysis run starts: no advice for it yet (the last run's is cleared), unless
        a later raw start has superseded it (:class:`AdviceRuns`). Its stop is followed."""
        raw_uid = str(start.get("raw_uid") or "")
        with self._advice_lock:
            if self._advice.analysis_start(raw_uid):
                self._clear_advice(raw_uid)

        def at_stop(name: str, doc: Any) -> None:
            if name == "stop":
                self._run_ended(raw_uid)

        return [at_stop]

    def _run_ended(self, raw_uid: str) -> None:
        """A run ended (its stop, or closed as timed out): if the advice PVs are its, STOP_EARLY
        goes to 0, as a run over cannot stop early; left 1, it read as "stop" to a run still
        scanning beside it, and to the next scan until its raw start was read. The regions,
        advice for the next scan, and ADVICE_UID stay."""
        with self._advice_lock:
            if self._advice.current == raw_uid:
                self._submit({"stop_early": 0})

    def raw_run_started(self, raw_uid: str) -> None:
        """A raw run starts scanning (the daemon's raw-start hook, once the assembler opened
        the run and before its first result opens its analysis run): the last run's advice is
        cleared now, and none of it is written after, so a plan watching STOP_EARLY never
        stops this scan on the last one's certainty."""
        with self._advice_lock:
            self._advice.raw_start(raw_uid)
            self._clear_advice(raw_uid)

    def _clear_advice(self, raw_uid: str) -> None:
        self._submit(
            {**NO_ADVICE, _ADVICE_DOUBT: False, "advice_uid": raw_uid, "advice_bundle": ""}
        )

    def report_rejection(self, reason: str, raw_uid: str | None) -> None:
        """STATUS says the last spectrum was rejected and why; the answer PVs keep the last
        answer (SCAN_UID names its run), so a client tells a new answer from an old one.
        STOP_EARLY is withdrawn (0) when the run is the advice's: "in a row" has restarted."""
        run = f" ({raw_uid[:8]})" if raw_uid else ""
        with self._advice_lock:
            withdraw = {"stop_early": 0} if self._advice.is_current(raw_uid) else {}
            self._submit({"status": f"rejected {reason}{run}", **withdraw})

    def set_model_ok(self, ok: bool) -> None:
        """Set the model-OK flag (the service: a bundle is loaded, or none is)."""
        self._submit({"model_ok": int(bool(ok))})

    def _submit(self, values: dict[str, Any]) -> None:
        if not values:
            return
        with self._lock:
            if "updates" in values:
                self.published += 1
                values["updates"] = self.published % COUNT_WRAP  # as HEARTBEAT
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
        doubt = values.get("ood") == 1  # out of domain: every answer PV in MAJOR alarm
        advice_doubt = values.pop(_ADVICE_DOUBT, None)  # None: the advice alarm stays
        for attr, value in values.items():
            prop = getattr(self.group, attr)
            alarm: dict[str, Any] = {}
            if attr in ADVICE_KEYS and advice_doubt is not None:
                alarm = _MAJOR if advice_doubt else _NO_ALARM
            if attr in DOUBT_PVS and "ood" in values:  # an answer: its doubt, or none
                alarm = _MAJOR if doubt else _NO_ALARM
            if attr in ANSWER_PVS:
                alarm = _MAJOR if doubt else _NO_ALARM
            if attr == "status":  # its own text: an answer out of domain, or none
                alarm = _MAJOR if value == OUT_OF_DOMAIN else _NO_ALARM
            if value is UNDEFINED:  # the answer has no value for it, or no answer came yet
                value, alarm = _PLACEHOLDERS[attr], _UNDEFINED_ALARM
            if attr in STRING_PVS:  # 39 latin-1 characters, a cut one ending with "~"
                value = string_value(attr, value)
            elif attr == "regions":
                value = list(value) if value else [0.0] * 4
            try:
                if alarm:  # first, unpublished: the value's write publishes it with the value
                    await prop.alarm.write(**alarm, publish=False)
                # no limit check (none set): caproto's would reset the alarm to NO_ALARM
                await prop.write(value, verify_value=not alarm)
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
            return
        self.ioc.report_rejection(str(data.get("reason") or "unknown"), self.raw_uid)
        if data.get("reason") in ("no_model", "prediction_error"):
            self.ioc.set_model_ok(False)


class _AdviceFeed(StreamCallback):
    """The ``recommendations`` stream of one analysis run: regions and stop-early to the PVs."""

    def __init__(self, ioc: XasIoc, start: dict[str, Any], descriptor: dict[str, Any]) -> None:
        super().__init__(start, descriptor)
        self.ioc = ioc

    def event(self, doc: Any) -> Any:
        self.ioc.publish_advice(doc.get("data") or {}, self.raw_uid)
