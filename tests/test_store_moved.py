"""An analysis store moved or copied to another directory: read and written in its new place.

tiled's catalog records the tables file by its absolute path, so a moved store's every table
read 'No such field sqlite://localhost//<old>/tables.sqlite' (read_analysis, tiled serve) and
the daemon could not reopen its runs.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row

from xasflow.adapters.tiled_schema import CATALOG_FILE
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _store(directory: Path, seqs: list[int], *, journal: bool = False) -> None:
    """Store the rows ``seqs`` of run-a in ``directory`` and close its run (and the store)."""
    with AnalysisStore(directory, journal=journal) as store:
        store.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
        for seq in seqs:
            assert store.add_event("run-a", _row(seq, motifs=[0.5, 0.3, 0.2]))
        assert store.flush(timeout=30)
        store.close_run("run-a", {"uid": "a-stop", "exit_status": "success"})


def _assets(directory: Path) -> list[str]:
    with sqlite3.connect(directory / CATALOG_FILE) as con:
        return [uri for (uri,) in con.execute("SELECT data_uri FROM assets ORDER BY id")]


def test_a_moved_store_is_read_and_written_where_it_is_now(tmp_path: Path) -> None:
    _store(tmp_path / "old", [1, 2, 3], journal=True)
    shutil.move(tmp_path / "old", tmp_path / "new")
    meta, frame = read_analysis(tmp_path / "new", "run-a")
    assert list(frame["seq_num"]) == [1, 2, 3] and meta["stop"]["exit_status"] == "success"
    assert frame["motifs"][0] == [0.5, 0.3, 0.2]
    assert _assets(tmp_path / "new") == [f"sqlite://localhost/{tmp_path}/new/tables.sqlite"]
    # the daemon goes on in the new place: the run reopened takes rows, a new run is made
    with AnalysisStore(tmp_path / "new", journal=True) as store:
        store.open_run("run-a", {"uid": "a-start"}, DESCRIPTOR)
        assert store.add_event("run-a", _row(4))
        store.open_run("run-b", {"uid": "b-start"}, DESCRIPTOR)
        assert store.add_event("run-b", _row(1))
        assert store.flush(timeout=30)
        assert store.stats()["errors"] == 0 and store.stats()["stored"] == 2
    assert list(read_analysis(tmp_path / "new", "run-a")[1]["seq_num"]) == [1, 2, 3, 4]
    assert list(read_analysis(tmp_path / "new", "run-b")[1]["seq_num"]) == [1]


def test_a_copy_reads_its_own_tables_and_leaves_the_original_as_it_was(tmp_path: Path) -> None:
    _store(tmp_path / "a", [1, 2, 3])
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    _store(tmp_path / "a", [4])  # the original goes on after the copy was taken
    assert list(read_analysis(tmp_path / "copy", "run-a")[1]["seq_num"]) == [1, 2, 3]
    assert list(read_analysis(tmp_path / "a", "run-a")[1]["seq_num"]) == [1, 2, 3, 4]
    assert _assets(tmp_path / "a") == [f"sqlite://localhost/{tmp_path}/a/tables.sqlite"]


def test_tables_made_in_the_new_place_before_share_one_record_with_the_old(
    tmp_path: Path,
) -> None:
    """A moved store whose catalog already names its tables file in the new place (tables an
    earlier version made there) too: the old record's tables join that one."""
    _store(tmp_path / "old", [1, 2])
    shutil.move(tmp_path / "old", tmp_path / "new")
    here = f"sqlite://localhost/{tmp_path}/new/tables.sqlite"
    with sqlite3.connect(tmp_path / "new" / CATALOG_FILE) as con:
        con.execute("INSERT INTO assets (data_uri, is_directory) VALUES (?, 0)", (here,))
    assert list(read_analysis(tmp_path / "new", "run-a")[1]["seq_num"]) == [1, 2]
    assert _assets(tmp_path / "new") == [here]


def test_a_moved_store_whose_catalog_cannot_change_is_refused_saying_whence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only (simulated: file modes do not stop root): a StoreError naming the old place,
    not tiled's 'No such field' from the first table read."""
    import xasflow.adapters.store_moved as store_moved
    from xasflow.adapters.tiled_schema import StoreError

    _store(tmp_path / "old", [1])
    shutil.move(tmp_path / "old", tmp_path / "new")
    connect = sqlite3.connect

    def read_only(path: Path, timeout: float) -> sqlite3.Connection:
        return connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)

    monkeypatch.setattr(store_moved.sqlite3, "connect", read_only)
    with pytest.raises(StoreError, match=r"moved or copied here from (.*)/old \(its catalog"):
        read_analysis(tmp_path / "new", "run-a")


def test_a_move_followed_meanwhile_by_another_reader_keeps_the_tables_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes reading a moved store at once (or one reading while the daemon opens
    it): the one whose look came first but writes second must not delete the record the
    other pointed here (its 'same file' merge found that very record and deleted it)."""
    import xasflow.adapters.store_moved as store_moved

    _store(tmp_path / "old", [1, 2, 3])
    shutil.move(tmp_path / "old", tmp_path / "new")
    real = store_moved._moved
    looks: list[int] = []

    def look_then_other_follows(con: sqlite3.Connection, directory: Path) -> list:
        found = real(con, directory)
        if not looks:  # the other process follows the move between this look and the write
            looks.append(1)
            monkeypatch.setattr(store_moved, "_moved", real)
            store_moved.follow_move(directory)
            monkeypatch.setattr(store_moved, "_moved", look_then_other_follows)
        return found

    monkeypatch.setattr(store_moved, "_moved", look_then_other_follows)
    store_moved.follow_move((tmp_path / "new").resolve())
    here = f"sqlite://localhost/{tmp_path}/new/tables.sqlite"
    assert _assets(tmp_path / "new") == [here]
    assert list(read_analysis(tmp_path / "new", "run-a")[1]["seq_num"]) == [1, 2, 3]


def test_a_damaged_catalog_is_not_called_a_moved_store(tmp_path: Path) -> None:
    """A catalog.db that is not a database was refused as 'the store was moved or copied here
    from elsewhere ... copy the store there': its reader and the daemon say what tiled says."""
    from xasflow.adapters.tiled_schema import StoreError

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / CATALOG_FILE).write_bytes(b"not a database, a text file " * 200)
    with pytest.raises(Exception, match="file is not a database") as read:
        read_analysis(tmp_path / "s", "run-a")
    with pytest.raises(StoreError, match="cannot initialise tiled catalog") as opened:
        AnalysisStore(tmp_path / "s")
    assert "moved" not in str(read.value) and "moved" not in str(opened.value)


def test_a_store_another_process_writes_is_left_as_it_is(tmp_path: Path) -> None:
    """A catalog naming another directory's tables while another process holds the writer
    lock is a live store seen under another path (a mount): a reader pointing it here broke
    the writer's own reads of its runs ('No such field', scratch R/live_run.sh). Refused,
    the catalog as it was; readable once the writer has gone."""
    from xasflow.adapters.file_lock import hold, release
    from xasflow.adapters.tiled_schema import LOCK_FILE, StoreError

    _store(tmp_path / "old", [1, 2])
    old = _assets(tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    writer = hold(tmp_path / "new" / LOCK_FILE)  # a flock: another open file is another holder
    try:
        with pytest.raises(StoreError, match=r"tables in (.*)/old, and another process"):
            read_analysis(tmp_path / "new", "run-a")
        assert _assets(tmp_path / "new") == old
    finally:
        release(writer)
    assert list(read_analysis(tmp_path / "new", "run-a")[1]["seq_num"]) == [1, 2]
