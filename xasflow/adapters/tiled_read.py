"""Reading stored analysis runs back: by tiled client, open store or store directory.

Also the in-process registry of open stores (so ``read_analysis(directory)`` reuses the
writer's catalog instead of serving the same files twice) and the search for runs a killed
writer left without a stop document.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xasflow.adapters.store_moved import follow_move
from xasflow.adapters.tiled_schema import (
    CATALOG_FILE,
    DEFAULT_STREAM,
    TABLE_FILES,
    _serve,
    _to_builtin,
)

if TYPE_CHECKING:
    import pandas

__all__ = ["OPEN_STORES", "OPEN_STORES_LOCK", "read_analysis", "unfinished_in"]

#: Directories with a store open in this process, to their store (anything with ``client()``).
OPEN_STORES: dict[Path, Any] = {}
OPEN_STORES_LOCK = threading.Lock()


def read_analysis(
    directory_or_client: str | Path | Any, raw_uid: str
) -> tuple[dict, pandas.DataFrame]:
    """Metadata (start, descriptor, stop) and rows (sorted by seq_num) of a stored run, via tiled.

    Accepts a store directory, an open ``AnalysisStore`` or a tiled client of the catalog root.
    """
    source = directory_or_client
    if isinstance(source, str | Path):
        directory = Path(source).expanduser().resolve()
        with OPEN_STORES_LOCK:
            open_store = OPEN_STORES.get(directory)
        if open_store is not None:
            return read_analysis(open_store.client(), raw_uid)
        if not (directory / CATALOG_FILE).exists():
            raise FileNotFoundError(f"no analysis store at {directory}")
        follow_move(directory)  # a store moved or copied here reads its own tables
        uris = [
            f"{backend}:///{directory / name}"
            for backend, name in TABLE_FILES.items()
            if (directory / name).exists()
        ]
        with _serve(directory, uris) as root:
            return read_analysis(root, raw_uid)
    if callable(getattr(source, "client", None)):  # an open AnalysisStore
        source = source.client()
    node = source[raw_uid]
    metadata = _to_builtin(node.metadata)
    descriptor = metadata.get("descriptor") or {}
    stream = descriptor.get("name") or DEFAULT_STREAM
    if stream not in node:  # a process killed between the run's container and its table
        import pandas as pd  # tiled's own dependency: only where a frame is made here

        keys = ["seq_num", "time", *(descriptor.get("data_keys") or {})]
        return metadata, pd.DataFrame(columns=keys)
    frame = node[stream].read()
    for name, key in (descriptor.get("data_keys") or {}).items():
        if key.get("dtype") == "array" and name in frame:
            frame[name] = [
                json.loads(v) if isinstance(v, str) else None for v in frame[name]
            ]  # nulls read back as NA
    if "seq_num" in frame and len(frame):
        frame = frame.sort_values("seq_num", kind="stable").reset_index(drop=True)
    return metadata, frame


def unfinished_in(root: Any, skip: set[str] | frozenset[str]) -> list[dict[str, Any]]:
    """Runs under ``root`` stored without a stop document, except those in ``skip``, with counts.

    Each: ``raw_uid``, ``start``, ``descriptor``, ``rows``, ``spectra`` (rows with
    ``index >= 0``), ``n_ok`` / ``n_rejected`` (by ``status`` where the table has it), ``max_seq``.
    """
    from tiled.queries import KeyPresent

    out = []
    for raw_uid, node in root.search(KeyPresent("stop.uid", exists=False)).items():
        if raw_uid in skip:
            continue
        metadata = _to_builtin(node.metadata)
        descriptor = metadata.get("descriptor") or {}
        stream = descriptor.get("name") or DEFAULT_STREAM
        info: dict[str, Any] = {
            "raw_uid": raw_uid,
            "start": metadata.get("start") or {},
            "descriptor": descriptor,
            "rows": 0,
            "spectra": 0,
            "n_ok": 0,
            "n_rejected": 0,
            "max_seq": 0,
        }
        if stream in node:
            keys = descriptor.get("data_keys") or {}
            columns = ["seq_num", *(c for c in ("index", "status") if c in keys)]
            frame = node[stream].read(columns)
            info["rows"] = len(frame)
            if len(frame):
                info["max_seq"] = int(frame["seq_num"].max())
                index = frame.get("index")
                info["spectra"] = int((index >= 0).sum()) if index is not None else len(frame)
                if "status" in frame:
                    info["n_ok"] = int((frame["status"] == "ok").sum())
                    info["n_rejected"] = int((frame["status"] == "rejected").sum())
        out.append(info)
    return out
