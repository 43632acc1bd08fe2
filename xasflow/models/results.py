"""What a bundle says about a spectrum: per-task answers with their doubt, and flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: The flag a prediction carries when its spectrum lies outside what the bundle was trained on.
OUT_OF_DOMAIN = "out_of_domain"


@dataclass(frozen=True)
class TaskResult:
    """One task's answer and its doubt.

    ``probabilities`` (classifiers, calibrated) or ``ranking`` (multi-output); classifiers may
    carry a conformal ``prediction_set`` (the labels that together hold the true one with the
    bundle's coverage, e.g. 90 %), regressors a conformal ``interval`` (low, high): infinite
    ends where the bundle's calibration could fit no finite bound (too few rows).
    """

    value: Any
    probabilities: dict[str, float] | None = None
    ranking: list[tuple[str, float]] | None = None
    prediction_set: list[Any] | None = None
    interval: tuple[float, float] | None = None

    @property
    def confidence(self) -> float | None:
        """Probability of the predicted class, or None for regressors."""
        if self.probabilities is None:
            return None
        return max(self.probabilities.values())

    @property
    def unbounded(self) -> bool:
        """Whether the interval has an infinite end (its calibration fitted no finite bound)."""
        return self.interval is not None and not all(math.isfinite(b) for b in self.interval)


_new = object.__new__


def task_result(
    value: Any,
    probabilities: dict[str, float] | None = None,
    ranking: list[tuple[str, float]] | None = None,
    prediction_set: list[Any] | None = None,
    interval: tuple[float, float] | None = None,
) -> TaskResult:
    """``TaskResult(...)`` without the frozen dataclass's ``object.__setattr__`` per field: the
    decoder builds six per spectrum, and this takes a third of the time (same object)."""
    out = _new(TaskResult)
    d = out.__dict__
    d["value"] = value
    d["probabilities"] = probabilities
    d["ranking"] = ranking
    d["prediction_set"] = prediction_set
    d["interval"] = interval
    return out


@dataclass(frozen=True)
class Prediction:
    """Everything a bundle says about one spectrum."""

    bundle_id: str
    element: str
    edge: str
    e0: float
    edge_step: float
    results: dict[str, TaskResult]
    flags: list[str] = field(default_factory=list)
    ood_score: float | None = None  # higher is further from the training data; see manifest

    @property
    def out_of_domain(self) -> bool:
        """Whether the spectrum lies outside what the bundle was trained on."""
        return OUT_OF_DOMAIN in self.flags

    def __getitem__(self, task: str) -> TaskResult:
        return self.results[task]

    @classmethod
    def make(
        cls,
        bundle_id: str,
        element: str,
        edge: str,
        e0: float,
        edge_step: float,
        results: dict[str, TaskResult],
        flags: list[str],
        ood_score: float | None,
    ) -> Prediction:
        """``Prediction(...)`` built as :func:`task_result` builds its rows (one per spectrum)."""
        out = _new(cls)
        d = out.__dict__
        d["bundle_id"], d["element"], d["edge"] = bundle_id, element, edge
        d["e0"], d["edge_step"], d["results"] = e0, edge_step, results
        d["flags"], d["ood_score"] = flags, ood_score
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (used by the CLI, the daemon's documents and the dashboard)."""
        tasks: dict[str, Any] = {}
        for name, res in self.results.items():
            entry: dict[str, Any] = {"value": res.value}
            if res.probabilities is not None:
                entry["probabilities"] = res.probabilities
            if res.ranking is not None:
                entry["ranking"] = [[label, score] for label, score in res.ranking]
            if res.prediction_set is not None:
                entry["prediction_set"] = list(res.prediction_set)
            if res.unbounded:  # JSON has no infinity
                entry["interval"], entry["interval_unbounded"] = None, True
            elif res.interval is not None:
                entry["interval"] = [res.interval[0], res.interval[1]]
            tasks[name] = entry
        return {
            "bundle_id": self.bundle_id,
            "element": self.element,
            "edge": self.edge,
            "e0": self.e0,
            "edge_step": self.edge_step,
            "flags": list(self.flags),
            "ood_score": self.ood_score,
            "tasks": tasks,
        }
