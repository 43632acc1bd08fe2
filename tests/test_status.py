"""The daemon's read-only view (``DaemonStatus``) over the parts its composition root built."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.parts import Parts
from xasflow.daemon.service import Daemon
from xasflow.daemon.status import DaemonStatus


def test_health_answers_before_any_part_is_built(tmp_path: Path) -> None:
    """What /health says for a daemon whose start failed before building anything."""
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    status = DaemonStatus(config, Counters(), Parts())
    health = status.health()
    assert health["ready"] is False and health["uptime_s"] == 0.0
    assert health["models"] == [] and health["registry"] is None
    assert health["store"] == {"directory": None} and status.store_stats() == {}
    assert health["input"]["kind"] == "zmq" and health["input"]["address"] == config.input.address
    assert health["queue_depth"] == 0 and health["open_runs"] == 0
    assert health["limits"]["input_queue"]["max"] == config.input.queue_size
    assert health["internal_errors"] == 0


class _Store:
    def stats(self) -> dict[str, int]:
        return {"stored": 7, "queued": 2}


class _Writer:
    unstored = 3
    lost = 1


def test_store_stats_fold_in_the_writer_and_the_acknowledged_rows(tmp_path: Path) -> None:
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    parts = Parts(store=_Store(), writer=_Writer())
    status = DaemonStatus(config, Counters(), parts)
    for _ in range(5):
        status.row_acknowledged()
    stats = {"stored": 7, "queued": 2, "unstored": 3, "lost": 1, "acknowledged": 5}
    assert status.store_stats() == stats
    status.sync_stats()
    assert status.counters.snapshot()["gauges"]["store_queued"] == 2
    assert status.health()["store"]["directory"] == str(tmp_path / "store")


def test_a_daemon_hands_out_its_view_not_itself(tmp_path: Path) -> None:
    """HTTP and the dashboard get ``daemon.view``: it reads the daemon's parts as they are
    built, and it is not the daemon (no lifecycle reachable from the web side)."""
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    daemon = Daemon(config)
    view: Any = daemon.view
    assert view.parts is daemon.parts and view.counters is daemon.counters
    assert not hasattr(view, "start") and not hasattr(view, "stop")
    daemon.parts.source = type("Src", (), {"stats": lambda self: {"queue_depth": 4}})()
    assert view.input_stats() == {"queue_depth": 4}


class _StalledStore:
    """A store whose counts wait, as the journal's do while a write holds its lock."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def stats(self) -> dict[str, int]:
        self.entered.set()
        self.release.wait(30)
        return {"queued": 0}


def _get_in_thread(client: Any, paths: tuple[str, ...], codes: dict[str, int]) -> threading.Thread:
    """GET each path in turn from a thread of its own, status codes into ``codes``."""

    def get() -> None:
        for path in paths:
            codes[path] = client.get(path).status_code

    thread = threading.Thread(target=get)
    thread.start()
    return thread


def test_a_stalled_store_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    """/health and /metrics read the store's counts off the event loop: while they wait,
    /livez and /readyz (an orchestrator's probes) still answer."""
    from starlette.testclient import TestClient

    from xasflow.daemon.http import create_app

    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    store = _StalledStore()
    status = DaemonStatus(config, Counters(), Parts(store=store))
    with TestClient(create_app(status)) as client:  # one event loop for every request
        for slow_path, code in (("/health", 503), ("/metrics", 200)):  # not started: 503
            store.entered.clear()
            store.release.clear()
            codes: dict[str, int] = {}
            waiting = _get_in_thread(client, (slow_path,), codes)
            assert store.entered.wait(10)
            prober = _get_in_thread(client, ("/livez", "/readyz"), codes)
            prober.join(10)
            answered = not prober.is_alive()
            store.release.set()
            prober.join(10)
            waiting.join(10)
            assert answered, f"{slow_path} held the event loop"
            assert codes == {slow_path: code, "/livez": 200, "/readyz": 503}


def test_health_tells_rejections_at_assembly_from_those_at_analysis(tmp_path: Path) -> None:
    """Before: /health gave ``spectra_rejected`` only as the sum of both stages, so an
    operator could not tell documents the assembler refused (malformed, of an unknown run,
    never a spectrum handed on) from spectra the analysis rejected. Now the total stays and
    ``spectra_rejected_by_stage`` gives each stage's, both from 0; received spectra are
    analysed or rejected by the analysis, never by the assembly."""
    from xasflow.daemon.dashboard_views import health_view
    from xasflow.daemon.pipeline import known_rejections

    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    counters = Counters(rejections=known_rejections())
    status = DaemonStatus(config, counters, Parts())
    fresh = status.health()["counters"]
    assert fresh["spectra_rejected"] == 0
    assert fresh["spectra_rejected_by_stage"] == {"analysis": 0, "assembly": 0}

    counters.reject("malformed_document", stage="assembly", n=2)
    counters.reject("unknown_run", stage="assembly")
    counters.spectrum_received(3)
    counters.spectrum_analysed(2)
    counters.reject("no_model")  # stage "analysis"
    c = status.health()["counters"]
    assert c["spectra_rejected"] == 4  # the total, as before
    assert c["spectra_rejected_by_stage"] == {"analysis": 1, "assembly": 3}
    by_stage = c["spectra_rejected_by_stage"]
    assert c["spectra_received"] == c["spectra_analysed"] + by_stage["analysis"]
    # the dashboard's health numbers carry the same split beside the total
    view = health_view(status.health())
    assert view["rejected_total"] == 4
    assert view["rejected_per_stage"] == {"analysis": 1, "assembly": 3}


class _CountingStore:
    """A store that counts its ``stats()`` calls (each counts the journal's rows twice)."""

    def __init__(self) -> None:
        self.calls = 0

    def stats(self) -> dict[str, int]:
        self.calls += 1
        return {"queued": 4, "stored": 9, "dropped": 1, "journal_rows": 5}


def test_each_report_reads_the_store_once(tmp_path: Path) -> None:
    """Before, one /health read the store's stats 3 times (the gauges, its store section,
    its limits) and one /metrics twice (the gauges, the collector); now each request, and
    each processing tick, reads them once and reports that one reading everywhere."""
    from starlette.testclient import TestClient

    from xasflow.daemon.http import create_app

    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    store = _CountingStore()
    status = DaemonStatus(config, Counters(), Parts(store=store))
    status.ready = True
    with TestClient(create_app(status)) as client:
        health = client.get("/health").json()
        assert store.calls == 1
        assert health["store"]["queued"] == 4 and health["store"]["journal_rows"] == 5
        assert health["limits"]["store_queue"]["depth"] == 4
        assert health["limits"]["store_queue"]["dropped"] == 1
        assert status.counters.snapshot()["gauges"]["store_queued"] == 4
        metrics = client.get("/metrics").text
        assert store.calls == 2
        assert "xasflow_store_journal_rows 5.0" in metrics
        assert 'xasflow_store_rows_total{outcome="stored"} 9.0' in metrics
        assert 'xasflow_limit_used{limit="store_queue"} 4.0' in metrics
    status.sync_stats()  # the processing thread's tick
    assert store.calls == 3


class _BlockedStore:
    """A store whose ``stats()`` blocks until released (a part that hangs), calls counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def stats(self) -> dict[str, int]:
        self.calls += 1
        self.entered.set()
        self.release.wait(60)
        return {"queued": self.calls}


def _get_code(client: Any, path: str, codes: list[int]) -> None:
    codes.append(client.get(path).status_code)


def test_a_blocked_part_takes_one_thread_and_later_scrapes_are_refused(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Before, each /health or /metrics took a thread of the event loop's shared pool until
    its read answered: a part blocked for good took one per scrape until the pool (6 threads
    on 2 cores) was spent and the endpoints went dark. Now one read per endpoint runs at a
    time, in a thread of its own, shared by the requests that come while it runs; once it
    is SCRAPE_WAIT_S old they get 503 at once, and the next request after it answers reads
    afresh."""
    from starlette.testclient import TestClient

    from xasflow.daemon import http

    monkeypatch.setattr(http, "SCRAPE_WAIT_S", 0.2, raising=False)
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    store = _BlockedStore()
    status = DaemonStatus(config, Counters(), Parts(store=store))
    status.ready = True
    with TestClient(http.create_app(status)) as client:
        for path, name in (("/health", "xasflow-health"), ("/metrics", "xasflow-metrics")):
            store.calls = 0
            store.entered.clear()
            store.release.clear()
            codes: list[int] = []
            first = threading.Thread(target=_get_code, args=(client, path, codes))
            first.start()
            assert store.entered.wait(10)
            later = [
                threading.Thread(target=_get_code, args=(client, path, codes)) for _ in range(8)
            ]
            for thread in later:
                thread.start()
            deadline = time.monotonic() + 10
            for thread in [first, *later]:
                thread.join(max(0.0, deadline - time.monotonic()))
            answered = sum(not t.is_alive() for t in [first, *later])
            readers = [t for t in threading.enumerate() if t.name == name]
            calls = store.calls
            store.release.set()  # the part answers again
            assert (answered, codes) == (9, [503] * 9), f"{path}: the scrapes went dark"
            assert calls == 1 and len(readers) == 1  # one read, one thread, held
            for reader in readers:
                reader.join(10)
            response = client.get(path)  # a fresh read once it answered
            assert response.status_code == 200 and store.calls == 2
            if path == "/health":
                assert response.json()["store"]["queued"] == 2
            else:
                assert "xasflow_store_queued 2.0" in response.text


def _open_tab(url: str, tabs: list[Any]) -> None:
    from dashboard_helpers import SSEClient

    tabs.append(SSEClient(url))


def test_a_blocked_part_takes_one_thread_from_the_dashboard_and_its_pages_say_so(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Before, /api/state and each new event stream built the dashboard's message in a thread
    of the event loop's shared pool, which waited on the dashboard's lock while its own thread
    hung in view.health(): one pool thread per poll and per tab, none answered, and an open
    tab kept its last state as if live. Now one build at a time runs in a thread of its own,
    shared; once it is SCRAPE_WAIT_S old /api/state is 503 and a new tab gets the last state
    marked stale, an open tab is told its state is stale, and all answer once it is back."""
    from dashboard_helpers import http_get

    from xasflow.daemon import dashboard, http

    monkeypatch.setattr(http, "SCRAPE_WAIT_S", 0.5)
    monkeypatch.setattr(dashboard, "STALE_AFTER_S", 1.0, raising=False)
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    store = _BlockedStore()
    store.release.set()
    status = DaemonStatus(config, Counters(), Parts(store=store))
    status.ready = True
    server = http.HttpServer(http.create_app(status, config.http))
    server.start()
    try:
        tab = _live_tab(server.url)
        store.release.clear()
        store.entered.clear()
        assert store.entered.wait(10)  # the dashboard's own thread, in the part
        blocked_at = store.calls  # the last report answered is the one before
        codes: list[int] = []
        tabs: list[Any] = []
        polls = [
            threading.Thread(target=lambda: codes.append(http_get(server.url + "/api/state")[0]))
            for _ in range(8)
        ]
        polls += [threading.Thread(target=_open_tab, args=(server.url, tabs)) for _ in range(4)]
        for thread in polls:
            thread.start()
        deadline = time.monotonic() + 10
        for thread in polls:
            thread.join(max(0.0, deadline - time.monotonic()))
        builders = [t for t in threading.enumerate() if t.name == "xasflow-dashboard-state"]
        assert (codes, len(tabs)) == ([503] * 8, 4), "the dashboard went dark"
        assert store.calls == blocked_at and len(builders) == 1  # one build, one thread, held
        for t in tabs:  # a new tab: the last state there is, marked stale
            event, mark = t.next_event(deadline)
            assert event == "stale" and mark["state"]["health"]["store"]["queued"] == blocked_at - 1
        event, mark = _next_mark(tab, deadline)  # the open tab: its state is now stale
        assert event == "stale" and mark["state"] is None and mark["age_s"] >= 1.0
        store.release.set()  # the part answers again
        fresh = tab.next_state(time.monotonic() + 10)  # live again, with a fresh report
        assert fresh["health"]["store"]["queued"] >= blocked_at
        code, _, body = http_get(server.url + "/api/state")
        assert code == 200 and json.loads(body)["health"]["store"]["queued"] >= blocked_at
        for t in (tab, *tabs):
            t.close()
    finally:
        store.release.set()
        server.stop()


def _live_tab(url: str) -> Any:
    """An event stream whose first state carries a health report (the part answers)."""
    from dashboard_helpers import SSEClient

    tab = SSEClient(url)
    state = tab.next_state(time.monotonic() + 10)
    assert tab.status == 200 and state["health"]["store"]["queued"] >= 1
    return tab


def _next_mark(tab: Any, deadline: float) -> tuple[str, Any]:
    """The stream's next event that is no state (states built before the part blocked)."""
    while True:
        event, data = tab.next_event(deadline)
        if event != "state":
            return event, data
