"""The store's tests' analysis descriptor (each column type the store maps), its rows, and a
journal connection whose write hangs."""

from __future__ import annotations

import threading
from typing import Any

#: An analysis descriptor for the store's own tests: each column type the store maps.
STORE_DESCRIPTOR = {
    "uid": "d-1",
    "name": "primary",
    "data_keys": {
        "cn": {"dtype": "integer", "source": "t", "shape": []},
        "distance": {"dtype": "number", "source": "t", "shape": []},
        "status": {"dtype": "string", "source": "t", "shape": []},
        "motifs": {"dtype": "array", "source": "t", "shape": [3]},
    },
}


def store_row(seq: int, **extra: object) -> dict:
    """A row of :data:`STORE_DESCRIPTOR` (``extra`` adds or replaces columns)."""
    return {"seq_num": seq, "time": 1.0 + seq, "cn": 4, "distance": 1.95, "status": "ok", **extra}


class HeldDb:
    """A journal connection whose statement starting ``prefix`` waits for ``release`` (a
    journal write hung in the kernel: its fsync, a stalled disk); ``entered`` once it waits."""

    def __init__(self, db: Any, prefix: str) -> None:
        self.db, self.prefix = db, prefix
        self.entered, self.release = threading.Event(), threading.Event()

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith(self.prefix):
            self.entered.set()
            assert self.release.wait(60)
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def failing_appends(
    monkeypatch: Any, times: int = 4, error: str = "database is locked"
) -> dict[str, int]:
    """Make tiled's ``SQLAdapter.append_partition`` (the catalog in this process) raise
    ``OSError(error)`` for its next ``times`` calls, then append as usual: with the default,
    more than the store's retries, the first batch is given up (the retries made at once).
    Returns the count left."""
    from tiled.adapters.sql import SQLAdapter

    from xasflow.adapters import tiled_batch

    # as many retries as the store makes, without their back-off (0.05 + 0.25 + 1 s a batch)
    monkeypatch.setattr(tiled_batch, "_RETRY_DELAYS", (0.0,) * len(tiled_batch._RETRY_DELAYS))
    real = SQLAdapter.append_partition
    failures = {"left": times}

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(error)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SQLAdapter, "append_partition", flaky)
    return failures


def wrap_metadata_writes(monkeypatch: Any, wrapper: Any) -> None:
    """Route every catalog metadata write the store makes through ``wrapper(real, node,
    metadata_patch, *args, **kwargs)``: a run's node as the store made it
    (:class:`~xasflow.adapters.catalog_runs.RunNode`) and one found through tiled's client
    (``BaseClient``), whichever path a write takes."""
    from tiled.client.base import BaseClient

    from xasflow.adapters.catalog_runs import RunNode

    for cls in (BaseClient, RunNode):
        real = cls.patch_metadata

        def wrapped(
            self: Any, metadata_patch: Any = None, *a: Any, _r: Any = real, **k: Any
        ) -> Any:
            return wrapper(_r, self, metadata_patch, *a, **k)

        monkeypatch.setattr(cls, "patch_metadata", wrapped)
