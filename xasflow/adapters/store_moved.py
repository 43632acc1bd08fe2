"""A store moved or copied to another directory: its catalog pointed at its own tables file.

tiled records the storage of each table by its absolute URI (the catalog's ``assets``
table: ``sqlite://localhost//<directory>/tables.sqlite``) and looks the storage up by that
URI alone, so in a moved or copied store every table read failed with 'No such field
sqlite://...', and the daemon could not reopen its runs. A store owns its tables file (beside
``catalog.db``), so a record naming that file in another directory means the store was moved
from there: :func:`follow_move` points it at this directory's file before tiled opens the
catalog (a copy then reads its own tables, never the original's).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from xasflow.adapters.file_lock import HeldElsewhere, hold, release
from xasflow.adapters.tiled_schema import CATALOG_FILE, LOCK_FILE, TABLE_FILES, StoreError

__all__ = ["follow_move"]

logger = logging.getLogger(__name__)


def _moved(con: sqlite3.Connection, directory: Path) -> list[tuple[int, str, str]]:
    """(asset id, its URI, the URI of the same file in ``directory``) of each table asset
    that names another directory's tables file (none in a catalog not made yet)."""
    from tiled.utils import ensure_uri

    out: list[tuple[int, str, str]] = []
    if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'assets'").fetchone() is None:
        return out
    for asset_id, uri in con.execute("SELECT id, data_uri FROM assets"):
        parsed = urlparse(uri)
        name = TABLE_FILES.get(parsed.scheme)
        if name is None or PurePosixPath(parsed.path).name != name:
            continue  # not a table file of this store's (none other is made here)
        here = ensure_uri(f"{parsed.scheme}:///{directory / name}")  # as tiled records it
        if uri != here:
            out.append((asset_id, uri, here))
    return out


def follow_move(directory: Path, *, writing: bool = False) -> None:
    """Point the catalog in ``directory`` at this directory's tables file, if it names
    one elsewhere (the store was moved or copied here); nothing if it has not moved.

    ``writing``: this process holds the store's writer lock (an open AnalysisStore). A
    reader takes it for the change, and leaves a store another process is writing as it is
    (a StoreError): that is a live store seen under another path (a mount), whose writer
    names its tables as it sees them.

    StoreError, saying where the store came from, when the catalog cannot be changed (a
    read-only directory); a catalog that cannot be read is left for tiled to refuse.
    """
    catalog = directory / CATALOG_FILE
    if not catalog.exists():
        return
    moved: list[tuple[int, str, str]] = []
    try:
        with contextlib.closing(sqlite3.connect(catalog, timeout=30)) as con:
            moved = _moved(con, directory)
            if not moved:
                return
            with _writer_lock(directory, moved, held=writing), con:  # all of them or none
                # looked at again under the write lock: another process reading the store
                # (or the daemon opening it) may have pointed it here since
                con.execute("BEGIN IMMEDIATE")
                moved = _moved(con, directory)
                for asset_id, _, here in moved:
                    row = con.execute("SELECT id FROM assets WHERE data_uri = ?", (here,))
                    same = row.fetchone()
                    if same is None:
                        con.execute("UPDATE assets SET data_uri = ? WHERE id = ?", (here, asset_id))
                        continue
                    # tables already made here (before this existed): one record for the file
                    con.execute(
                        "UPDATE data_source_asset_association SET asset_id = ? WHERE asset_id = ?",
                        (same[0], asset_id),
                    )
                    con.execute("DELETE FROM assets WHERE id = ?", (asset_id,))
    except sqlite3.Error as exc:
        if not moved:  # the catalog could not be read (damaged): tiled says so, as before
            return
        raise StoreError(
            f"{directory}: the store was moved or copied here from {_places(moved)} (its "
            f"catalog records its tables there), and pointing the catalog at {directory} "
            f"failed: {exc}. Give a directory this process can write to (copy the store "
            "there), or read the store where it was"
        ) from None
    if moved:
        logger.warning(
            "analysis store %s was moved or copied from %s: its catalog now "
            "names its own tables file",
            directory,
            _places(moved),
        )


@contextlib.contextmanager
def _writer_lock(
    directory: Path, moved: list[tuple[int, str, str]], *, held: bool
) -> Iterator[None]:
    """The store's writer lock for the change (unless ``held`` already); a StoreError when
    another process holds it. A lock file this process cannot open (a read-only directory)
    goes on without it: the change fails there and says so."""
    fd = None
    if not held:
        try:
            fd = hold(directory / LOCK_FILE)
        except HeldElsewhere as other:
            raise StoreError(
                f"{directory}: its catalog names its tables in {_places(moved)}, and another "
                f"process (pid {other.pid}) is writing this store: the same store seen there "
                "under another path (a mount or a link)? Read it as that process sees it, "
                "or once it has stopped"
            ) from None
        except OSError:  # not ours to lock (read-only): the change fails and says so
            pass
    try:
        yield
    finally:
        if fd is not None:
            release(fd)


def _places(moved: list[tuple[int, str, str]]) -> str:
    """The directories the moved assets name, for a message."""
    return ", ".join(sorted({str(_place(uri)) for _, uri, _ in moved}))


def _place(uri: str) -> Path:
    """The directory a table asset's URI names."""
    from tiled.utils import path_from_uri

    return Path(path_from_uri(uri)).parent
