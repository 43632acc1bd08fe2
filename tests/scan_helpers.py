"""Synthetic raw scans for the tests: transmission counts of a training-like spectrum and a
foil, as a step scan (one event per energy) or a fly scan (one event per spectrum)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from document_helpers import Docs
from event_model import compose_run
from synthetic_feff import model_mu

CU_K = 8978.9


def transmission(
    energy: np.ndarray,
    *,
    shift: float = 0.0,
    kind: str = "CuO",
    seed: int = 0,
    edge: float = CU_K,
) -> dict[str, np.ndarray]:
    """I0, It, Ir counts of a synthetic spectrum (training-like) with its edge at ``edge``
    (Cu K by default) and a foil of the same metal, both on a mono reading ``shift`` eV low."""
    height, width, e_shift, nn = {"CuO": (1.6, 6.0, 4.0, 2.1), "Cu2O": (0.6, 3.0, 0.0, 1.85)}[kind]
    true = energy + shift
    rng = np.random.default_rng(seed)
    mu = model_mu(true, edge + e_shift, height, width, nn)
    ref = 0.5 + np.arctan((true - edge) / 1.5) / np.pi
    i0 = 1e9 * (1 + 0.01 * rng.standard_normal(energy.size))
    it = i0 * np.exp(-mu - 0.3)
    return {"I0": i0, "It": it, "Ir": it * np.exp(-ref)}


def two_rises(energy: np.ndarray) -> np.ndarray:
    """mu of an edge that rises twice with equal slope 6 eV apart (as a Cu(II) shoulder and
    main edge, 8981 and 8987 eV), with a white line and a slow post-edge wiggle on a sloping
    background: where E0, the steepest rise, is decided by the noise."""
    e = np.asarray(energy, dtype=np.float64)
    return (
        0.2
        - 1e-4 * (e - 8800.0)
        + 0.5 * (np.arctan((e - 8981.0) / 1.0) / np.pi + 0.5)
        + 0.5 * (np.arctan((e - 8987.0) / 1.0) / np.pi + 0.5)
        + 0.3 * np.exp(-(((e - 8995.0) / 4.0) ** 2))
        + 0.05 * np.sin((e - 8990.0) / 12.0) * (e > 8990.0)
    )


STEP_GRID = np.concatenate(
    (np.arange(8800.0, 8960.0, 5.0), np.arange(8960.0, 9040.0, 0.5), np.arange(9040.0, 9400, 4.0))
)


def step_scan(
    energy: np.ndarray,
    channels: dict[str, np.ndarray],
    md: dict[str, Any] | None = None,
    *,
    stop: bool = True,
) -> tuple[str, Docs]:
    """A step scan's documents: one scalar event per energy."""
    run = compose_run(metadata={"element": "Cu", "edge": "K", **(md or {})})
    keys = {k: {"source": "sim", "dtype": "number", "shape": []} for k in ("energy", *channels)}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, e in enumerate(energy):
        data = {"energy": float(e), **{k: float(v[i]) for k, v in channels.items()}}
        now = time.time()
        docs.append(
            (
                "event",
                desc.compose_event(data=data, timestamps=dict.fromkeys(data, now), seq_num=i + 1),
            )
        )
    if stop:
        docs.append(("stop", run.compose_stop()))
    return run.start_doc["uid"], docs


def fly_scan(
    energy: np.ndarray, spectra: list[dict[str, np.ndarray]], md: dict[str, Any] | None = None
) -> tuple[str, Docs]:
    """A fly scan's documents: one event per whole spectrum (array data keys)."""
    run = compose_run(metadata={"element": "Cu", "edge": "K", **(md or {})})
    n = energy.size
    keys = {k: {"source": "sim", "dtype": "array", "shape": [n]} for k in ("energy", *spectra[0])}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, channels in enumerate(spectra):
        data = {"energy": energy, **channels}
        now = time.time()
        docs.append(
            (
                "event",
                desc.compose_event(data=data, timestamps=dict.fromkeys(data, now), seq_num=i + 1),
            )
        )
    docs.append(("stop", run.compose_stop()))
    return run.start_doc["uid"], docs
