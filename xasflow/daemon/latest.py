"""The last spectrum of a batch that got a prediction: what the dashboard plots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xasflow.daemon.batch_prep import Work
from xasflow.models.predictor import Prediction
from xasflow.spectra import Prepared

__all__ = ["LatestSpectrum", "last_predicted"]


@dataclass(frozen=True)
class LatestSpectrum:
    """The last spectrum of a batch that got a prediction (what the dashboard plots).

    Published by reference in :attr:`~xasflow.daemon.pipeline.Pipeline.latest` (one
    assignment per batch, never mutated afterwards), so another thread may read it without
    locks.
    """

    raw_uid: str
    index: int
    prepared: Prepared  # normalised y on the model grid, E0, edge step, the (aligned) spectrum
    prediction: Prediction
    manifest: Any  # the bundle's Manifest: regions, region importances, window, metrics
    energy_shift: float | None = None


def last_predicted(works: dict[int, Work]) -> LatestSpectrum | None:
    """The last of ``works`` analysed with a prediction, if any (O(1) unless the batch ends
    in rejections)."""
    for w in reversed(works.values()):
        if w.reason is None and w.prediction is not None and w.prepared is not None:
            assert w.predictor is not None
            return LatestSpectrum(
                w.scan.raw_uid,
                w.scan.index,
                w.prepared,
                w.prediction,
                w.predictor.manifest,
                w.shift,
            )
    return None
