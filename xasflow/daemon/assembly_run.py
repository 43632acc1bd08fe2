"""One raw run being assembled (``_Run``, a per-run event-model ``DocumentRouter``): rows to
spectra, stop and close; the rules are in :mod:`xasflow.daemon.assembly`, how a descriptor
resolves into per-descriptor state is in :mod:`xasflow.daemon.assembly_stream`, the sequence
checks in :mod:`xasflow.daemon.assembly_seq`, and how values are read off the documents in
:mod:`xasflow.daemon.assembly_values`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from event_model import DocumentRouter

from xasflow.adapters.stop_claims import claimed_missing, stop_event_count
from xasflow.daemon.assembly_seq import _REPEAT, _SEQ_LIMIT, _note_dropped, _seq_flags, _seq_stats
from xasflow.daemon.assembly_stream import _CHANNELS, _Bad, _resolve, _Stream, _vector
from xasflow.daemon.assembly_values import _element_edge, _finite, _scalar
from xasflow.daemon.outputs import (
    ExitStatus,
    Kind,
    Output,
    Rejected,
    RunClosed,
    RunOpened,
    ScanSpectrum,
    SpectrumReady,
)

if TYPE_CHECKING:
    from xasflow.daemon.assembly import RunAssembler

__all__: list[str] = []  # internal to the assembler


def _what(exc: BaseException) -> str:
    """An exception as rejection detail: its type, and its text cut short."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


#: Points a step run keeps (a spectrum has a few thousand; a monitoring ``count`` with the
#: mono in ``primary`` would otherwise grow for ever, ~400 bytes a point).
MAX_STEP_POINTS = 100_000


class _Run(DocumentRouter):
    """All state of one run; receives its documents from the ``RunRouter``."""

    def __init__(self, owner: RunAssembler, start: dict[str, Any]) -> None:
        super().__init__()
        self.owner = owner
        self.uid: str = start["uid"]
        self.start_doc = start
        self.element, self.edge = _element_edge(start)
        self.kind: Kind = "unknown"
        self.opened = False
        self.closed = False
        self.last_seen = owner._now
        self.streams: dict[str, _Stream] = {}
        self.ignored: set[str] = set()
        self.broken: dict[str, str] = {}  # descriptors that could not be read: why
        self.stream_last = 0  # highest seq_num seen in the configured stream
        self.next_index = 0
        self.n_spectra = 0
        self.n_rejected = 0
        self.trailing_missing = 0  # events the stop's num_events says we never saw
        self.step_flags: set[str] = set()
        self.step_done = False  # the step spectrum was emitted or rejected
        #: each step stream's (mode, required channels), newest last: the spectrum takes the
        #: newest whose channels every point has
        self.step_modes: dict[tuple[str, tuple[str, ...]], None] = {}
        self.points: list[tuple[int, int, float, float, dict[str, float]]] = []

    # ------------------------------------------------------------------ outputs

    def put(self, out: Output) -> None:
        if not self.opened and not isinstance(out, RunOpened):
            self.open("unknown")
        if isinstance(out, Rejected):
            self.n_rejected += 1
        elif isinstance(out, SpectrumReady):
            self.n_spectra += 1
        self.owner._out.append(out)

    def open(self, kind: Kind) -> None:
        if not self.opened:
            self.opened = True
            self.kind = kind
            self.put(RunOpened(self.uid, self.start_doc, kind))

    def reject(self, reason: str, index: int | None, detail: str) -> None:
        self.put(Rejected(self.uid, index, reason, detail))

    # ------------------------------------------------------------------ documents

    def start(self, doc: Any) -> Any:
        return None

    def descriptor(self, doc: Any) -> Any:
        if self.closed:
            return
        if doc.get("name") != self.owner.channels.stream:
            self.ignored.add(doc["uid"])
            return
        try:
            st = _resolve(self.owner.channels, doc, len(self.streams))
        except Exception as exc:  # its events are each refused with this, never dropped unseen
            self.broken[doc["uid"]] = f"descriptor {doc['uid']} could not be read: {_what(exc)}"
            raise
        if self.streams:
            st.first_ok = (1, self.stream_last + 1)
        self.streams[doc["uid"]] = st
        self.open(st.kind)
        # a step scan's one spectrum is rejected here; so is a stream with no key this daemon
        # knows (kind unknown: its events would otherwise vanish without a count)
        if st.error is not None and st.kind != "fly" and not self.step_done:
            self.step_done = True
            self.reject(st.error.reason, 0, st.error.detail)

    def event_page(self, doc: Any) -> Any:
        if self.closed:
            return
        st = self.streams.get(doc["descriptor"])
        if st is None:
            broken = self.broken.get(doc["descriptor"])
            if broken is not None:
                for _ in range(len(doc["uid"])):
                    self.reject("malformed_document", None, broken)
            return  # another stream, or one whose descriptor could not be read
        data = doc["data"]
        uids, times, seqs = doc["uid"], doc["time"], doc["seq_num"]
        for i in range(len(uids)):
            seq = seqs[i]
            if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
                self.reject("malformed_document", None, f"seq_num {seq!r} is not an integer")
                continue
            if not -_SEQ_LIMIT <= int(seq) < _SEQ_LIMIT:  # the sequence checks count in int64
                self.reject("malformed_document", None, f"seq_num {int(seq)} out of range")
                continue
            flags = self._sequence(st, int(seq))
            if flags is None:
                continue
            try:
                t = float(times[i])
            except (TypeError, ValueError):
                t = math.nan
            if st.kind == "fly":
                self._fly_row(st, data, i, int(seq), t, flags)
            else:
                self._step_row(st, data, i, int(seq), t, flags)

    def _sequence(self, st: _Stream, seq: int) -> list[str] | None:
        """Duplicate check and arrival-time flags for one row (:func:`_seq_flags`); None means
        drop it, rejected."""
        try:
            flags = _seq_flags(st, seq)
        except _Bad as bad:
            self.reject(bad.reason, None, bad.detail)
            return None
        self.stream_last = max(self.stream_last, seq)
        return flags

    def dropped(self, desc: str, seqs: list[Any]) -> None:
        """Rows of descriptor ``desc`` the input queue dropped (unchecked, as sent)."""
        st = self.streams.get(desc)
        if st is None or self.closed:
            return  # another stream's: never part of this run's sequence
        _note_dropped(st, seqs)

    def seq_stats(self) -> tuple[int, int, int]:
        """(gaps, missing seq_nums, of them dropped by the input queue) over the run, from
        what finally arrived (late ones count)."""
        return _seq_stats(self.streams.values(), self.stream_last, self.trailing_missing)

    def _fly_row(
        self, st: _Stream, data: Mapping, i: int, seq: int, t: float, flags: list[str]
    ) -> None:
        index = self.next_index
        self.next_index += 1
        if st.error is not None:
            self.reject(st.error.reason, index, st.error.detail)
            return
        try:
            energy = self._fly_arrays(st, data, i, seq)
            channels = {ch: _vector(data[key][i]) for ch, key in st.keys.items()}
            n = energy.size
            bad = {ch: a.size for ch, a in channels.items() if a.size != n}
            if bad:
                raise _Bad("length_mismatch", f"energy has {n} points, {bad} (seq_num {seq})")
            mask, channels, more = _finite(energy, channels, st.required)
        except KeyError as exc:
            self.reject("missing_channel", index, f"event seq_num {seq} lacks data key {exc}")
            return
        except _Bad as bad_row:
            self.reject(bad_row.reason, index, bad_row.detail)
            return
        except Exception as exc:  # one row's values (overflow, memory): that row only
            self.reject("malformed_document", index, f"event seq_num {seq}: {_what(exc)}")
            return
        if mask is not None:
            energy = energy[mask]
            channels = {ch: a[mask] for ch, a in channels.items()}
        spec = ScanSpectrum(
            raw_uid=self.uid,
            index=index,
            energy=energy,
            channels=channels,
            element=self.element,
            edge=self.edge,
            mode=st.mode,
            seq_nums=(seq,),
            event_time=t,
            received=self.owner._now,
            flags=tuple(flags + more),
        )
        self.put(SpectrumReady(spec))

    @staticmethod
    def _fly_arrays(st: _Stream, data: Mapping, i: int, seq: int) -> np.ndarray:
        if st.energy_key is None:
            assert st.fixed_energy is not None
            return st.fixed_energy
        energy = _vector(data[st.energy_key][i])
        return energy * st.energy_scale if st.energy_scale != 1.0 else energy

    def _step_row(
        self, st: _Stream, data: Mapping, i: int, seq: int, t: float, flags: list[str]
    ) -> None:
        repeat = _REPEAT in flags
        if not repeat:
            self.step_flags.update(f for f in flags if f != "seq_gap")  # judged at the stop
        if st.error is not None:
            return  # the run's spectrum was rejected at the descriptor
        try:
            assert st.energy_key is not None
            energy = _scalar(data[st.energy_key][i]) * st.energy_scale
            values = {ch: _scalar(data[key][i]) for ch, key in st.keys.items()}
        except KeyError as exc:
            self.step_flags.add("points_rejected")
            self.reject("missing_channel", None, f"event seq_num {seq} lacks data key {exc}")
            return
        except Exception as exc:  # one point's values (overflow, memory): that point only
            self.step_flags.add("points_rejected")
            self.reject("malformed_document", None, f"event seq_num {seq}: {_what(exc)}")
            return
        if not repeat and len(self.points) >= MAX_STEP_POINTS:
            if "points_dropped" not in self.step_flags:  # once per run, then counted silently
                self.reject(
                    "too_many_points",
                    None,
                    f"a step run keeps {MAX_STEP_POINTS} points; later ones are not analysed",
                )
            self.step_flags.add("points_dropped")
            return
        if repeat:
            old = [p for p in self.points if p[0] == st.order and p[1] == seq]
            if old and old[0][3] == energy and old[0][4] == values:
                self.reject(
                    "duplicate_event", None, f"seq_num {seq} repeated in descriptor {st.uid}"
                )
                return
            # bluesky's rewind (a suspender tripped) took the point again: the new reading wins
            self.points = [p for p in self.points if not (p[0] == st.order and p[1] == seq)]
            self.step_flags.add("points_retaken")
        self.points.append((st.order, seq, t, energy, values))
        self.step_modes.pop((st.mode, st.required), None)
        self.step_modes[(st.mode, st.required)] = None

    def stop(self, doc: Any) -> Any:
        if self.closed:
            return
        status = doc.get("exit_status")
        status = status if status in ("success", "abort", "fail") else "fail"
        reason = doc.get("reason")
        reason = reason if isinstance(reason, str) else ""
        stream = self.owner.channels.stream
        expected, refusal = stop_event_count(doc, stream)  # bounded: see stop_claims
        if expected is not None and self.streams:
            self.trailing_missing, refusal = claimed_missing(expected, self.stream_last, stream)
        if refusal is not None:  # counted and in the analysis run, never silent
            self.reject("malformed_document", None, refusal)
        if self.seq_stats()[0]:
            self.step_flags.add("seq_gap")
        kinds = {st.kind for st in self.streams.values()}
        if "step" in kinds:
            if status != "success" and self.points and not self.step_done:
                self.step_done = True
                self.reject(
                    "incomplete_run",
                    0,
                    f"exit_status {status!r} ({reason or 'no reason given'}) after "
                    f"{len(self.points)} points",
                )
            self._finish_step()
        if "fly" in kinds and self.next_index == 0:
            self.reject("empty_run", None, f"no events in stream {self.owner.channels.stream!r}")
        if not self.streams:
            self.reject("empty_run", None, f"no {self.owner.channels.stream!r} stream")
        self.close(cast(ExitStatus, status), reason, via_stop=True)

    def _finish_step(self) -> None:
        if self.step_done:
            return
        self.step_done = True
        if not self.points:
            self.reject("empty_run", 0, f"no usable events in {self.owner.channels.stream!r}")
            return
        pts = sorted(self.points, key=lambda p: (p[0], p[1]))
        n = len(pts)
        names = [ch for ch in _CHANNELS if all(ch in p[4] for p in pts)]
        fits = [m for m in reversed(self.step_modes) if set(m[1]) <= set(names)]
        if not fits:  # descriptors of one run with different detectors
            modes = ", ".join(f"{mode} ({'/'.join(req)})" for mode, req in self.step_modes)
            self.reject("bad_channel", 0, f"no mode has its channels in every point: {modes}")
            return
        mode, required = fits[0]
        energy = np.fromiter((p[3] for p in pts), np.float64, n)
        channels = {ch: np.fromiter((p[4][ch] for p in pts), np.float64, n) for ch in names}
        seqs = np.fromiter((p[1] for p in pts), np.int64, n)
        try:
            mask, channels, more = _finite(energy, channels, required)
        except _Bad as bad:
            self.reject(bad.reason, 0, bad.detail)
            return
        if mask is not None:
            energy, seqs = energy[mask], seqs[mask]
            channels = {ch: a[mask] for ch, a in channels.items()}
        spec = ScanSpectrum(
            raw_uid=self.uid,
            index=0,
            energy=energy,
            channels=channels,
            element=self.element,
            edge=self.edge,
            mode=mode,
            seq_nums=tuple(int(q) for q in seqs),
            event_time=max(p[2] for p in pts),
            received=self.owner._now,
            flags=tuple(sorted(self.step_flags.union(more))),
        )
        self.put(SpectrumReady(spec))

    def close(self, status: ExitStatus, reason: str, *, via_stop: bool) -> None:
        """Emit ``RunClosed`` and forget the run (here and, unless ``via_stop``, in RunRouter)."""
        if not self.opened:
            self.open(self.kind)
        self.closed = True
        gaps, missing, dropped = self.seq_stats()
        self.owner._out.append(
            RunClosed(
                raw_uid=self.uid,
                exit_status=status,
                reason=reason,
                n_spectra=self.n_spectra,
                n_rejected=self.n_rejected,
                seq_gaps=gaps,
                missing_events=missing,
                dropped_events=dropped,
            )
        )
        self.owner._forget(self, status, via_stop=via_stop)

    def abandon(self, status: ExitStatus, reason: str, replayable: bool = False) -> None:
        """Close without a stop: gathered step points are rejected as ``missing_stop``. Not a
        ``replayable`` copy's: the replay's first result would get that row's seq_num."""
        if replayable:  # the store keeps the first row of a seq_num: the replay's is lost
            self.step_done = True
        elif self.points and not self.step_done:
            self.step_done = True
            self.reject(
                "missing_stop",
                0,
                f"{len(self.points)} points but no stop ({reason}); completeness unknown",
            )
        elif self.n_spectra == 0 and self.n_rejected == 0:
            self.reject("empty_run", None, f"no stop and no spectra ({reason})")
        self.close(status, reason, via_stop=False)
