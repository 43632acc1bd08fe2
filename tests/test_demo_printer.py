"""The demo's result printer (:mod:`xasflow.sim.demo_printer`) and how it drains at the end."""

from __future__ import annotations

import io
import queue
from typing import Any

import pytest
from helpers import analysis_run_docs

from xasflow.sim.demo_printer import Printer

OK = {"status": "ok", "cn": 4, "index": 0}


class _Bus:
    """The printer's source: the documents that reached the subscriber, in the bus's order."""

    def __init__(self, docs: list[tuple[str, dict[str, Any]]]) -> None:
        self.queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        for item in docs:
            self.queue.put(item)

    def get(self, timeout: float | None = None) -> tuple[str, dict[str, Any]] | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.mark.timeout(120)
def test_the_drain_ends_at_the_daemons_last_document_when_its_first_ones_never_came() -> None:
    """0MQ loses what is published before the subscription reaches the publisher: the first
    documents. The drain waited for as many documents as the daemon sent, so it waited its
    whole timeout (here 600 s); now it ends once the daemon's last document is taken (the bus
    keeps their order: all after the loss came), and says how many never came."""
    docs = analysis_run_docs([("primary", OK), ("primary", {**OK, "index": 1})], "raw-A")
    docs += analysis_run_docs([("primary", OK)], "raw-B")
    out = io.StringIO()
    printer = Printer(_Bus(docs[2:]), out)  # run A's start and descriptor were lost
    printer.start()
    missing = printer.finish(len(docs), timeout=600.0, last=docs[-1][1]["uid"])
    assert missing == 2
    assert printer.finished == 1 and printer.analysed == 1  # run B, whole
    assert "analysis of run raw-B done: " in out.getvalue(), out.getvalue()
