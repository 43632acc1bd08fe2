"""What the recommender is configured with and what it answers: settings, regions, advice,
and how a bundle's region importances and a prediction's doubt are turned into weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from xasflow.models.predictor import Prediction
from xasflow.spectra.edges import core_hole_width

__all__ = [
    "Recommendation",
    "RecommenderConfig",
    "Region",
    "cn_uncertainty",
    "region_shares",
    "task_uncertainty",
    "withheld_by",
]


#: The finest step, as a fraction of the absorber's core-hole width (see ``for_edge``).
HOLE_FRACTION = 0.65
#: The finest step (eV) where the core-hole width is not tabulated.
DEFAULT_FINE_STEP = 0.5
#: The finest step (eV) a config may ask anywhere: below a monochromator's resolution, and
#: regions are written to 1 meV (a finer step rounds regions to nothing).
MIN_STEP = 0.05
#: The coarsest step (eV) a config may ask.
MAX_STEP = 100.0
#: The longest dwell (s per point) a config may ask.
MAX_DWELL = 600.0
#: The widest margin or window (eV from E0) a config may ask.
MAX_MARGIN = 200.0
#: The largest factor (coarse_factor, uncertain_dwell_factor, max_rescan_factor, piece_growth).
MAX_FACTOR = 20.0
#: Quality flags that withhold stop-early, with what they say: the spectrum's data are
#: incomplete (the model saw it in part) or its energy scale went unchecked against the foil,
#: so a certain answer from it may not hold. Others (``seq_disorder``, ``points_retaken``,
#: ``channel_dropped``, ``no_reference``, ...) leave the data whole. ``extrapolated`` stands
#: for the predictor's ``extrapolated_<eV>eV``.
STOP_WITHHOLDING_FLAGS: dict[str, str] = {
    "seq_gap": "events of the run went missing",
    "points_rejected": "points of the scan were refused",
    "points_dropped": "points past the step-scan limit were not analysed",
    "nonfinite_dropped": "points with non-finite values were dropped",
    "glitch_interpolated": "a glitch in the model window was interpolated across",
    "align_failed": "the reference foil showed no edge: not aligned",
    "align_out_of_range": "the foil's shift was out of range: not aligned",
    "extrapolated": "the data end short of the model window, extrapolated there",
}


class RecommenderConfig(BaseModel):
    """Knobs of the recommender (defaults suit a K edge measured in transmission).

    Checked when the configuration loads, so that no knob breaks every recommendation later
    (an infinite dwell advised and queued, an overflow or a region rounded to nothing logged
    per spectrum while no advice goes out): every number must be finite; steps lie within
    :data:`MIN_STEP` .. :data:`MAX_STEP` eV, ``k_step`` at most 0.2 1/angstrom,
    the dwell at most :data:`MAX_DWELL` s, margins and windows within :data:`MAX_MARGIN` eV of
    E0, factors at most :data:`MAX_FACTOR`, ``piece_growth`` is 1 (off) or at least 1.05
    (finer cuts split a region into hundreds), and ``mono_range`` is (low, high) with
    0 <= low < high.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    fine_step: float | None = Field(
        None,
        ge=MIN_STEP,
        le=MAX_STEP,
        description="eV, finest step anywhere; None: HOLE_FRACTION of the absorber's core-hole"
        " width (Cu K: 1.0 eV), or 0.5 where the width is not tabulated",
    )
    k_step: float = Field(
        0.04, ge=0, le=0.2, description="1/angstrom, finest step in k far above the edge"
    )
    coarse_factor: float = Field(
        4.0, ge=1, le=MAX_FACTOR, description="step multiplier where w = 0"
    )
    piece_growth: float = Field(
        1.2,
        ge=1,
        le=MAX_FACTOR,
        description="a region above the edge is cut where its finest step grows by this factor"
        " (steps follow k); 1 keeps each region one uniform grid",
    )
    edge_max_step: float | None = Field(
        None,
        ge=MIN_STEP,
        le=MAX_STEP,
        description="eV, largest step inside edge_window; None: as fine_step",
    )
    edge_window: tuple[float, float] = Field(
        (-5.0, 10.0), description="eV relative to E0 where E0 is found; kept fine"
    )
    pre_edge_step: float = Field(
        10.0, ge=MIN_STEP, le=MAX_STEP, description="eV, step on the pre-edge line"
    )
    approach_step: float = Field(
        3.0, ge=MIN_STEP, le=MAX_STEP, description="eV, from the pre-edge line to the window"
    )
    dwell: float = Field(
        1.0, gt=0, le=MAX_DWELL, description="s per point in the most important region"
    )
    dwell_floor: float = Field(0.5, gt=0, le=1, description="dwell fraction where w = 0")
    uncertain_above: float = Field(0.5, ge=0, le=1, description="cn uncertainty that is 'unsure'")
    uncertain_dwell_factor: float = Field(2.0, ge=1, le=MAX_FACTOR)
    e0_margin: float = Field(
        2.0, ge=0, le=MAX_MARGIN, description="eV added to each end of the window"
    )
    prior_e0_margin: float = Field(
        12.0, ge=0, le=MAX_MARGIN, description="eV margin before E0 is known"
    )
    e0_ambiguity_window: float = Field(
        10.0, ge=0, le=MAX_MARGIN, description="eV around E0 to look for rivals"
    )
    e0_ambiguity_ratio: float = Field(0.5, gt=0, le=1, description="rival / edge derivative")
    task_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "cn": 1.0,
            "valence": 0.5,
            "environment": 0.5,
            "distance": 0.25,
            "charge": 0.25,
        }
    )
    stop_probability: float = Field(0.9, gt=0, le=1)
    #: With conformal sets, the least calibrated cn probability each of the spectra must
    #: also have: a set is never empty, so a flat answer (p 0.23 of a mixed-phase sample)
    #: can be a single-value set without being sure of anything.
    stop_set_probability: float = Field(0.5, gt=0, le=1)
    stop_count: int = Field(2, ge=1, description="spectra in a row that must agree")
    rescan_importance: float = Field(0.5, ge=0, le=1)
    noise_threshold: float = Field(
        0.02, gt=0, le=1, description="noise / edge step that asks a rescan"
    )
    max_rescan_factor: float = Field(4.0, ge=1, le=MAX_FACTOR)
    mono_range: tuple[float, float] | None = Field(
        None,
        description="eV (low, high) the monochromator reaches, on the axis it drives: regions"
        " are clipped to it, those wholly outside dropped; None: no limit",
    )

    def for_edge(self, element: str | None, edge: str) -> RecommenderConfig:
        """This config with the steps left open (None) set for ``element``'s ``edge``.

        No feature of a measured XANES is narrower than the core hole's Lorentzian width
        (Cu K 1.55 eV), so steps of ``HOLE_FRACTION`` of it (1.0 eV for Cu) resolve whatever
        the spectrum holds; measured with ``bench/recommend.py`` (16 seeds): points saved
        0.527 -> 0.570 against 0.5 eV, no accuracy lost.
        """
        width = core_hole_width(element, edge)
        fine = self.fine_step
        if fine is None:
            fine = round(HOLE_FRACTION * width, 1) if width else DEFAULT_FINE_STEP  # 0.1 eV
        edge_step = self.edge_max_step if self.edge_max_step is not None else fine
        return self.model_copy(update={"fine_step": fine, "edge_max_step": edge_step})

    def steps(self) -> tuple[float, float]:
        """(fine_step, edge_max_step) of a config set by :meth:`for_edge`."""
        if self.fine_step is None or self.edge_max_step is None:
            raise ValueError("steps left open: call for_edge(element, edge) first")
        return self.fine_step, self.edge_max_step

    @field_validator("mono_range", mode="before")
    @classmethod
    def _mono_pair(cls, value: Any) -> Any:
        """One energy or three were "mono_range.1: Field required" / "Tuple should have at
        most 2 items": what the range is, once."""
        if isinstance(value, list | tuple) and len(value) != 2:
            raise ValueError(f"mono_range is [low, high], two energies in eV, not {len(value)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> RecommenderConfig:
        low, high = self.edge_window
        if high <= low:
            raise ValueError("edge_window must be (low, high) with low < high")
        if max(abs(low), abs(high)) > MAX_MARGIN:
            raise ValueError(f"edge_window must lie within {MAX_MARGIN:g} eV of E0")
        if 1 < self.piece_growth < 1.05:
            raise ValueError("piece_growth must be 1 (no cuts) or 1.05 .. 20")
        if self.mono_range is not None and not 0 <= self.mono_range[0] < self.mono_range[1]:
            raise ValueError("mono_range must be (low, high) eV with 0 <= low < high")
        bad = sorted(k for k, w in self.task_weights.items() if w < 0)
        if bad:
            raise ValueError(f"task_weights must be >= 0 ({', '.join(bad)} is not)")
        return self


@dataclass(frozen=True)
class Region:
    """One energy range to measure: absolute eV, a uniform step, a dwell per point."""

    name: str
    start: float
    stop: float
    step: float
    dwell: float
    reason: str
    importance: float = 0.0

    @property
    def n_points(self) -> int:
        """Points of :meth:`energies` (both ends included), counted without building them."""
        return self._intervals() + 1

    def _intervals(self) -> int:
        return max(1, math.ceil((self.stop - self.start) / self.step - 1e-3))

    def energies(self) -> np.ndarray:
        """The region's grid: ``start`` to ``stop`` inclusive in steps of ``step``."""
        return np.linspace(self.start, self.stop, self._intervals() + 1)

    def row(self) -> list[float]:
        """``[start, stop, step, dwell]`` (the EPICS waveform's unit)."""
        return [self.start, self.stop, self.step, self.dwell]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "name": self.name,
            "start": self.start,
            "stop": self.stop,
            "step": self.step,
            "dwell": self.dwell,
            "reason": self.reason,
            "importance": self.importance,
            "n_points": self.n_points,
        }


@dataclass(frozen=True)
class Recommendation:
    """What to measure next, whether the answer is already certain, what to rescan."""

    regions: list[Region]
    stop_early: bool
    stop_reason: str
    rescan: Region | None
    e0: float
    uncertainty: float
    element: str
    edge: str
    bundle_id: str
    noise: dict[str, float] = field(default_factory=dict)
    #: regions wholly outside the monochromator's range, not measured (each says so)
    dropped: list[Region] = field(default_factory=list)

    @cached_property
    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """(energies, dwells), built once: a recommendation is read several times (its
        documents, the dashboard, the adaptive plan), and building the grid is most of it."""
        if not self.regions:
            return np.empty(0), np.empty(0)
        e = np.concatenate([r.energies() for r in self.regions])
        energies = np.unique(np.round(e, 6))
        dwells = np.zeros_like(energies)
        for r in self.regions:
            inside = (energies >= r.start - 1e-6) & (energies <= r.stop + 1e-6)
            dwells[inside] = np.maximum(dwells[inside], r.dwell)
        return energies, dwells

    def energies(self) -> np.ndarray:
        """Every recommended energy once, ascending (neighbouring regions share ends)."""
        return self._scan[0].copy()

    def dwells(self) -> np.ndarray:
        """Dwell per energy of :meth:`energies` (the longest of the regions that hold it)."""
        return self._scan[1].copy()

    @property
    def n_points(self) -> int:
        """Distinct energies recommended."""
        return int(self._scan[0].size)

    @property
    def time(self) -> float:
        """Counting time of the recommended scan, s (no motor moves)."""
        return float(self._scan[1].sum())

    def waveform(self) -> list[float]:
        """``[start, stop, step, dwell] * n`` in region order (most important first)."""
        return [v for r in self.regions for v in r.row()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (what the dashboard and the queueserver adapter read)."""
        return {
            "regions": [r.to_dict() for r in self.regions],
            "stop_early": self.stop_early,
            "stop_reason": self.stop_reason,
            "rescan": None if self.rescan is None else self.rescan.to_dict(),
            "e0": self.e0,
            "uncertainty": self.uncertainty,
            "element": self.element,
            "edge": self.edge,
            "bundle_id": self.bundle_id,
            "noise": dict(self.noise),
            "dropped": [r.to_dict() for r in self.dropped],
            "n_points": self.n_points,
            "time": self.time,
        }


# --------------------------------------------------------------------------- importance


def region_shares(importance: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Per-region share of a task's drop-region importances (truncated Shapley, >= 0, max 1).

    ``importance`` maps ``"a"`` and ``"a + b"`` to the score lost when those regions are
    removed. Missing pairs count as the larger single; a task whose importances are all zero
    (or absent) gives every region 0.
    """
    single = {n: float(importance.get(n, 0.0)) for n in names}

    def pair(a: str, b: str) -> float:
        for key in (f"{a} + {b}", f"{b} + {a}"):
            if key in importance:
                return float(importance[key])
        return max(single[a], single[b])

    raw: dict[str, float] = {}
    for r in names:
        others = [s for s in names if s != r]
        marginal = [pair(r, s) - single[s] for s in others]
        phi = 0.5 * single[r] + (0.5 * float(np.mean(marginal)) if marginal else 0.5 * single[r])
        raw[r] = max(0.0, phi)
    scale = max([abs(float(v)) for v in importance.values()] + [0.0])
    if scale <= 0:
        return dict.fromkeys(names, 0.0)
    return {r: min(1.0, v / scale) for r, v in raw.items()}


def _margin(probabilities: Mapping[str, float] | None) -> tuple[float, float] | None:
    """(top probability, top - second) of a classifier's probabilities."""
    if not probabilities:
        return None
    p = sorted((float(v) for v in probabilities.values()), reverse=True)
    return p[0], p[0] - (p[1] if len(p) > 1 else 0.0)


def task_uncertainty(prediction: Prediction | None, task: str) -> float:
    """0 (sure) .. 1 (no idea): 1 - margin for classifiers/rankings, 0.5 for regressors."""
    if prediction is None or task not in prediction.results:
        return 1.0
    res = prediction.results[task]
    m = _margin(res.probabilities)
    if m is not None:
        return float(min(1.0, max(0.0, 1.0 - m[1])))
    if res.ranking:
        scores = [float(s) for _, s in res.ranking]
        gap = scores[0] - (scores[1] if len(scores) > 1 else 0.0)
        return float(min(1.0, max(0.0, 1.0 - gap)))
    return 0.5


def cn_uncertainty(prediction: Prediction | None) -> float:
    """1 - the top cn probability (1 without a prediction or a cn task): the PV's uncertainty."""
    if prediction is None or "cn" not in prediction.results:
        return 1.0
    conf = prediction.results["cn"].confidence
    return 1.0 if conf is None else float(1.0 - conf)


def withheld_by(recent: Sequence[Prediction]) -> str:
    """Why stop-early is withheld after ``recent`` (the spectra in a row, newest last; their
    flags include the spectrum's own), naming the newest :data:`STOP_WITHHOLDING_FLAGS`
    flag; '' when none is there."""
    for back, pred in enumerate(reversed(recent)):
        for flag in pred.flags:
            why = STOP_WITHHOLDING_FLAGS.get(
                "extrapolated" if flag.startswith("extrapolated_") else flag
            )
            if why is not None:
                where = "this spectrum" if back == 0 else f"the spectrum {back} before"
                return f"withheld by {flag} in {where} ({why})"
    return ""
