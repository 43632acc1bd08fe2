"""The analysis store at its edges: values Arrow refuses, a journal whose write lock is held
past its busy timeout, a start document whose write fails once.

Each case broke "a result the store acknowledged is in the catalog, and every run gets its
start and stop" before its fix (found by a read-only review, shown with these tests).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _seqs(store: AnalysisStore, raw_uid: str) -> list[int]:
    return sorted(int(s) for s in read_analysis(store, raw_uid)[1]["seq_num"])


@pytest.mark.parametrize(
    "bad",
    [
        {"distance": 2**60},  # an int in a "number" column that float64 cannot hold exactly
        {"status": "bad \ud800 text"},  # a lone surrogate (a pickled raw document's key)
    ],
    ids=["big-int-in-number-column", "lone-surrogate-string"],
)
def test_an_acknowledged_journalled_row_is_in_the_catalog(tmp_path: Path, bad: dict) -> None:
    """A value Arrow refuses (an integer a double cannot hold, a lone surrogate) is not
    journalled, so not acknowledged early: the catalog refuses the row and it is told lost
    (``on_lost``, counted). Before, it was journalled and acknowledged, then dropped by the
    catalog and forgotten by the journal: in neither, and never counted lost."""
    stored: list[int] = []
    lost: list[int] = []
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        for seq, extra in ((1, {}), (2, bad), (3, {})):
            store.add_event(
                "R",
                _row(seq, **extra),
                on_stored=lambda s=seq: stored.append(s),
                on_lost=lambda s=seq: lost.append(s),
            )
        assert store.flush(30)
        in_catalog = _seqs(store, "R")
        in_journal = Journal(directory / JOURNAL_FILE).pending()
        errors = store.stats()["errors"]
    journal_seqs = {int(r["seq_num"]) for run in in_journal for r in run.rows}
    # the contract: every row told stored is in the catalog or still in the journal
    assert set(stored) <= set(in_catalog) | journal_seqs, (
        f"acknowledged {stored}, catalog {in_catalog}, journal {sorted(journal_seqs)}, "
        f"on_lost {lost}, errors {errors}"
    )
    assert sorted(stored) == [1, 3] and lost == [2] and in_catalog == [1, 3]


def test_one_failed_journal_write_does_not_wedge_the_journal(tmp_path: Path) -> None:
    """One journal write that fails (another connection, an operator's sqlite3 shell, held
    the write lock past the 5 s busy timeout) is rolled back: the rows after it are
    journalled again and a new run's record is committed. Before, the transaction stayed
    open: every later ``add`` failed at BEGIN and every flush waited out the timeout."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1)]) == [True]
        assert store.flush(30)
        other = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the journal's write lock for a while
        store.add_events("R", [_row(2)])  # waits 5 s, fails, falls back to the catalog
        other.execute("ROLLBACK")
        other.close()
        before = store.stats()["journalled"]
        store.add_events("R", [_row(3), _row(4)])  # the lock is free again
        after = store.stats()["journalled"]
        store.open_run("S", {"uid": "b"}, DESCRIPTOR)  # a new run's record
        t0 = time.monotonic()
        assert store.flush(60)
        flush_s = time.monotonic() - t0
        fresh = Journal(directory / JOURNAL_FILE)
        runs = {r.raw_uid for r in fresh.pending()}
        fresh.close()
    symptoms = {
        "rows journalled after the lock was released (of 2)": after - before,
        "new run S committed in the journal": "S" in runs,
        "flush seconds": round(flush_s, 1),
    }
    assert after == before + 2 and "S" in runs and flush_s < 5, symptoms


def test_a_journal_that_fails_at_close_run_still_records_the_stop(tmp_path: Path) -> None:
    """A stop the journal cannot record (its write lock held past the busy timeout) still
    reaches the catalog, as every other journal failure falls back to it. Before, close_run
    raised with the run already gone from the caller side: the stop was never written and
    the run stayed open."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
        assert store.flush(30)
        other = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        error = None
        try:
            store.close_run("R", {"uid": "z", "exit_status": "success"})
        except Exception as exc:
            error = repr(exc)
        other.execute("ROLLBACK")
        other.close()
        assert store.flush(30)
        stop = read_analysis(store, "R")[0]["stop"]
        still_open_in_writer = "R" in store._runs
    assert stop is not None, {
        "close_run raised": error,
        "writer still holds R": still_open_in_writer,
    }


def test_a_start_whose_write_failed_once_is_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table made ahead (prepare_run) gets its start document after the first rows. A
    write of it that fails past the retries while the catalog is up is tried again, at the
    close at the latest. Before, it was never tried again: the close wrote the stop, the
    journal forgot the run, and the catalog kept start None (bundle id, element, raw scan
    id gone)."""
    from tiled.client.base import BaseClient

    real = BaseClient.update_metadata
    failures = {"left": 4}  # more than the store's retries

    def flaky(self: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(metadata, dict) and metadata.get("start") and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError("catalog busy")
        return real(self, metadata, *args, **kwargs)

    monkeypatch.setattr(BaseClient, "update_metadata", flaky)
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:
        store.prepare_run("R", DESCRIPTOR)
        assert store.flush(30)
        store.open_run("R", {"uid": "a-start", "bundle_id": "b1"}, DESCRIPTOR)
        store.add_events("R", [_row(1)])
        assert store.flush(30)
        store.close_run("R", {"uid": "z", "exit_status": "success"})
        assert store.flush(30)
        meta = read_analysis(store, "R")[0]
        counts = Journal(directory / JOURNAL_FILE).counts()
    assert meta["start"] is not None, {"stop": meta["stop"], "journal": counts}
