"""The caller side's journal writes for :class:`~xasflow.adapters.tiled_store.AnalysisStore`.

Each falls back to the catalog when the journal fails (its write lock held past SQLite's busy
timeout, a full disk): the call goes on, the failure is logged, and what the journal could
not record reaches the catalog without its crash protection (rows acknowledged by the
catalog's commit, a stop held by the writer while the catalog's process is down). Each is
called outside the store's lock, which the writer thread takes for every batch: a journal
write hung in the kernel (its fsync, a stalled disk) holds its caller, never the writer.

A run whose start the journal could not record is *unjournalled* until it is opened again:
neither its rows nor its stop are journalled. A row journalled without its run's record
could not be replayed (a crash would lose it although acknowledged), and a stop without one
means nothing, so a crash leaves nothing of such a run to replay, never a part of it: the
rows the catalog committed are found at the next start as an unfinished run
(:meth:`~xasflow.adapters.tiled_store.AnalysisStore.unfinished_runs`), as without a journal.
What an earlier copy of the run left in the journal is superseded: the writer drops it when
it reaches the unjournalled open, and the run's next journalled open replaces it.

An open the store refuses because it began closing meanwhile is undone (:meth:`_unopen`,
:meth:`_journal_withdraw`): the count of the run's opens, which the writer checks before it
forgets or drops a record (a later open may own it), goes back to the last open not refused.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from xasflow.adapters.store_journal import Journal, Prior
from xasflow.adapters.tiled_schema import _Run, row_fits

__all__ = ["JournalFallback"]

logger = logging.getLogger("xasflow.adapters.tiled_store")


class JournalFallback:
    """The journal writes of the store's callers; a mixin only ``AnalysisStore`` uses."""

    _journal: Journal | None
    _columns: dict[str, frozenset[str]]  # open runs, as seen by callers
    _types: dict[str, dict[str, tuple[type, ...]]]  # open runs' column value types
    _opened: dict[str, int]  # opens of each raw_uid so far (callers)
    _refused_opens: dict[str, set[int]]  # refused opens whose count a later open had raised
    _unjournalled: set[str]  # open runs whose start the journal could not record
    _superseding: set[str]  # runs whose last open the journal could not record (ever)
    _said_unreadable: set[str]  # what the journal cannot give back, said and counted once
    _cond: threading.Condition  # the store's lock

    def _journal_start(
        self, raw_uid: str, start_doc: dict, descriptor: dict
    ) -> tuple[bool, Prior | None]:
        """Record a run's start and descriptor in the journal (before its rows, for a
        replay): True if it holds them or there is no journal; False if the write failed
        (logged): the run is unjournalled until opened again. Second: the record it found,
        to withdraw it (:meth:`_journal_withdraw`), if it wrote one."""
        if self._journal is None:
            return True, None
        aside: list[str] = []
        try:  # a record left by a copy before one opened unjournalled is stale: replaced
            fresh = raw_uid in self._superseding
            prior = self._journal.open_run(raw_uid, start_doc, descriptor, fresh=fresh, said=aside)
        except Exception:
            logger.exception(
                "analysis store: journal cannot record the start of %s; its rows and stop "
                "wait for the catalog (not replayed after a crash)",
                raw_uid,
            )
            self._unjournalled.add(raw_uid)
            self._superseding.add(raw_uid)
            return False, None
        self._unjournalled.discard(raw_uid)
        self._superseding.discard(raw_uid)
        self._set_aside(aside)
        return True, prior

    def _set_aside(self, said: list[str]) -> None:
        """Damaged journal records just set aside (a copy of their run opened or dropped):
        logged now; the replay says them at each start, but no more in this store, which
        said them (and counted them) as damaged records when it started."""
        for line in said:
            logger.warning(
                "analysis store: %s (kept in the journal for a person, never replayed)", line
            )
        if said:
            with self._cond:
                self._said_unreadable.update(said)

    def _unopen(self, run: _Run) -> None:
        """Undo (the store's lock held) what an open the store refused did for the callers:
        the run is not open, and the count of its opens is back to the last open not refused
        (accepted, or still in flight). Left raised, it made an earlier copy's close, whose
        stop the journal lacks, keep the run's record for a later open that never was: the
        next start replayed it as an interrupted run."""
        self._columns.pop(run.raw_uid, None)
        self._types.pop(run.raw_uid, None)
        refused = self._refused_opens.setdefault(run.raw_uid, set())
        refused.add(run.opened)
        count = self._opened.get(run.raw_uid, 0)
        while count in refused:  # not this open's while a later one raised it: left to that
            refused.discard(count)
            count -= 1
        if count:
            self._opened[run.raw_uid] = count
        else:
            self._opened.pop(run.raw_uid, None)

    def _journal_withdraw(self, raw_uid: str, prior: Prior | None) -> None:
        """Leave the journal's record of a run as it was before an open the store refused
        (it was closing): else the next start replays a run that never opened (an empty
        one, ended by recovery) or reopens one stopped already. Logged if it fails."""
        if self._journal is None or prior is None:
            return
        try:
            self._journal.withdraw(raw_uid, prior)
        except Exception:
            logger.exception("analysis store: cannot withdraw the refused start of %s", raw_uid)

    def _journalled(self, raw_uid: str, rows: list[dict[str, Any]]) -> list[bool]:
        """Which of ``rows`` are now in the journal (a journal that fails is logged, and its
        rows are acknowledged by the catalog's commit instead, as are an unjournalled run's)."""
        if self._journal is None or not rows or raw_uid in self._unjournalled:
            return [False] * len(rows)
        types = self._types.get(raw_uid, {})
        fits = [row_fits(row, types) for row in rows]
        try:
            done = self._journal.add(raw_uid, [r for r, ok in zip(rows, fits, strict=True) if ok])
        except Exception:
            logger.exception("analysis store: journal write failed; waiting for the catalog")
            return [False] * len(rows)
        it = iter(done)
        return [next(it) if ok else False for ok in fits]

    def _journal_stop(self, raw_uid: str, stop: dict[str, Any], opens: int | None = None) -> bool:
        """Record a run's stop in the journal's record of it, so the writer forgets that
        record only while it holds this stop; False if the write failed (logged), there is
        no journal, the run is unjournalled (popped here) or the journal holds no record of
        it (a run a previous process left open with all its rows in the catalog): then the
        stop is not in the journal, and the writer must not take it as being there.

        ``opens`` (``finish_run``, of a run not open here): the callers' count of the run's
        opens when it looked; an open since (a start redelivered meanwhile) owns the record,
        so the stop is written only while none came, checked under the journal's write lock
        (also False then, and an unjournalled open's mark is left to it)."""
        if self._journal is None or raw_uid in self._unjournalled:
            if opens is None:  # a close: the run's unjournalled mark ends with it
                self._unjournalled.discard(raw_uid)
            return False
        still = None if opens is None else lambda: self._opened.get(raw_uid, 0) == opens
        try:
            return self._journal.close_run(raw_uid, stop, still)
        except Exception:
            logger.exception("analysis store: journal cannot record the stop of %s", raw_uid)
            return False
