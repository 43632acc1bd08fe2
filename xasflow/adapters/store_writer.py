"""The analysis store as a document consumer, in the manner of bluesky's ``TiledWriter``.

:class:`StoreWriter` is an event-model ``RunRouter`` whose factory gives each analysis run a
:class:`_RunWriter` (a ``SinkRouter``): the ``primary`` descriptor opens the run's table
(``store.open_run``), its events and event pages become rows (``store.add_events``, batched
and committed by the store's writer thread), and the stop closes it (``store.close_run``).
Other streams of an analysis run (e.g. ``recommendations``) go to the bus only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from xasflow.adapters.routing import SafeRouter, SinkRouter

__all__ = ["StoreWriter"]

logger = logging.getLogger(__name__)

#: The analysis stream that is stored (one table per analysis run).
STORED_STREAM = "primary"


class StoreWriter:
    """Turns analysis documents into ``AnalysisStore`` calls; counts rows it could not store.

    ``on_stored`` is passed to ``add_events``: called once per row when it is durable. A row
    the store accepted and then gave up is counted in ``lost`` and resolved at the gate, so
    the gate never waits for a commit that cannot come.
    """

    def __init__(
        self,
        store: Any,
        stream: str = STORED_STREAM,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.stream = stream
        self.on_stored = on_stored
        self.unstored = 0  # rows the store refused, or that came before their table was open
        self.lost = 0  # rows the store accepted and then gave up (store thread)
        self.open_runs = 0
        self.gate: Any = None  # a CommitGate told of every row submitted and resolved
        self._router = SafeRouter([self._factory], "analysis store")

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        before = self._router.errors + self._router.unknown
        self._router(name, doc)
        failed = self._router.errors + self._router.unknown != before
        if failed and name in ("event", "event_page"):
            self.unstored += len(doc.get("seq_num") or ()) if name == "event_page" else 1

    def row_lost(self) -> None:
        """An accepted row will never be stored (called from the store's writer thread)."""
        self.lost += 1
        if self.gate is not None:
            self.gate.row_resolved()

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        return [_RunWriter(self, start)], []  # every run the daemon emits is an analysis run


class _RunWriter(SinkRouter):
    """One analysis run's table: opened at its stored stream's descriptor, closed at the stop."""

    def __init__(self, writer: StoreWriter, start: dict[str, Any]) -> None:
        super().__init__()
        self.writer = writer
        self.start_doc = start
        self.raw_uid = str(start.get("raw_uid") or start["uid"])
        self.descriptor_uid: str | None = None

    def descriptor(self, doc: Any) -> Any:
        if doc.get("name", STORED_STREAM) != self.writer.stream or self.descriptor_uid:
            return  # another stream, or a second descriptor: one table per analysis run
        self.writer.store.open_run(self.raw_uid, self.start_doc, doc)
        self.descriptor_uid = doc["uid"]
        self.writer.open_runs += 1

    def event_page(self, doc: Any) -> Any:
        if doc["descriptor"] != self.descriptor_uid:
            if self.descriptor_uid is None:
                self.writer.unstored += len(doc["seq_num"])
            return
        data, times = doc["data"], doc["time"]
        writer = self.writer
        store, gate = writer.store, writer.gate
        rows = [
            {"seq_num": seq, "time": times[i], **{k: v[i] for k, v in data.items()}}
            for i, seq in enumerate(doc["seq_num"])
        ]
        if gate is not None:
            for _ in rows:
                gate.row_submitted()
        try:
            stored = store.add_events(
                self.raw_uid, rows, on_stored=writer.on_stored, on_lost=writer.row_lost
            )
        except Exception:  # none taken (store closing, run not open, a bad key): resolved
            if gate is not None:
                for _ in rows:
                    gate.row_resolved()
            raise  # counted unstored by the router's caller
        for ok in stored:
            if not ok:
                writer.unstored += 1
                if gate is not None:
                    gate.row_resolved()  # refused: counted as unstored, nothing to wait for

    def stop(self, doc: Any) -> Any:
        if self.descriptor_uid is not None:
            self.writer.store.close_run(self.raw_uid, doc)
            self.writer.open_runs -= 1
