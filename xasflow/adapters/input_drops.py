"""Which raw events an input's overflow policy dropped, kept for the processing thread.

A raw event dropped by a full input queue (``input.overflow: drop_newest | drop_oldest``) is
lost once, as ``overflow``; the hole it leaves in its run's sequence (or after its run's
last event, told by the stop's ``num_events``) must not count it again as ``seq_gap``. The
receive thread records each dropped event's descriptor uid and seq_num here; the processing
thread takes them every turn (:meth:`DropLedger.take`) and hands them to the assembler
(:meth:`~xasflow.daemon.assembly.RunAssembler.dropped`), which tells the holes the input
made from those the bus made. Each row carries the run its descriptor was queued for (None
if it was never queued, or evicted), so the assembler can tie a drop whose descriptor it has
not taken yet to that run's lifetime.

``overflow`` counts event rows (an ``event`` is one, an ``event_page`` its rows, of any
stream); other documents dropped (a start, a descriptor, a resource) are no events: they
are counted by the input as documents (``xasflow_input_dropped_total{cause="overflow"}``).

Rows whose descriptor this input never queued (:meth:`DropLedger.queued`; a descriptor
precedes its events, so this is known when the row is dropped) belong to a run the daemon
cannot follow, typically one a killed predecessor left open: they are also kept apart
(:meth:`DropLedger.take_unseen`) for :class:`~xasflow.adapters.recovery.InterruptedRuns`,
whose ``interrupted`` count (raw events - results stored) must not count them again. Rows
of a descriptor queued for such a run (it came after the restart) are told by their run
(:meth:`InterruptedRuns.owns`) and go there too, by the processor.

Under ``input.overflow: block`` nothing is dropped while the input runs, but the document
the receive thread holds for a full queue when the input closes is (``dropped_on_close``),
and so is each it then takes off its socket that finds the queue full or comes after such a
drop: :func:`dropped_at_close` counts their event rows too, lost as ``on_close``. Nothing is
queued after the first, so no run of the daemon can count them again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["KNOWN_DESCRIPTORS", "MAX_RECORDS", "DropLedger", "dropped_at_close", "event_rows"]

#: Dropped documents whose rows wait for :meth:`DropLedger.take` at most: it is emptied
#: every turn of the processing thread, so this is reached only if that thread is stuck.
MAX_RECORDS = 100_000
#: Descriptor uids queued that the ledger remembers (the most recent), to tell unseen rows.
KNOWN_DESCRIPTORS = 10_000


def event_rows(name: str, doc: dict[str, Any]) -> tuple[Any, list[Any]] | None:
    """``(descriptor uid, seq_nums)`` of an event or event page, as sent (unchecked: the
    assembler checks them); None for any other document."""
    if name == "event":
        return doc.get("descriptor"), [doc.get("seq_num")]
    if name != "event_page":
        return None
    seqs: Any = doc.get("seq_num")
    try:  # a list, or an array from msgpack-numpy
        rows = [] if isinstance(seqs, str | bytes | dict) else list(seqs)
    except TypeError:
        rows = []
    return doc.get("descriptor"), rows


def dropped_at_close(name: str, doc: dict[str, Any]) -> dict[str, int]:
    """What to add to the input's counters for a document dropped at close:
    ``dropped_on_close`` (1) and ``dropped_on_close_events`` (its event rows)."""
    rows = event_rows(name, doc)
    return {"dropped_on_close": 1, "dropped_on_close_events": len(rows[1]) if rows else 0}


class DropLedger:
    """Event rows dropped by an input, between the receive and the processing thread."""

    def __init__(self, most: int = MAX_RECORDS) -> None:
        self.most = most
        self._records: list[tuple[Any, list[Any], str | None]] = []
        self._unseen: list[tuple[Any, list[Any]]] = []
        self._queued: OrderedDict[Any, str | None] = OrderedDict()  # descriptor uid -> run
        self._lock = threading.Lock()

    def queued(self, name: str, doc: dict[str, Any]) -> None:
        """A document the input queued: a descriptor's uid is remembered, so that the rows
        dropped later are told apart from those of descriptors never queued (unseen)."""
        if name != "descriptor":
            return
        uid, run = doc.get("uid"), doc.get("run_start")
        if isinstance(uid, str):
            with self._lock:
                self._queued[uid] = run if isinstance(run, str) else None
                while len(self._queued) > KNOWN_DESCRIPTORS:
                    self._queued.popitem(last=False)

    def record(self, name: str, doc: dict[str, Any]) -> dict[str, int]:
        """Remember a dropped document's event rows; return what to add to the input's
        counters: ``dropped_overflow`` (1), ``dropped_overflow_events`` (its rows) and
        ``dropped_unattributed`` (rows not remembered: the ledger is full, so they may be
        counted as ``seq_gap`` too)."""
        counts = {"dropped_overflow": 1}
        if name == "descriptor":  # evicted after it was queued: its rows are unseen now
            with self._lock:
                self._queued.pop(doc.get("uid"), None)
        rows = event_rows(name, doc)
        if rows is not None:
            counts["dropped_overflow_events"] = len(rows[1])
            with self._lock:
                unseen = not isinstance(rows[0], str) or rows[0] not in self._queued
                if len(self._records) < self.most:
                    self._records.append((*rows, None if unseen else self._queued[rows[0]]))
                else:
                    counts["dropped_unattributed"] = len(rows[1])
                if unseen and len(self._unseen) < self.most:
                    self._unseen.append(rows)
        return counts

    def take(self) -> list[tuple[Any, list[Any], str | None]]:
        """The rows recorded since the last call, oldest first: ``(descriptor uid, seq_nums,
        run uid the descriptor was queued for, None if this input does not queue it)``."""
        with self._lock:
            records, self._records = self._records, []
        return records

    def take_unseen(self) -> list[tuple[Any, list[Any]]]:
        """The rows recorded since the last call whose descriptor this input never queued
        (they are in :meth:`take` too), oldest first."""
        with self._lock:
            records, self._unseen = self._unseen, []
        return records
