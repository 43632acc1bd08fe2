"""Run assembly: turn interleaved Bluesky document streams into raw spectra (energy + channels).

``RunAssembler.feed(name, doc)`` takes already-decoded documents from any number of
interleaved runs and returns outputs: ``RunOpened``, ``SpectrumReady``, ``Rejected`` and
``RunClosed``. Routing is event-model's ``RunRouter`` (one ``DocumentRouter`` per run);
this module adds validation in front of it so no document can raise or corrupt its state.

Contract, per run uid: one ``RunOpened`` (sent when the first descriptor of the configured
stream arrives, or just before ``RunClosed`` if none ever does, so ``kind`` is known), then
any number of ``SpectrumReady`` / ``Rejected``, then one ``RunClosed``. Every run yields at
least one spectrum or rejection, except a fly scan closed by timeout after spectra were sent.

Scan kinds, from the configured stream's descriptor (``ChannelMap.stream``, "primary"):

* **step**: the energy data key is a scalar (``shape == []``); one point per event; the
  spectrum is built at the stop, points sorted by seq_num. A stop with an exit status other
  than "success" rejects it (``incomplete_run``); a run with no stop is rejected
  (``missing_stop``) by ``check_timeouts`` / ``flush_all``.
* **fly** (quick-XAS): the energy key has ``shape [N]``; each event (each row of an
  event_page) is a whole spectrum, emitted at once. If the energy array is not a data key
  but sits in the descriptor's ``configuration`` (any object, key from ``ChannelMap.energy``)
  as a 1-D array, it is used for every event of that descriptor. Energies may be
  descending (up/down quick-XAS); they are passed on as measured.

Energy data keys with ``units`` "keV" are scaled to eV. Non-finite points (in the energy or
a required channel) are dropped with flag ``nonfinite_dropped``; an optional channel with
non-finite values at kept points is dropped with flag ``channel_dropped``; nothing finite
left is ``nan_data``. Other streams (baseline, monitors) are ignored.

Element/edge come from the start document, first match wins: top-level ``element`` /
``edge``; ``XDI`` as nested ``{"Element": {"symbol", "edge"}}`` (event-model's start schema
forbids dots in keys, so XDI's ``Element.symbol`` must be nested; a flat dotted key from a
producer that skips validation is still read); ``sample`` as a dict with ``element`` / ``edge``.
An ``edge`` like "Cu-K", "Cu_K" or "Cu K" supplies both. Symbols are capitalised, edges
upper-cased; anything else gives None.

Sequence numbers are checked per descriptor (a second descriptor of the same stream may
continue the stream's numbering or restart at 1). A jump is a gap: counted in
``RunClosed.seq_gaps`` (occurrences) and ``RunClosed.missing_events`` (skipped numbers,
including trailing ones revealed by the stop's ``num_events``: a value that is not a count,
or that claims more than ``MAX_STOP_MISSING`` missing, is refused as ``malformed_document``
and adds nothing, see :mod:`xasflow.adapters.stop_claims`), and flagged ``seq_gap`` on
the fly spectrum that arrived after it or on the step spectrum. Events the daemon's own
input queue dropped (``RunAssembler.dropped``) are missing too; ``RunClosed.dropped_events``
says how many of ``missing_events`` they are (lost as ``overflow``, not ``seq_gap``). A
repeated seq_num is ``Rejected(duplicate_event)``, except a step point read anew: bluesky's
rewind (a suspender tripped) takes points again under their seq_nums, and the new readings
replace the old (flagged ``points_retaken``). An earlier number arriving late is flagged
``seq_disorder``.
A step run whose descriptors name different detectors takes the newest mode whose channels
every point has.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard, cast

from xasflow.adapters.routing import make_run_router, page_of
from xasflow.daemon.assembly_drops import _Held
from xasflow.daemon.assembly_run import _Run
from xasflow.daemon.assembly_stream import _Bad
from xasflow.daemon.channels import ChannelMap
from xasflow.daemon.outputs import (
    ExitStatus,
    Output,
    Rejected,
    RunClosed,
    RunOpened,
    ScanSpectrum,
    SpectrumReady,
)

__all__ = [
    "REASONS",
    "ChannelMap",
    "Output",
    "Rejected",
    "RunAssembler",
    "RunClosed",
    "RunOpened",
    "ScanSpectrum",
    "SpectrumReady",
]

logger = logging.getLogger(__name__)

#: Every ``Rejected.reason`` this module produces.
REASONS: frozenset[str] = frozenset(
    {
        "malformed_document",  # wrong type, missing/ill-typed field, unknown document name
        "duplicate_start",  # a start whose uid is open or recently closed
        "unknown_run",  # descriptor or stop for a run never started
        "unknown_descriptor",  # event/event_page for a descriptor never seen
        "late_document",  # document for a run already closed (stop, timeout or flush)
        "missing_channel",  # energy, I0 or the mode's signal channel absent
        "length_mismatch",  # fly arrays of different lengths
        "nan_data",  # nothing finite left after dropping non-finite points
        "duplicate_event",  # a seq_num seen before in this descriptor
        "empty_run",  # a run that ended with no data in the configured stream
        "incomplete_run",  # step scan stopped with exit_status abort/fail
        "missing_stop",  # step scan closed by timeout or shutdown: completeness unknown
        "too_many_points",  # a step run past MAX_STEP_POINTS (a monitoring count): not kept
        "internal_error",  # a bug here; the document is dropped, the daemon goes on
    }
)

_PASSIVE = frozenset(
    {"resource", "datum", "datum_page", "stream_resource", "stream_datum", "bulk_datum"}
)
_MEMORY = 10_000  # closed run / descriptor uids remembered, to tell late documents apart


def _is_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value)


class RunAssembler:
    """Assemble spectra from interleaved Bluesky documents; ``feed`` never raises.

    Not thread-safe: call ``feed``, ``check_timeouts`` and ``flush_all`` from one thread.
    """

    def __init__(
        self,
        channels: ChannelMap | None = None,
        run_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        start_wait: float | None = None,
    ) -> None:
        """``start_wait``: how long input-queue drops held for a run not open here wait for
        its start (see :meth:`dropped`); ``run_timeout`` when None."""
        if run_timeout <= 0:
            raise ValueError("run_timeout must be > 0")
        self.channels = channels if channels is not None else ChannelMap()
        self.run_timeout = float(run_timeout)
        self.start_wait = self.run_timeout if start_wait is None else float(start_wait)
        if self.start_wait <= 0:
            raise ValueError("start_wait must be > 0")
        self.clock = clock
        self._now = clock()
        self._out: list[Output] = []
        self._runs: dict[str, _Run] = {}
        self._descriptors: dict[str, _Run] = {}
        self._closed_runs: OrderedDict[str, str] = OrderedDict()
        self._closed_descriptors: OrderedDict[str, str] = OrderedDict()
        #: input-queue drops of descriptors not fed yet (still queued); see :meth:`dropped`
        self._early = _Held(_MEMORY)
        self._router = make_run_router([self._factory])
        #: Called once for each run whose closing hit a bug (the daemon counts it).
        self.on_error: Callable[[], None] | None = None

    @property
    def early_drops_forgotten(self) -> int:
        """Rows of input-queue drops held here that were forgotten for want of room, or given
        up when their run's start did not come within ``start_wait`` (see :meth:`dropped`);
        exported as ``xasflow_drop_records_forgotten_total`` (a loss's cause, not a loss)."""
        return self._early.forgotten

    @property
    def drops_held(self) -> int:
        """Event rows of input-queue drops held for descriptors not fed yet (see
        :meth:`dropped`)."""
        return self._early.rows

    @property
    def open_runs(self) -> int:
        """Runs started and not yet closed."""
        return len(self._runs)

    def is_open(self, raw_uid: str) -> bool:
        """Whether a run of this uid is open here."""
        return raw_uid in self._runs

    def _factory(self, name: str, doc: dict) -> tuple[list, list]:
        run = _Run(self, doc)
        self._runs[run.uid] = run
        return [run], []

    # ------------------------------------------------------------------ public API

    def feed(self, name: str, doc: dict) -> list[Output]:
        """Take one document; return what it completed, opened, rejected or closed."""
        out: list[Output] = []
        self._out = out
        self._now = self.clock()
        try:
            self._feed(name, doc)
        except Exception as exc:  # _Bad, or a bug / unforeseen document: never stop the daemon
            if isinstance(exc, _Bad):
                reason, detail = exc.reason, exc.detail
            else:
                reason, detail = "internal_error", f"{name!r}: {type(exc).__name__}: {exc}"
            uid = self._uid_hint(name, doc)
            out.append(Rejected(uid, None, reason, detail))
            run = self._runs.get(uid) if uid is not None else None
            if run is not None:
                run.n_rejected += 1
        self._out = []
        return out

    def dropped(self, descriptor: Any, seqs: list[Any], run_start: str | None) -> None:
        """Event rows the input queue dropped (``ZmqDocumentSource.dropped_events``): their
        holes in the run's sequence count in ``RunClosed.dropped_events`` too, so the loss
        is counted once (``overflow``), not again as ``seq_gap``.

        A descriptor not fed yet waits in the queue: its rows are held until it is fed (or
        refused), or until ``run_start``, the run the input queued it for, closes here
        (then it could only come late). ``run_start`` None: the input does not queue it
        (never did, or evicted it), so it never comes and nothing is held. A run open here
        keeps its own until it closes; those of a run not open here (its start still
        queued, or lost: its descriptor then refused as ``unknown_run``) are given up by
        :meth:`check_timeouts` once held ``start_wait`` without its start opening the run;
        past ``_MEMORY`` descriptors held the oldest of them goes at once, and past
        :data:`~xasflow.daemon.assembly_drops.ROWS_HELD` rows held (a flood of one run's
        drops) the largest. Either way their rows are counted in ``early_drops_forgotten``
        (/metrics) and logged: they are lost as ``overflow`` already, and only if their run
        still comes do they count as ``seq_gap`` too."""
        if not _is_str(descriptor) or descriptor in self._closed_descriptors:
            return
        run = self._descriptors.get(descriptor)
        if run is not None:
            run.dropped(descriptor, seqs)
        elif _is_str(run_start) and run_start not in self._closed_runs:
            self._early.add(descriptor, run_start, seqs, self.clock(), self.is_open)

    def check_timeouts(self, now: float | None = None) -> list[Output]:
        """Close runs with no document for longer than ``run_timeout`` (exit_status "timeout")."""
        out: list[Output] = []
        self._out = out
        self._now = self.clock() if now is None else now
        for run in list(self._runs.values()):
            idle = self._now - run.last_seen
            if idle > self.run_timeout:
                self._abandon(run, "timeout", f"no document for {idle:.1f} s")
        self._early.give_up(self._now, self.start_wait, self.is_open)
        self._out = []
        return out

    def abandon(self, raw_uid: str, reason: str, *, replayable: bool = False) -> list[Output]:
        """Close one open run without its stop (exit_status "abort"); nothing if not open.

        ``replayable``: its documents may come again from its start (a Kafka partition
        handed over, which may come back to this daemon): its uids are forgotten instead of
        kept for late documents, so a replay opens the run afresh.
        """
        out: list[Output] = []
        self._out = out
        self._now = self.clock()
        run = self._runs.get(raw_uid)
        if run is not None:
            self._abandon(run, "abort", reason, replayable)
            if replayable:
                self._closed_runs.pop(raw_uid, None)
                for desc in (*run.streams, *run.ignored):
                    self._closed_descriptors.pop(desc, None)
        self._out = []
        return out

    def flush_all(self, reason: str, replayable: bool = False) -> list[Output]:
        """Close every open run (exit_status "abort"), e.g. at shutdown; ``replayable``: as
        :meth:`abandon`'s (a Kafka input delivers them again from their start)."""
        out: list[Output] = []
        self._out = out
        self._now = self.clock()
        for run in list(self._runs.values()):
            self._abandon(run, "abort", reason, replayable)
        self._out = []
        return out

    # ------------------------------------------------------------------ internals

    def _feed(self, name: Any, doc: Any) -> None:
        if not isinstance(name, str):
            raise _Bad("malformed_document", f"document name {name!r} is not a string")
        if not isinstance(doc, Mapping):
            raise _Bad("malformed_document", f"{name} document is a {type(doc).__name__}")
        if name == "event" or name == "event_page":
            self._event(name, doc)
        elif name == "descriptor":
            self._descriptor(doc)
        elif name == "start":
            self._start(doc)
        elif name == "stop":
            self._stop(doc)
        elif name in _PASSIVE:
            return  # external data is never filled here; events that need it are rejected
        else:
            raise _Bad("malformed_document", f"unknown document name {name!r}")

    def _start(self, doc: Mapping) -> None:
        uid = doc.get("uid")
        if not _is_str(uid):
            raise _Bad("malformed_document", f"start without a string uid: {uid!r}")
        if uid in self._runs or uid in self._closed_runs:
            state = "open" if uid in self._runs else "already closed"
            self._out.append(Rejected(uid, None, "duplicate_start", f"run {uid} is {state}"))
            return
        try:
            self._router("start", dict(doc))
        except Exception:
            if uid not in self._runs:  # the router holds a start no run took until its stop,
                let_go = {"run_start": uid, "uid": "", "time": 0.0, "exit_status": "abort"}
                self._router.stop(cast(Any, let_go))  # which never comes: let it go now
            raise

    def _descriptor(self, doc: Mapping) -> None:
        uid, run_uid = doc.get("uid"), doc.get("run_start")
        early = self._early.take(uid) if _is_str(uid) else None  # refused: let go too
        if not _is_str(uid) or not _is_str(run_uid):
            raise _Bad("malformed_document", "descriptor needs string uid and run_start")
        run = self._run_for(run_uid, "descriptor")
        if not isinstance(doc.get("data_keys"), Mapping):
            raise _Bad("malformed_document", f"descriptor {uid} has no data_keys mapping")
        if uid in self._descriptors or uid in self._closed_descriptors:
            raise _Bad("malformed_document", f"descriptor {uid} seen before")
        run.last_seen = self._now
        self._descriptors[uid] = run
        self._router("descriptor", cast(dict, doc))
        if early:
            run.dropped(uid, early)

    def _event(self, name: str, doc: Mapping) -> None:
        desc = doc.get("descriptor")
        if not _is_str(desc):
            raise _Bad("malformed_document", f"{name} without a string descriptor")
        run = self._descriptors.get(desc)
        if run is None:
            if desc in self._closed_descriptors:
                run_uid = self._closed_descriptors[desc]
                raise _Bad("late_document", f"{name} for run {run_uid}, already closed")
            raise _Bad("unknown_descriptor", f"{name} refers to unknown descriptor {desc}")
        for key in ("uid", "time", "seq_num", "data", "timestamps"):
            if key not in doc:
                raise _Bad("malformed_document", f"{name} lacks {key!r}")
        if not isinstance(doc["data"], Mapping) or not isinstance(doc["timestamps"], Mapping):
            raise _Bad("malformed_document", f"{name} data/timestamps must be mappings")
        run.last_seen = self._now
        if desc in run.ignored:
            return  # another stream: not routed at all
        if name == "event":
            # What RunRouter would do (it routes only pages), minus its pack/unpack overhead.
            self._router.event_page(page_of(doc))  # type: ignore[arg-type]
        elif self._page_length(doc):
            self._router("event_page", cast(dict, doc))

    @staticmethod
    def _page_length(doc: Mapping) -> int:
        try:
            n = len(doc["uid"])
            ok = len(doc["time"]) == n and len(doc["seq_num"]) == n
            ok = ok and all(len(col) == n for col in doc["data"].values())
        except TypeError:
            raise _Bad("malformed_document", "event_page columns must be sequences") from None
        if not ok:
            raise _Bad("malformed_document", "event_page columns have different lengths")
        return n

    def _stop(self, doc: Mapping) -> None:
        run_uid = doc.get("run_start")
        if not _is_str(run_uid):
            raise _Bad("malformed_document", "stop without a string run_start")
        self._run_for(run_uid, "stop")
        self._router("stop", cast(dict, doc))

    def _run_for(self, run_uid: str, what: str) -> _Run:
        run = self._runs.get(run_uid)
        if run is not None:
            return run
        if run_uid in self._closed_runs:
            status = self._closed_runs[run_uid]
            raise _Bad("late_document", f"{what} for run {run_uid}, closed ({status})")
        raise _Bad("unknown_run", f"{what} refers to unknown run {run_uid}")

    def _abandon(
        self, run: _Run, status: ExitStatus, reason: str, replayable: bool = False
    ) -> None:
        """Close ``run`` without its stop; a bug doing so still closes it ("fail", reason
        "internal_error: <error>"), so it is not held open and the runs after it still close."""
        try:
            run.abandon(status, reason, replayable)
        except Exception as exc:
            logger.exception("closing run %r (%s) failed", run.uid, reason)
            if self.on_error is not None:
                self.on_error()
            if not any(isinstance(o, RunClosed) and o.raw_uid == run.uid for o in self._out):
                why = f"internal_error: {type(exc).__name__}: {exc}"
                self._out.append(RunClosed(run.uid, "fail", why, run.n_spectra, run.n_rejected, 0))
            run.closed = True  # its stop, given to the RunRouter by _forget, is ignored
            self._runs.pop(run.uid, None)
            try:
                self._forget(run, "fail", via_stop=False)
            except Exception:
                logger.exception("forgetting run %r failed", run.uid)

    def _forget(self, run: _Run, status: str, *, via_stop: bool) -> None:
        """Drop a closed run here and in the RunRouter; remember its uids for late documents."""
        self._runs.pop(run.uid, None)
        self._remember(self._closed_runs, run.uid, status)
        self._early.take_run(run.uid)  # never fed: it would be late
        for desc in (*run.streams, *run.ignored):
            self._descriptors.pop(desc, None)
            self._remember(self._closed_descriptors, desc, run.uid)
        if not via_stop:
            # RunRouter frees a run's state only on its stop, so give it one; the run is
            # closed already, so its own stop() ignores it.
            stop = {"run_start": run.uid, "uid": "", "time": 0.0, "exit_status": status}
            self._router.stop(stop)  # type: ignore[arg-type]

    @staticmethod
    def _remember(memory: OrderedDict[str, str], key: str, value: str) -> None:
        memory[key] = value
        while len(memory) > _MEMORY:
            memory.popitem(last=False)

    def _uid_hint(self, name: Any, doc: Any) -> str | None:
        """The raw run uid a (possibly broken) document belongs to, when it can be told."""
        try:
            if name == "start":
                uid = doc.get("uid")
            elif name in ("event", "event_page"):
                desc = doc.get("descriptor")
                run = self._descriptors.get(desc)
                uid = run.uid if run is not None else self._closed_descriptors.get(desc)
            else:
                uid = doc.get("run_start")
        except Exception:
            return None
        return uid if isinstance(uid, str) else None
