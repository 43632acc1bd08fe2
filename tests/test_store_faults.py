"""The analysis store under faults that leave the catalog changed although the call failed,
and under a run replayed while its predecessor's end is still queued.

Each case broke "every result is in the catalog exactly once, nothing lost unseen" before
its fix (a reviewer's suspicion, shown with these tests; the docstring says what happened).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _seqs(store: AnalysisStore, raw_uid: str) -> list[Any]:
    """The run's stored seq_nums in table order (None for a row stored without one)."""
    frame = read_analysis(store, raw_uid)[1]
    return [None if s != s else int(s) for s in frame["seq_num"]]


@pytest.mark.parametrize(
    ("journal", "keyed", "committed"),
    [
        (True, True, True),
        (False, True, True),
        (True, False, True),
        (False, False, True),
        (True, True, False),  # a failure before the commit is still retried
        (False, False, False),
    ],
    ids=lambda v: str(int(v)),
)
def test_an_append_that_committed_before_it_failed_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool, keyed: bool, committed: bool
) -> None:
    """``append_partition`` commits, then raises (a connection dropped after the commit, a
    timeout on its answer). Before, the store's retry appended the same rows again: each
    result was in the catalog twice, with or without the journal and seq_nums. Now a retry
    first looks at what the failed try left; one that did not commit is written again."""
    from tiled.adapters.sql import SQLAdapter

    real = SQLAdapter.append_partition
    faults = {"left": 1}

    def commit_then_fail(self: Any, *args: Any, **kwargs: Any) -> Any:
        if committed:
            real(self, *args, **kwargs)
        if faults["left"] > 0:
            faults["left"] -= 1
            raise OSError("connection reset" + (" after the commit" if committed else ""))
        if not committed:
            real(self, *args, **kwargs)

    monkeypatch.setattr(SQLAdapter, "append_partition", commit_then_fail)
    rows = [_row(s) for s in (1, 2, 3)]
    if not keyed:
        for row in rows:
            del row["seq_num"]
    stored: list[int] = []
    lost: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=journal) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.add_events(
            "R", rows, on_stored=lambda: stored.append(1), on_lost=lambda: lost.append(1)
        )
        assert store.flush(30)
        assert faults["left"] == 0  # the fault did happen
        got = _seqs(store, "R")
        stats = store.stats()
    assert got == ([1, 2, 3] if keyed else [None, None, None])  # once each
    assert (len(stored), len(lost), stats["errors"]) == (3, 0, 0)


def test_a_finished_run_replayed_before_its_finish_is_written_keeps_its_journal_record(
    tmp_path: Path,
) -> None:
    """The daemon closes a run a killed predecessor left open (``finish_run``) and, before
    the writer has written that stop, Kafka redelivers the run's start: it is opened again
    and its rows journalled. Before, the writer's finish forgot the journal's record of the
    run whatever it held, the reopened copy's included: the rows journalled next had no run
    to be replayed under, so a crash then lost results already acknowledged."""
    directory = tmp_path / "s"
    with AnalysisStore(directory) as store:  # a predecessor killed with run R open
        store.open_run("R", {"uid": "a1"}, DESCRIPTOR)
        store.add_events("R", [_row(1), _row(2)])
        assert store.flush(30)
    acked: list[int] = []
    with AnalysisStore(directory, journal=True, flush_interval=30.0) as store:
        assert [u["raw_uid"] for u in store.unfinished_runs()] == ["R"]
        go, busy = threading.Event(), threading.Event()
        blocker = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
        blocker.start()
        assert busy.wait(10)  # the writer is busy: what follows waits in its queue
        store.finish_run("R", {"uid": "stop-x", "exit_status": "fail", "interrupted": True})
        store.open_run("R", {"uid": "a2"}, DESCRIPTOR)  # the start redelivered
        go.set()
        blocker.join()
        store._call(lambda: None, 30)  # the writer has handled the finish and the reopen
        for seq in (3, 4):  # journalled and acknowledged; the catalog takes them in 30 s
            store.add_event("R", _row(seq), on_stored=lambda s=seq: acked.append(s))
        assert acked == [3, 4]
        # what the next start would replay if the process were killed now
        replay = {run.raw_uid: run for run in Journal(directory / JOURNAL_FILE).pending()}
        assert "R" in replay and replay["R"].stop is None
        in_journal = {int(r["seq_num"]) for r in replay["R"].rows}
        assert set(acked) <= in_journal | set(_seqs(store, "R"))  # a crash now loses none
        store.close_run("R", {"uid": "stop-2", "exit_status": "success"})
        assert store.flush(30)
        meta = read_analysis(store, "R")[0]
        assert _seqs(store, "R") == [1, 2, 3, 4] and meta["stop"]["uid"] == "stop-2"
    assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}
