"""The writer thread's side of a dead catalog process (:mod:`xasflow.adapters.tiled_writer`).

While the catalog's child process is down, the queued work the journal holds is left to it
and the rest waits in memory (:meth:`CatalogOutage._park`); once
:class:`~xasflow.adapters.catalog_supervisor.CatalogSupervisor` has started a new child, the
open runs are reattached, the journal is replayed (the start-up code path; ``seq_num`` keeps
it idempotent) and what waited follows (:meth:`CatalogOutage._recover`). What still waits
when the writer ends is lost, and counted. :class:`CatalogOutage` is a mixin only
:class:`~xasflow.adapters.tiled_writer.WriterThread` uses; every method runs on its thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xasflow.adapters.store_journal import Journal
from xasflow.adapters.tiled_batch import attach_run
from xasflow.adapters.tiled_schema import Ack, StoreError, _Run

if TYPE_CHECKING:
    from xasflow.adapters.catalog_supervisor import CatalogSupervisor

__all__ = ["UNJOURNALLED_CLOSE", "UNJOURNALLED_OPEN", "CatalogOutage"]

logger = logging.getLogger("xasflow.adapters.tiled_store")

#: The queue item of a run's stop the journal could not record: the writer holds it while
#: the catalog's process is down (a journalled stop is left to the journal's replay), and
#: forgets the run's journal record whatever stop it holds, unless the run was opened again
#: since (the item's fourth field: the callers' count of its opens at this close).
UNJOURNALLED_CLOSE = "close_unjournalled"
#: The queue item of a run's open the journal could not record (the run is unjournalled,
#: :mod:`xasflow.adapters.journal_fallback`): held, like its rows and stop, while the
#: catalog's process is down, since no replay brings it back.
UNJOURNALLED_OPEN = "open_unjournalled"


class CatalogOutage:
    """Work set aside while the catalog's process is down, and the recovery once it is back."""

    _cond: threading.Condition
    _items: deque[tuple[Any, ...]]
    _runs: dict[str, _Run]
    _prepared: dict[str, _Run]
    _journal_w: Journal | None  # the writer thread's connection to the journal
    _root: Any
    _columns: dict[str, frozenset[str]]  # runs open on the caller side
    _supervisor: CatalogSupervisor | None  # with a catalog child process
    _held: list[tuple[Any, ...]]  # work the journal does not hold, while the catalog is down
    _counts: dict[str, int]  # the store's counters (write_lost: what a held flush answers)

    # WriterThread's
    def _catalog(self, action: Callable[[], Any], what: str, *, retries: bool = True) -> Any:
        raise NotImplementedError

    def _replay(self, journal: Journal, still_open: frozenset[str] = frozenset()) -> list[Any]:
        raise NotImplementedError

    def _finish_rows(self, n: int, errors: int, lost: list[Ack | None] | None = None) -> None:
        raise NotImplementedError

    def _count(self, name: str, n: int = 1) -> None:
        raise NotImplementedError

    def _supervise(self, items: list[Any]) -> list[Any]:
        """The items to handle now: all of them while the catalog runs; while its process is
        down, what :meth:`_park` leaves; once a new process runs, the recovery first."""
        sup = self._supervisor
        if sup is None or sup():
            return items
        items = self._park(items)
        if any(item[0] == "stop" for item in items):
            return items  # closing: the journal is replayed at the next start
        root = sup.poll(time.monotonic())
        return items if root is None else self._recover(root, items)

    def _park(self, items: list[Any]) -> list[Any]:
        """Set aside work for the catalog while its process is down: what the journal holds
        is left there (the recovery replays it), what it does not waits in ``_held``, reads
        fail at once; flushes, releases and the stop go on (the rows pending in open runs are
        appended straight into their table, which needs no catalog process)."""
        now: list[Any] = []
        for item in self._not_in_journal(items):
            kind = item[0]
            if kind == "prepare":
                continue  # best effort
            elif kind in (
                "row",
                "open",
                UNJOURNALLED_OPEN,
                "close",
                UNJOURNALLED_CLOSE,
                "finish",
            ) or (kind == "flush" and self._held):
                self._held.append(item)  # a flush waits for what waits before it
            elif kind == "call":
                item[2]["error"] = StoreError("the catalog's process is not running")
                item[3].set()
            else:
                now.append(item)
        return now

    def _not_in_journal(self, items: list[Any]) -> list[Any]:
        """``items`` less those the journal holds (the replay brings them back): journalled
        rows (settled here), rows of an earlier replay and, with the journal, opens and closes."""
        journal = self._journal_w is not None
        out = [
            item
            for item in items
            if not (item[0] == "row" and item[4])
            and item[0] != "replay"
            and not (journal and item[0] in ("open", "close"))
        ]
        rows = sum(1 for item in items if item[0] == "row" and item[4])
        if rows:
            self._finish_rows(rows, errors=0)
        return out

    def _recover(self, root: Any, items: list[Any]) -> list[Any]:
        """A new catalog process runs: reattach the open runs to it, then replay what the
        journal holds, then what waited in memory, then ``items``."""
        self._root = root  # the callers' client() follows it
        self._prepared.clear()  # their clients spoke to the dead process
        for raw_uid, run in list(self._runs.items()):
            if run.failed:  # its rows were counted as errors (or are in the journal)
                del self._runs[raw_uid]
                continue
            try:
                self._catalog(functools.partial(attach_run, root, run), f"reattach {raw_uid}")
            except Exception:
                run.failed = True
                self._count("errors")
                logger.exception("analysis store: cannot reattach run %s", raw_uid)
                pending, run.pending = run.pending, []  # never to be appended: told lost
                run.journalled = []  # those the journal holds come back with its replay
                if pending:
                    self._finish_rows(len(pending), errors=0, lost=[ack for _, ack in pending])
        with self._cond:  # what was queued meanwhile is in the journal read below
            queued = list(self._items)
            self._items.clear()
            still_open = frozenset(self._columns)
        items = items + self._not_in_journal(queued)
        replay = [] if self._journal_w is None else self._replay(self._journal_w, still_open)
        held, self._held = self._held, []
        return replay + held + items

    def _drop_held(self) -> None:
        """At the writer's end: what waited for a catalog that never came back is lost; a
        flush held with it answers after the rows held before it are counted lost."""
        held, self._held = self._held, []
        rows: list[Ack | None] = []  # the rows held since the last flush
        for item in [*held, ("flush", None)]:  # a last flush: what follows the others
            if item[0] == "row":
                rows.append(item[3])
            elif item[0] == "flush":  # told after the rows held before it are counted lost
                if rows:
                    logger.error(
                        "analysis store: %d rows not in the journal were never stored", len(rows)
                    )
                    self._finish_rows(len(rows), errors=len(rows), lost=rows)
                    rows = []
                if item[1] is not None:
                    item[1].settle(self._counts["write_lost"])
            else:  # counted as the rows are: loss is seen in /metrics
                raw_uid = item[1].raw_uid if item[0] in ("open", UNJOURNALLED_OPEN) else item[1]
                logger.error("analysis store: %s of run %s was not recorded", item[0], raw_uid)
                self._count("errors")
