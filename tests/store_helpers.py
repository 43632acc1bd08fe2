"""The store's tests' analysis descriptor (each column type the store maps) and its rows."""

from __future__ import annotations

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
