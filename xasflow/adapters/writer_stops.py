"""The writer thread's stops (:mod:`xasflow.adapters.tiled_writer`): a run's close, the finish
of a run a previous process left open, and what becomes of each one's journal record.

A stop is written to the catalog first; the run's journal record is forgotten only once the
catalog holds it, and only while the record is still this stop's (a run opened again since
keeps its record, and the rows journalled for the new copy). :class:`RunStops` is a mixin
only :class:`~xasflow.adapters.tiled_writer.WriterThread` uses; every method runs on its
thread.

A stop the catalog refuses (every one of the store's retries of the call) is counted in
``errors`` once and tried again by the writer itself while the store runs (:class:`StopDue`),
after 1 s, then twice as long each time up to 30 s (the back-off of a dead catalog process,
:mod:`xasflow.adapters.catalog_supervisor`), until the catalog takes it; then its journal
record is forgotten as it would have been. A later open of the run ends the retries (the new
copy's close writes its stop), as does a newer stop of it. A stop the journal holds is
replayed at the next start if the store closes first; one it does not hold is then lost,
and said so.

A journal record the store found damaged (its replay could not read it back) is left as it
is, for a person: a stop given to its run goes to the catalog only, never into the record,
and the record is never forgotten (without rows it was, and with it the only copy of what
the killed process had journalled of the run). A journalled open of the run, or the drop
of a copy it superseded, sets it aside (:mod:`xasflow.adapters.journal_records`), so the
writer treats the run's record as any other's once it has handled that open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xasflow.adapters.catalog_runs import run_node
from xasflow.adapters.catalog_supervisor import FIRST_DELAY_S, MAX_DELAY_S
from xasflow.adapters.store_journal import Journal
from xasflow.adapters.tiled_batch import set_metadata
from xasflow.adapters.tiled_read import unfinished_in
from xasflow.adapters.tiled_schema import _Run

__all__ = ["RunStops", "StopDue", "start_of"]

logger = logging.getLogger("xasflow.adapters.tiled_store")


@dataclass
class StopDue:
    """A stop the catalog refused, to be written again at ``due`` (monotonic seconds)."""

    write: Callable[[], Any]  # the catalog write, on the catalog's client at the time
    then: Callable[[], None]  # what follows once the catalog holds it: the journal's part
    what: str  # "close <raw_uid>" or "finish <raw_uid>", as the first try said
    journalled: bool  # the journal holds the stop (replayed at the next start)
    due: float
    delay: float = FIRST_DELAY_S


class RunStops:
    """Closes and finishes of runs, on the writer thread."""

    _runs: dict[str, _Run]
    _journal_w: Journal | None  # the writer thread's connection to the journal
    _root: Any
    _opened: dict[str, int]  # the callers' count of opens of each raw_uid
    _superseded: dict[str, int]  # raw_uid -> its unjournalled open's count: record to drop
    _stops_due: dict[str, StopDue]  # stops the catalog refused, by raw_uid: tried again
    _damaged: set[str]  # raw_uids whose journal record cannot be read back: kept as it is
    _set_aside: Callable[[list[str]], None]  # JournalFallback's (after this class in the MRO)

    # WriterThread's
    def _catalog(self, action: Callable[[], Any], what: str, *, retries: bool = True) -> Any:
        raise NotImplementedError

    def _commit(self, run: _Run) -> None:
        raise NotImplementedError

    def _count(self, name: str, n: int = 1) -> None:
        raise NotImplementedError

    def _close(self, raw_uid: str, stop_doc: dict, unjournalled: int | None = None) -> None:
        """Write a run's stop, then forget its journal record. ``unjournalled``: the stop is
        not in the journal (the callers' count of the run's opens at this close is given):
        the record is forgotten only while no later open came, which may have journalled a
        record of its own, its rows still to come (forgotten, a crash would lose them); one
        its rows keep takes this stop, so the next start does not reopen the run."""
        run = self._runs.pop(raw_uid, None)
        if run is None or run.failed:
            self._count("errors")
            logger.error("analysis store: close of run %s that did not open", raw_uid)
            return
        self._commit(run)
        meta = {**start_of(run), "stop": stop_doc} if run.start_due else {"stop": stop_doc}
        self._write_stop(
            raw_uid,
            lambda: set_metadata(run.node, meta),
            StopDue(
                lambda: set_metadata(run_node(self._root, raw_uid), meta),
                lambda: self._closed_journal(raw_uid, stop_doc, unjournalled),
                f"close {raw_uid}",
                self._journal_w is not None and unjournalled is None,
                0.0,
            ),
        )

    def _closed_journal(self, raw_uid: str, stop_doc: dict, unjournalled: int | None) -> None:
        """The journal's part of a close, once the catalog holds its stop (see _close)."""
        if unjournalled is not None and raw_uid in self._superseded:  # drop failed at the open
            self._end_superseded(raw_uid)
        elif self._journal_w is None or raw_uid in self._damaged:  # kept for a person
            return
        elif unjournalled is None:  # the journal's record holds this stop
            self._journal_w.forget_run(raw_uid, stop_doc)
        else:
            still = lambda: self._opened.get(raw_uid) == unjournalled  # noqa: E731
            self._journal_w.forget_run(raw_uid, None, still, record=stop_doc)

    def _end_superseded(self, raw_uid: str) -> None:
        """Drop the journal's record of a run opened unjournalled, and the rows listed for
        it: an earlier copy's, which the items before this open put into the catalog (or
        failed to); replayed after a crash, it would write the old copy's start, stop and
        rows over the new one's. Only while no later open of the run came (it may have
        journalled a record of its own); a failure (the journal's lock held) is tried again
        at the run's close."""
        opened = self._superseded.get(raw_uid)
        if self._journal_w is None or opened is None:
            return
        aside: list[str] = []  # a damaged record is not dropped: set aside, kept
        try:
            still = lambda: self._opened.get(raw_uid) == opened  # noqa: E731
            self._journal_w.drop_run(raw_uid, still, said=aside)
        except Exception:
            logger.exception("analysis store: cannot drop the superseded record of %s", raw_uid)
            self._count("errors")
            return
        del self._superseded[raw_uid]
        self._set_aside(aside)

    def _finish(self, raw_uid: str, stop_doc: dict, journalled: bool, opens: int = 0) -> None:
        """Record the stop of a run a previous process left open, then forget its journal
        record only if that still holds this stop: the run's start replayed meanwhile (a
        Kafka redelivery, queued after this finish) opened the record again, and the rows
        journalled for that copy need it to be replayed after a crash. A stop the journal
        could not record (or a run it has no record of): the record is forgotten only while
        no open came since the finish (``opens``: the callers' count of the run's opens
        then), and one its rows keep takes this stop, as at an unjournalled close; left
        stopless, it came back at the next start as an open run, which recovery closed
        again (a second stop, its raw count unknown). A journal that fails here too leaves
        the record: the next start ends the run again, never leaves it open. A run opened
        here since the finish looked (its start redelivered, the open queued first) is that
        copy's: the finish is left to it, not an error."""
        run = self._runs.get(raw_uid)
        if run is not None and run.opened > opens:
            logger.info("analysis store: finish of %s left to the copy opened since", raw_uid)
            return
        if run is not None or raw_uid not in self._root:
            self._count("errors")
            logger.error("analysis store: finish of run %s that is open or absent", raw_uid)
            return
        node = self._root[raw_uid]
        self._write_stop(
            raw_uid,
            lambda: set_metadata(node, {"stop": stop_doc}),
            StopDue(
                lambda: set_metadata(run_node(self._root, raw_uid), {"stop": stop_doc}),
                lambda: self._finished_journal(raw_uid, stop_doc, journalled, opens),
                f"finish {raw_uid}",
                self._journal_w is not None and journalled,
                0.0,
            ),
        )

    def _finished_journal(self, raw_uid: str, stop_doc: dict, journalled: bool, opens: int) -> None:
        """The journal's part of a finish, once the catalog holds its stop (see _finish)."""
        if self._journal_w is None or raw_uid in self._damaged:  # kept for a person
            return
        if journalled:
            self._journal_w.forget_run(raw_uid, stop_doc)
        else:
            still = lambda: self._opened.get(raw_uid, 0) == opens  # noqa: E731
            self._journal_w.forget_run(raw_uid, None, still, record=stop_doc)

    def _unfinished(self) -> list[dict[str, Any]]:
        """``unfinished_runs``: runs the catalog holds without a stop, not open here, less
        those whose journal record holds their stop (their close failed: no interrupted
        run, whose stop would replace the real one), which is written again now, or tried
        again later if the catalog still refuses it (and replayed at the next start)."""
        found = unfinished_in(self._root, frozenset(self._runs))
        stops = self._journal_w.stops() if self._journal_w is not None and found else {}
        out = []
        for info in found:
            raw_uid, stop = info["raw_uid"], stops.get(info["raw_uid"])
            if stop is None:
                out.append(info)
                continue
            logger.warning(
                "analysis store: run %s has no stop in the catalog (its close failed); "
                "writing the one its journal record holds",
                raw_uid,
            )
            try:
                self._finish(raw_uid, stop, journalled=True)
            except Exception:
                logger.exception(
                    "analysis store: the stop of %s is still not in the catalog; tried again "
                    "later (the journal keeps it for the next start)",
                    raw_uid,
                )
                self._count("errors")
        return out

    def _write_stop(self, raw_uid: str, first: Callable[[], Any], again: StopDue) -> None:
        """Write a stop to the catalog (``first``), then do its journal part (``again.then``);
        refused, it is tried again later (``again``) and the refusal raised (counted)."""
        try:
            self._catalog(first, again.what)
        except Exception:
            again.due = time.monotonic() + again.delay
            self._stops_due[raw_uid] = again
            raise
        self._stops_due.pop(raw_uid, None)  # an older stop of the run is not written now
        again.then()

    def _retry_stops(self, now: float) -> None:
        """Write again the refused stops now due; one refused again waits twice as long
        (logged, not counted again: the stop's refusal was counted once). One request each
        (the catalog process's own route, :func:`~xasflow.adapters.catalog_runs.run_node`):
        its back-off is the retry, and the store's retries of a call (0.05, 0.25 and 1 s),
        or tiled's client's (up to 45 s on a 5xx), would hold the writer, and every run's
        rows, at each refusal."""
        for raw_uid, due in list(self._stops_due.items()):
            if due.due > now:
                continue
            try:
                self._catalog(due.write, due.what, retries=False)
            except Exception as exc:
                due.delay = min(2 * due.delay, MAX_DELAY_S)
                due.due = time.monotonic() + due.delay
                logger.warning(
                    "analysis store: %s: the catalog still refuses the stop (%s); next try in "
                    "%.0f s",
                    due.what,
                    exc,
                    due.delay,
                )
                continue
            if self._stops_due.get(raw_uid) is due:
                del self._stops_due[raw_uid]
            logger.warning("analysis store: %s: the catalog took the stop at last", due.what)
            try:
                due.then()
            except Exception:
                logger.exception("analysis store: %s: the journal's part failed", due.what)
                self._count("errors")

    def _stops_left(self) -> None:
        """At the writer's end: the stops the catalog never took, said (counted already)."""
        for due in self._stops_due.values():
            if due.journalled:
                logger.warning(
                    "analysis store: %s: not in the catalog; the journal replays it at the "
                    "next start",
                    due.what,
                )
            else:
                logger.error("analysis store: %s: the stop was never recorded", due.what)
        self._stops_due.clear()


def start_of(run: _Run) -> dict[str, Any]:
    """A run's start and descriptor metadata (written once its table was made ahead)."""
    return {"start": run.metadata["start"], "descriptor": run.metadata["descriptor"]}
