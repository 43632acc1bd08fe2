"""A hung analysis store does not blind monitoring: /metrics, /health and the dashboard's
state answer while a journal write or a catalog write hangs, and the store's stall shows.

From the last session's closing note: a store hung while holding its lock could block ``/metrics``
itself (``XasflowDown``, not a store alert). Before the fix, with the processing thread held
in the callers' journal (its ``COMMIT``, or ``open_run``'s insert under the store's lock),
``AnalysisStore.stats`` waited for the store's lock or the journal connection's lock: GETs
of ``/metrics``, ``/health`` and ``/api/state`` timed out (4 s client timeout, scratch
s40/A/repro.py) while ``/livez`` and ``/readyz`` answered.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")

from helpers import (
    STEP_GRID,
    Harness,
    LoopbackProxy,
    daemon_config,
    publish,
    step_scan,
    transmission,
    wait_for,
)

import xasflow.adapters.tiled_writer as tiled_writer
from xasflow import paths

pytestmark = pytest.mark.timeout(240)

#: The client's patience: a monitoring request that waits on the store fails it.
_CLIENT_TIMEOUT_S = 3.0


class _HeldDb:
    """A journal's sqlite3 connection whose next statement starting ``prefix`` waits for
    ``release`` once armed (a write hung in the kernel: its fsync, a stalled disk), with the
    journal's lock held (and, for ``open_run``, the store's, before it wrote outside it)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.prefix: str | None = None
        self.entered, self.release = threading.Event(), threading.Event()

    def arm(self, prefix: str) -> None:
        self.entered.clear()
        self.release.clear()
        self.prefix = prefix

    def execute(self, sql: str, *args: Any) -> Any:
        if self.prefix is not None and sql.startswith(self.prefix):
            self.prefix = None
            self.entered.set()
            self.release.wait(120)
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _get(h: Harness, path: str) -> tuple[int, bytes]:
    """GET ``path`` with a short timeout (a 503 is an answer too)."""
    try:
        with urllib.request.urlopen(h.daemon.http_url + path, timeout=_CLIENT_TIMEOUT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _gauge(metrics: bytes, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", metrics.decode(), re.MULTILINE)
    return float(found[1]) if found else None


@pytest.fixture()
def harness(tmp_path: Path) -> Iterator[Harness]:
    proxy = LoopbackProxy()
    h = Harness(daemon_config(paths.REPO_ROOT / "models", proxy, tmp_path / "store"), proxy)
    try:
        yield h
    finally:
        h.close()
        proxy.close()


def test_monitoring_answers_while_a_journal_write_hangs(harness: Harness) -> None:
    """The processing thread hung in the callers' journal: first in a page's ``COMMIT``
    (the journal's lock held), then in a run's ``open_run`` insert (the store's lock held
    too, before it wrote outside it). Each time /metrics, /health and /api/state answer within the client's timeout,
    with the store's counters; released, the scans are analysed."""
    h = harness
    store = h.daemon.parts.store
    held = _HeldDb(store._journal._db)
    store._journal._db = held
    uids = []
    for prefix in ("COMMIT", "INSERT INTO runs"):
        held.arm(prefix)
        uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID))
        publish(h.pub, docs)
        uids.append(uid)
        assert held.entered.wait(60), f"the journal's {prefix} was not reached"
        try:
            code, body = _get(h, "/metrics")
            assert code == 200 and _gauge(body, "xasflow_store_journal_rows") is not None
            code, body = _get(h, "/health")
            assert code == 200 and json.loads(body)["store"]["directory"] is not None
            assert _get(h, "/api/state")[0] == 200
        finally:
            held.release.set()
    h.results.wait(uids, timeout=60)


def test_a_hung_catalog_write_shows_as_a_stalled_store(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread hung in a run's catalog write: its row waits (store queued 1) and
    ``xasflow_store_stalled_seconds`` (``/health`` ``store.stalled_ms``) grows past 2 s, the
    figure XasflowStoreStalled reads; released, the row is written and it is back to 0.
    Before, nothing said so: the queue gauge alone looks the same for a store keeping up."""
    h = harness
    entered, release = threading.Event(), threading.Event()
    attach = tiled_writer.attach_run

    def hung_attach(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(120)
        return attach(*args, **kwargs)

    monkeypatch.setattr(tiled_writer, "attach_run", hung_attach)
    code, body = _get(h, "/metrics")
    assert code == 200 and _gauge(body, "xasflow_store_stalled_seconds") == 0.0
    uid, docs = step_scan(STEP_GRID, transmission(STEP_GRID))
    publish(h.pub, docs)
    try:
        assert entered.wait(60)
        health = wait_for(
            lambda: (b := json.loads(_get(h, "/health")[1]))["store"]["stalled_ms"] > 2000 and b,
            "the store stalled over 2 s",
            60,
        )
        assert health["store"]["queued"] >= 1
        code, body = _get(h, "/metrics")
        stalled = _gauge(body, "xasflow_store_stalled_seconds")
        assert code == 200 and stalled is not None and stalled > 2.0
        assert (_gauge(body, "xasflow_store_queued") or 0) >= 1
    finally:
        release.set()
    h.results.wait([uid], timeout=60)
    assert h.daemon.parts.store.flush(30)
    wait_for(
        lambda: _gauge(_get(h, "/metrics")[1], "xasflow_store_stalled_seconds") == 0.0,
        "the stall over",
    )
