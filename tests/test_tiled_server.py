"""The store's catalog served by a child process: same results, a key it insists on, no
warm-up left behind, no child outliving its daemon (even one killed by SIGKILL), and a child
that dies under the daemon restarted (with back-off) and the journal replayed into it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row, wait_for

from xasflow.adapters.catalog_supervisor import CatalogSupervisor
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def _catalog_children(pid: int) -> list[int]:
    """The catalog servers among ``pid``'s children, whichever thread started them (the test
    process has others)."""
    pids = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            pids += [int(p) for p in path.read_text().split()]
    return [c for c in pids if b"xasflow.adapters.tiled_server" in _cmdline(c)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_rows_round_trip_through_the_child_and_it_goes_with_the_store(tmp_path: Path) -> None:
    store = AnalysisStore(tmp_path / "s", journal=True, catalog_process=True)
    try:
        assert list(store.client()) == []  # the warm-up run was deleted
        children = _catalog_children(os.getpid())
        assert children, "the catalog is not served by a child process"
        store.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
        acked: list[int] = []
        rows = [store_row(i, motifs=[0.7, 0.2, 0.1]) for i in (1, 2, 3)]
        assert store.add_events("run-a", rows, on_stored=lambda: acked.append(1)) == [True] * 3
        assert len(acked) == 3  # journalled: acknowledged before the catalog has them
        store.close_run("run-a", {"uid": "a-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        uri = store.client().uri
        with pytest.raises(urllib.error.HTTPError) as refused:  # no key, no catalog
            urllib.request.urlopen(uri, timeout=10)
        assert refused.value.code in (401, 403)
    finally:
        store.close()
    assert wait_for(lambda: not any(_alive(c) for c in children), timeout=15)
    meta, frame = read_analysis(tmp_path / "s", "run-a")  # read in-process, after the fact
    assert meta["stop"]["exit_status"] == "success"
    assert list(frame["seq_num"]) == [1, 2, 3] and frame["motifs"][0] == [0.7, 0.2, 0.1]


def test_a_store_closed_and_opened_again_in_one_process_appends(tmp_path: Path) -> None:
    """A second store on the same directory, in the process that closed the first (a notebook,
    a restarted Daemon object), appends rows. It failed with "no such table" while this side
    kept the first store's pooled connections to the tables' database."""
    for run, seq in (("run-a", 1), ("run-b", 2)):
        store = AnalysisStore(tmp_path / "s", journal=True, catalog_process=True)
        try:
            store.open_run(run, {"uid": f"{run}-start"}, DESCRIPTOR)
            assert store.add_events(run, [store_row(seq)]) == [True]
            store.close_run(run, {"uid": f"{run}-stop", "exit_status": "success"})
            assert store.flush(timeout=30)
            assert store.stats()["errors"] == 0
        finally:
            store.close()
    assert list(read_analysis(tmp_path / "s", "run-a")[1]["seq_num"]) == [1]
    assert list(read_analysis(tmp_path / "s", "run-b")[1]["seq_num"]) == [2]


def test_the_child_exits_when_its_daemon_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives the store no chance to stop its child: the child sees its stdin close."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from xasflow.adapters.tiled_store import AnalysisStore
        store = AnalysisStore({str(tmp_path / "s")!r}, journal=True, catalog_process=True)
        children = open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children").read().split()
        print(" ".join(children), flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        children = [int(p) for p in proc.stdout.readline().split()]
        assert children and all(_alive(c) for c in children)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert wait_for(lambda: not any(_alive(c) for c in children), timeout=15)


def test_stop_signals_are_left_to_the_daemon(tmp_path: Path) -> None:
    """Ctrl-C and systemd's SIGTERM reach the whole group: the child outlives them, so the
    daemon can still flush and record its stops, and goes when the store closes."""
    store = AnalysisStore(tmp_path / "s", journal=True, catalog_process=True)
    try:
        (child,) = _catalog_children(os.getpid())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(child, sig)
        store.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
        assert store.add_events("run-b", [store_row(1, motifs=[1.0, 0.0, 0.0])]) == [True]
        store.close_run("run-b", {"uid": "b-stop", "exit_status": "success"})
        assert store.flush(timeout=30) and _alive(child)
        assert store.stats()["errors"] == 0
    finally:
        store.close()
    assert wait_for(lambda: not _alive(child), timeout=15)
    meta, frame = read_analysis(tmp_path / "s", "run-b")
    assert meta["stop"]["exit_status"] == "success" and list(frame["seq_num"]) == [1]


def test_a_killed_catalog_child_is_restarted_and_the_journal_replayed_into_it(
    tmp_path: Path,
) -> None:
    """The child SIGKILLed under an open store: ``catalog_up`` drops to 0, rows are still
    acknowledged from the journal, and the store starts a new child by itself and replays
    the journal into it; every row, from before and after the kill, is stored once."""
    store = AnalysisStore(tmp_path / "s", journal=True, catalog_process=True)
    try:
        store.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
        assert store.add_events("run-a", [store_row(i) for i in (1, 2)]) == [True] * 2
        assert store.flush(timeout=30)
        (child,) = _catalog_children(os.getpid())
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: store.stats()["catalog_up"] == 0, "the dead catalog reported")
        acked: list[int] = []
        ack = lambda: acked.append(1)  # noqa: E731
        # the open run goes on, and a whole run comes and goes, while the catalog is down
        assert store.add_events("run-a", [store_row(3), store_row(4)], on_stored=ack) == [True] * 2
        store.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
        rows = [store_row(i, motifs=[0.6, 0.3, 0.1]) for i in (1, 2, 3)]
        assert store.add_events("run-b", rows, on_stored=ack) == [True] * 3
        store.close_run("run-b", {"uid": "b-stop", "exit_status": "success"})
        assert len(acked) == 5  # acknowledged from the journal, not waiting for the catalog

        def recovered() -> bool:
            s = store.stats()  # run-a is still open: its record stays in the journal
            return s["catalog_up"] == 1 and s["journal_rows"] == 0 and s["journal_runs"] == 1

        wait_for(recovered, "the catalog restarted and the journal replayed into it", 30)
        assert store.stats()["catalog_restarts"] == 1
        new = _catalog_children(os.getpid())
        assert len(new) == 1 and new[0] != child
        assert not _alive(child)  # the dead one was reaped
        assert store.add_events("run-a", [store_row(5)]) == [True]
        store.close_run("run-a", {"uid": "a-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        stats = store.stats()
        assert stats["errors"] == 0 and stats["catalog_restart_failures"] == 0
        assert stats["journal_runs"] == 0 and stats["stored"] == 8
        meta_a, frame_a = read_analysis(store, "run-a")
        meta_b, frame_b = read_analysis(store, "run-b")
    finally:
        store.close()
    assert list(frame_a["seq_num"]) == [1, 2, 3, 4, 5] and meta_a["stop"]["uid"] == "a-stop"
    assert list(frame_b["seq_num"]) == [1, 2, 3] and frame_b["motifs"][2] == [0.6, 0.3, 0.1]
    assert meta_b["start"]["uid"] == "b-start" and meta_b["stop"]["exit_status"] == "success"


def test_a_child_that_cannot_start_is_retried_with_growing_delays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each failed try is counted and logged and the next waits 1 s, 2 s, 4 s (at most, here):
    a child that cannot start never spins; once one starts, it counts as a restart. The
    times are the supervisor's clock, given here: nothing sleeps."""
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    broken.chmod(0o755)
    directory = tmp_path / "s"
    directory.mkdir()
    uris = [f"sqlite:///{directory / 'tables.sqlite'}"]
    sup = CatalogSupervisor(directory, uris, first_delay=1.0, max_delay=4.0, python=str(broken))
    caplog.set_level(logging.ERROR, logger="xasflow.adapters.tiled_store")
    assert sup.poll(0.0) is None and sup.failures == 1  # down, never tried: tried at once
    for n, now in enumerate([1.0, 3.0, 7.0], start=2):  # then 1 s, 2 s, 4 s after the last
        assert sup.poll(now - 0.01) is None and sup.failures == n - 1  # not due yet: no try
        assert sup.poll(now) is None and sup.failures == n  # due: tried, failed
        assert not sup() and sup.restarts == 0
    assert [sup.next_check(t) for t in (7.5, 10.9)] == [11.0, 11.0]  # capped at 4 s
    failed = [r.getMessage() for r in caplog.records if "did not restart" in r.getMessage()]
    assert len(failed) == 4 and all("exit code 3" in m for m in failed)
    assert [m.rsplit("next try in ", 1)[1] for m in failed] == ["1 s", "2 s", "4 s", "4 s"]
    sup.python = sys.executable  # the cause is gone: the next try brings the catalog back
    try:
        assert sup.poll(10.9) is None and sup.failures == 4
        root = sup.poll(11.0)
        assert root is not None and sup() and sup.restarts == 1 and list(root) == []
        (child,) = _catalog_children(os.getpid())
        os.kill(child, signal.SIGKILL)  # dies again soon after: still backing off
        wait_for(lambda: not sup(), "the second death seen")
        assert sup.poll(12.0) is None and sup.next_check(12.0) == 16.0
    finally:
        sup.close()


def test_a_run_the_journal_could_not_open_waits_for_a_dead_catalog_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the catalog's child is down, what the journal holds is left to its replay and the
    rest waits in memory. A run whose start the journal could not record (its write lock held
    past the busy timeout) is in no replay: its open, rows and stop wait in memory like any
    unjournalled work and reach the new child, each row acknowledged once there. Before,
    ``open_run`` raised and the run's rows were never taken."""
    import sqlite3

    from xasflow.adapters.store_journal import Journal

    real = Journal.open_run

    def locked(self: Journal, raw_uid: str, *args: object, **kw: object) -> object:
        if raw_uid == "run-c":
            raise sqlite3.OperationalError("database is locked")
        return real(self, raw_uid, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Journal, "open_run", locked)
    store = AnalysisStore(tmp_path / "s", journal=True, catalog_process=True)
    try:
        (child,) = _catalog_children(os.getpid())
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: store.stats()["catalog_up"] == 0, "the dead catalog reported")
        acked: list[int] = []
        store.open_run("run-c", {"uid": "c-start"}, DESCRIPTOR)
        rows = [store_row(i) for i in (1, 2, 3)]
        assert store.add_events("run-c", rows, on_stored=lambda: acked.append(1)) == [True] * 3
        store.close_run("run-c", {"uid": "c-stop", "exit_status": "success"})
        assert acked == []  # in no journal: acknowledged by the catalog's commit alone
        wait_for(lambda: store.stats()["catalog_up"] == 1, "the catalog restarted", 30)
        assert store.flush(timeout=30)
        stats = store.stats()
        meta, frame = read_analysis(store, "run-c")
    finally:
        store.close()
    assert len(acked) == 3 and stats["errors"] == 0 and stats["journalled"] == 0
    assert list(frame["seq_num"]) == [1, 2, 3] and meta["start"]["uid"] == "c-start"
    assert meta["stop"]["uid"] == "c-stop" and stats["journal_runs"] == 0


def test_settled_overrides_keep_the_apps_settings_without_rebuilding_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiled's ``get_settings`` override made FastAPI rebuild every route's dependency graph
    for every request (about half of the catalog child's CPU); settled, a request rebuilds
    none, and the app still insists on its own key (the override's settings are in effect)."""
    import fastapi.dependencies.utils as fastapi_deps
    from starlette.testclient import TestClient
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    from xasflow.adapters.tiled_schema import settle_overrides

    def app() -> object:
        tree = from_uri(f"sqlite:///{tmp_path / 'catalog.db'}", init_if_not_exists=True)
        return build_app(tree, authentication=Authentication(single_user_api_key="secret"))

    rebuilt = []
    original = fastapi_deps.get_dependant

    def counting(*args: object, **kwargs: object) -> object:
        rebuilt.append(kwargs.get("call"))
        return original(*args, **kwargs)

    def per_request(application: object) -> tuple[int, int, int]:
        with TestClient(application) as client:  # type: ignore[arg-type]
            client.get("/api/v1/metadata/", headers={"Authorization": "Apikey secret"})
            rebuilt.clear()
            ok = client.get("/api/v1/metadata/", headers={"Authorization": "Apikey secret"})
            n = len(rebuilt)
            refused = client.get("/api/v1/metadata/", headers={"Authorization": "Apikey wrong"})
        return n, ok.status_code, refused.status_code

    monkeypatch.setattr(fastapi_deps, "get_dependant", counting)
    before = per_request(app())
    settled = app()
    assert settle_overrides(settled)
    after = per_request(settled)
    assert before[0] > 0 and before[1:] == (200, 401)
    assert after == (0, 200, 401)


def test_a_damaged_journal_record_is_counted_once_across_catalog_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record the journal cannot read back is kept for a person, logged and counted in
    ``errors`` when the store starts. Each restart of a dead catalog child replays the
    journal again; before, that logged and counted the same record again (errors 2 after
    one restart: a child dying now and then kept the errors alert firing on nothing new).
    Now a store says and counts each such thing once."""
    import sqlite3

    from xasflow.adapters.store_journal import JOURNAL_FILE, Journal

    directory = tmp_path / "s"
    directory.mkdir()
    journal = Journal(directory / JOURNAL_FILE)
    journal.open_run("run-x", {"uid": "x-start"}, DESCRIPTOR)
    journal.close()
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        db.execute("UPDATE runs SET start = '{\"uid\": ' WHERE raw_uid = 'run-x'")
    caplog.set_level(logging.ERROR, logger="xasflow.adapters.tiled_store")
    store = AnalysisStore(directory, journal=True, catalog_process=True)
    try:
        assert store.flush(timeout=30)
        first = store.stats()["errors"]
        (child,) = _catalog_children(os.getpid())
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: store.stats()["catalog_restarts"] == 1, "the catalog restarted", 30)
        assert store.flush(timeout=30)  # after the journal's replay into the new child
        stats = store.stats()
    finally:
        store.close()
    said = [r.getMessage() for r in caplog.records if "run run-x's record" in r.getMessage()]
    assert (first, stats["errors"], stats["journal_runs"], len(said)) == (1, 1, 1, 1)
