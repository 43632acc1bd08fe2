"""The store's catalog served by a child process: same results, a key it insists on, no
warm-up left behind, and no child outliving its daemon (even one killed by SIGKILL)."""

from __future__ import annotations

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
    """The catalog servers among ``pid``'s children (the test process has others)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [int(p) for p in path.read_text().split()] if path.exists() else []
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


def test_a_dead_catalog_shows_and_the_journal_still_keeps_results(tmp_path: Path) -> None:
    """The child killed under the store: ``catalog_up`` drops to 0 (xasflow_store_catalog_up,
    the XasflowCatalogDown alert), and rows are still acknowledged from the journal, to be
    replayed into the catalog at the next start."""
    store = AnalysisStore(tmp_path / "s", journal=True, catalog_process=True)
    try:
        assert store.stats()["catalog_up"] == 1
        (child,) = _catalog_children(os.getpid())
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: store.stats()["catalog_up"] == 0, "the dead catalog reported")
        store.open_run("run-c", {"uid": "c-start"}, DESCRIPTOR)
        acked: list[int] = []
        rows = [store_row(i, motifs=[0.6, 0.3, 0.1]) for i in (1, 2)]
        assert store.add_events("run-c", rows, on_stored=lambda: acked.append(1)) == [True] * 2
        assert len(acked) == 2 and store.stats()["journal_rows"] == 2
    finally:
        store.close()
    with AnalysisStore(tmp_path / "s", journal=True) as again:  # the replay at the next start
        assert again.flush(timeout=30) and again.stats()["replayed"] == 2
        _, frame = read_analysis(again, "run-c")
    assert list(frame["seq_num"]) == [1, 2]
