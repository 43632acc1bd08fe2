"""The analysis store's journal when a run is opened again before the writer has reached the
close of its earlier copy, that close one the journal could not record (the copy was opened
without the journal, or its stop could not be written): the later copy's record must
survive that close, or its acknowledged rows have nothing to be replayed under.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


class _Killed(BaseException):
    """Ends the writer thread where it stands (no commit, no close), as SIGKILL would."""


def _hold(store: AnalysisStore) -> tuple[threading.Event, threading.Thread]:
    """Hold the writer thread in a call until the returned event is set: what is queued
    meanwhile waits behind it."""
    go, busy = threading.Event(), threading.Event()
    thread = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
    thread.start()
    assert busy.wait(10)
    return go, thread


def _hold_then_kill(store: AnalysisStore, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the writer thread until the returned event is set, then end it there (no
    commit, no close), as SIGKILL would: what is queued meanwhile is never handled."""
    go, busy = threading.Event(), threading.Event()

    def die() -> None:
        busy.set()
        assert go.wait(30)
        raise _Killed

    hook = threading.excepthook  # the writer's death is the point, not an error to report
    monkeypatch.setattr(
        threading, "excepthook", lambda a: None if a.exc_type is _Killed else hook(a)
    )
    with store._cond:
        store._items.append(("call", die, {}, threading.Event()))
        store._cond.notify()
    assert busy.wait(10)
    return go


def _crash(store: AnalysisStore, go: threading.Event) -> None:
    """Let the held writer die, then drop the store without closing it: its catalog and
    lock released, the journal left as the killed process wrote it."""
    go.set()
    store._writer.join(30)
    assert not store._writer.is_alive()
    for journal in (store._journal, store._journal_w):
        if journal is not None:
            journal.close()
    store._release()


def _fail_first(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The journal's first ``name`` call fails: its write lock held past the busy timeout."""
    real = getattr(Journal, name)
    calls = {"n": 0}

    def locked(self: Journal, *args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(self, *args, **kw)

    monkeypatch.setattr(Journal, name, locked)


@pytest.mark.parametrize("unrecorded", ["open_run", "close_run"])
def test_a_reopen_before_the_writer_reached_an_unjournalled_close_keeps_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unrecorded: str
) -> None:
    """Copy a of run R is opened (or closed) without the journal, copy b is opened with it
    before the writer reaches a's close; b's rows 3 and 4, journalled and so acknowledged at
    once, are still uncommitted when the process is killed. The next start replays them from
    b's record. Before, the writer's close of a forgot R's record whatever came since (b's,
    no rows yet), so b's rows had no record to be replayed under: lost, although
    acknowledged (catalog [1, 2], journal record gone, its two rows orphaned)."""
    _fail_first(monkeypatch, unrecorded)
    directory = tmp_path / "s"
    acked: list[int] = []
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    go, thread = _hold(store)
    store.open_run("R", {"uid": "a"}, DESCRIPTOR)
    store.add_events("R", [_row(s, distance=1.0) for s in (1, 2)])
    store.close_run("R", {"uid": "a-stop", "exit_status": "success"})
    store.open_run("R", {"uid": "b"}, DESCRIPTOR)  # journalled
    go.set()
    thread.join()
    store._call(lambda: None, 30)  # the writer has handled a's close and b's open
    record = [(r.raw_uid, r.start["uid"]) for r in Journal(directory / JOURNAL_FILE).pending()]
    go = _hold_then_kill(store, monkeypatch)  # b's rows: acknowledged, never committed
    for seq in (3, 4):
        assert store.add_event(
            "R", _row(seq, distance=2.0), on_stored=lambda s=seq: acked.append(s)
        )
    _crash(store, go)
    with AnalysisStore(directory, journal=True) as store:  # the next start
        assert store.flush(30)
        replayed = store.stats()["replayed"]
        meta, frame = read_analysis(store, "R")
        unfinished = [(u["raw_uid"], u["rows"]) for u in store.unfinished_runs()]
    seqs = sorted(int(s) for s in frame["seq_num"])
    assert acked == [3, 4]
    assert (record, replayed, seqs) == (
        [("R", "b" if unrecorded == "open_run" else "a")],
        2,
        [1, 2, 3, 4],
    )
    assert meta["stop"] is None and unfinished == [("R", 4)]  # b was open: recovery ends it
