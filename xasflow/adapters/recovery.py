"""Crash recovery of the analysis store: runs a killed daemon left open, closed and reported.

0MQ PUB/SUB is at-most-once: what the proxy forwards while no daemon is subscribed is
dropped, and what a killed daemon had received but not stored is gone with it. At start,
:class:`InterruptedRuns` asks the store for analysis runs its predecessor left open
(``AnalysisStore.unfinished_runs``); each is closed ("interrupted") when the raw run's stop
arrives (its ``num_events`` gives the raw count, so ``raw_missing_events`` = raw spectra -
spectra stored; a count that is not one, or that claims more than
:data:`~xasflow.adapters.stop_claims.MAX_STOP_MISSING` missing, is refused and the number
left unknown), after ``timeout_s`` without it, or at shutdown. The stop (``exit_status``
"fail", ``reason`` "interrupted: ...", ``interrupted: true``) is recorded in the store and
returned for publication under the analysis run's original start uid.

The raw run's events that reach this daemon have a descriptor it never saw (or one it
queued and the assembler refused, the run never started here: a descriptor that came after
the restart; the processor gives this daemon's rows of such a run here, not to the
assembler). Those its input queue dropped are lost as ``overflow`` already, so the stop's
``raw_dropped_events`` says how many of ``raw_missing_events`` they are, and the
``interrupted`` count leaves them out (as ``seq_gap`` does for a run the daemon follows).
:meth:`InterruptedRuns.dropped` keeps them, and a run's stop takes those whose seq_num it
counts missing (above the last stored, up to its ``num_events``), at most that many, of its
own rows (their descriptor queued for it here) and of those whose run the input cannot tell
(a descriptor never queued here; an event names its descriptor only). So a row of another
stream in that range (a baseline reading), or an unqueued one of another run left open, can
be taken instead of one of the run's own: the stop's ``raw_dropped_events`` is then off by
it, and the ``interrupted`` count too unless another run's stop takes the row it left. A run
delivered again from its start (:meth:`InterruptedRuns.resume`) gives its own rows back
(:meth:`InterruptedRuns.take_rows`): the processor hands them to the assembler, which now
follows the run.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from xasflow.adapters.input_drops import MAX_RECORDS
from xasflow.adapters.stop_claims import claimed_missing, int64_or_none, stop_event_count

__all__ = ["InterruptedRuns"]

logger = logging.getLogger(__name__)

_CLOSED_KEPT = 64  # closed interrupted runs listed in /health


class InterruptedRuns:
    """The store's runs left open by a previous process, and how each was closed."""

    def __init__(self, store: Any, stream: str = "primary", timeout_s: float = 60.0) -> None:
        self.store = store
        self.stream = stream  # the raw runs' stream whose num_events counts raw spectra
        self.timeout_s = float(timeout_s)
        self._open: dict[str, dict[str, Any]] = {}  # raw uid -> store's info on the run
        self._closed: list[dict[str, Any]] = []
        #: rows the input dropped: (run uid their descriptor was queued for or None,
        #: descriptor uid, seq_num)
        self._dropped: list[tuple[str | None, Any, int]] = []
        self._lock = threading.Lock()
        self._found_at = time.monotonic()

    def find(self) -> int:
        """Look in the store for runs left open; returns how many."""
        for info in self.store.unfinished_runs():
            self._open[info["raw_uid"]] = info
            logger.warning(
                "analysis run of raw run %s was left open by a previous process (%d results "
                "stored); it will be closed as interrupted",
                info["raw_uid"],
                info["rows"],
            )
        self._found_at = time.monotonic()
        return len(self._open)

    def __bool__(self) -> bool:
        return bool(self._open)

    def owns(self, raw_uid: Any) -> bool:
        """Whether ``raw_uid`` is a run left open by a previous process."""
        return raw_uid in self._open

    def resume(self, raw_uid: Any) -> bool:
        """The raw run arrives again from its start (a Kafka redelivery): it is analysed
        anew instead of closed as interrupted; the store keeps the rows it holds."""
        info = self._open.pop(raw_uid, None) if isinstance(raw_uid, str) else None
        if info is not None:
            logger.warning(
                "raw run %s is delivered again from its start: analysing it anew", raw_uid
            )
        return info is not None

    def dropped(self, rows: list[tuple[Any, list[Any], str | None]]) -> None:
        """Event rows the input dropped, ``(descriptor uid, seq_nums, the run it was queued
        for, or None: never queued here)``, of runs left open or unknown, kept while a run is
        open (see the module docstring); at most ``MAX_RECORDS``."""
        if not self._open:
            self._dropped.clear()
            return
        for desc, row, run in rows:
            owner = run if isinstance(run, str) else None
            seqs = (int64_or_none(seq) for seq in row)
            self._dropped.extend((owner, desc, s) for s in seqs if s is not None)
        del self._dropped[MAX_RECORDS:]

    def take_rows(self, raw_uid: str) -> list[tuple[Any, list[int]]]:
        """Forget the rows kept as ``raw_uid``'s, ``[(descriptor uid, seq_nums)]``: a run
        delivered again is followed by the assembler, which counts its drops from now on."""
        rows: dict[Any, list[int]] = {}
        kept = []
        for row in self._dropped:
            if row[0] == raw_uid:
                rows.setdefault(row[1], []).append(row[2])
            else:
                kept.append(row)
        self._dropped = kept
        return list(rows.items())

    def _take_dropped(self, raw_uid: str, after: int, upto: int, most: int) -> int:
        """Forget up to ``most`` rows of ``raw_uid`` or of no known run with ``after <
        seq_num <= upto``; how many."""
        kept: list[tuple[str | None, Any, int]] = []
        taken = 0
        for row in self._dropped:
            run, _, seq = row
            if taken < most and run in (None, raw_uid) and after < seq <= upto:
                taken += 1
            else:
                kept.append(row)
        self._dropped = kept
        return taken

    def expired(self, now: float | None = None) -> list[str]:
        """Raw uids whose stop did not come within ``timeout_s`` of the restart."""
        now = time.monotonic() if now is None else now
        return list(self._open) if now - self._found_at > self.timeout_s else []

    def pending(self) -> list[str]:
        """Raw uids still open."""
        return list(self._open)

    def close(
        self, raw_uid: str, raw_stop: dict[str, Any] | None = None, why: str = ""
    ) -> dict[str, Any] | None:
        """Close one run: record its stop in the store, return it (None if not ours). A run
        with no analysis start stored (its table made at the raw start, no result yet) gets
        one too, its ``run_start`` empty: not to be published, but its loss is counted.

        With the raw run's stop, ``raw_missing_events`` is its event count minus the spectra
        stored, and ``raw_dropped_events`` how many of them this daemon's input dropped;
        without it both are unknown (None).
        """
        info = self._open.pop(raw_uid, None)
        if info is None:
            return None
        start = info["start"]
        raw_total, missing, refusal, dropped = None, None, None, None
        raw_status = "timeout" if raw_stop is None else str(raw_stop.get("exit_status", "fail"))
        if raw_stop is not None:  # a count only if it is one, and a plausible one
            raw_total, refusal = stop_event_count(raw_stop, self.stream)
            if raw_total is not None:
                missing, refusal = claimed_missing(raw_total, info["spectra"], self.stream)
            if refusal is not None:
                raw_total = missing = None
                logger.warning("raw run %s: %s", raw_uid, refusal)
        if raw_total is not None and missing is not None:
            dropped = self._take_dropped(raw_uid, int(info.get("max_seq", 0)), raw_total, missing)
        self.take_rows(raw_uid)  # the rest of its own: no other run may take them
        seen = "unknown" if raw_total is None else str(raw_total)
        reason = (
            f"interrupted: the daemon restarted during this run; {info['spectra']} of {seen} "
            f"raw spectra have stored results"
            + ("" if missing is None else f", {missing} were not analysed")
            + (f" ({dropped} of them dropped by the input queue)" if dropped else "")
            + (f" ({why})" if why else "")
            + (f"; {refusal}" if refusal else "")
        )
        stop = {
            "uid": str(uuid.uuid4()),
            "time": time.time(),
            "run_start": start.get("uid", ""),
            "exit_status": "fail",
            "reason": reason,
            "num_events": {info["descriptor"].get("name") or "primary": info["rows"]},
            "raw_exit_status": raw_status,
            "bundle_ids": [start["bundle_id"]] if start.get("bundle_id") else [],
            "n_analysed": info["n_ok"],
            "n_rejected": info["n_rejected"],
            "raw_seq_gaps": None if missing is None else int(missing > 0),
            "raw_missing_events": missing,
            "raw_dropped_events": dropped,
            "interrupted": True,
        }
        logger.warning("raw run %s: %s", raw_uid, reason)
        try:
            self.store.finish_run(raw_uid, stop)
        except Exception:
            logger.exception("cannot record the stop of interrupted run %s", raw_uid)
        with self._lock:
            self._closed.append(
                {
                    "raw_uid": raw_uid,
                    "stored": info["spectra"],
                    "raw_spectra": raw_total,
                    "missing": missing,
                    "raw_exit_status": raw_status,
                }
            )
            del self._closed[:-_CLOSED_KEPT]
        return stop

    def health(self) -> dict[str, Any]:
        """``{"open": [raw uids], "closed": [{raw_uid, stored, raw_spectra, missing, ...}]}``."""
        with self._lock:
            return {"open": sorted(self._open), "closed": list(self._closed)}
