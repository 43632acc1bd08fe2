"""The recommender as a bluesky-adaptive (1.0) optimizer, so it can drive an adaptive plan.

bluesky-adaptive 1.0 (``bluesky_adaptive.protocols``) defines an ``Optimizer`` as an object
with ``suggest(num_points) -> [{actuator: position, "_id": ...}, ...]``,
``ingest(points)`` (outcomes carrying the same ``"_id"``) and ``get_best_points()``; an
optimizer that also has ``should_stop() -> (bool, reason)`` (``SupportsStoppingCriteria``)
lets ``bluesky_adaptive.plans.optimize(problem, iterations=None)`` run until it says stop.
:class:`RecommenderOptimizer` implements all four, plus the older ask/tell style
(``ask(n) -> energies``, ``tell(x, y)``, ``tell_many``) used by bluesky-adaptive's earlier
``recommender`` agents.

How it works: measurements come in *passes* (one spectrum each). The first pass is
``initial_energies`` (default: the recommender's prior advice around the tabulated edge);
``suggest`` hands out the pass's energies, most important region first. When every energy
of a pass has an outcome, the pass becomes a :class:`~xasflow.spectra.Spectrum`, the
predictor predicts it, and the :class:`~xasflow.daemon.recommend.Recommender` (through a
:class:`~xasflow.daemon.recommend.RecommendationTracker`, so stop-early sees the history)
sets the next pass. ``should_stop`` turns true when the recommendation says ``stop_early``
or after ``max_passes``. As in the daemon, stop-early needs its spectra "in a row": a pass
that gets no prediction (the predictor refused it) restarts the row.

Every energy is handed out at most ``max_tries`` times per pass: one that never gives a valid
outcome (a non-finite mu, e.g. I0 = 0 during a beam dump, a closed shutter or a detector
dropout at that energy; or an outcome that never comes back) is then given up, and the pass
finishes without it, so ``optimize(iterations=None)`` always ends. A pass in which every
energy was given up stops the agent (no beam to measure with).

Outcomes are per-point mu (key ``"mu"``) or detector counts: ``i0`` and ``signal`` keys
(default ``"I0"``/``"It"``) give mu = ln(I0/It) in transmission (``mode="fluorescence"``:
If/I0). :class:`RunCollector` is an ``EvaluationFunction``: subscribed to the RunEngine, it
turns the acquisition run of ``bluesky_adaptive.plans.default_acquire`` into those
outcomes (matched by the run's ``blop_acquisition_order``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from xasflow.adapters.routing import SafeRouter, SinkRouter
from xasflow.daemon.recommend import (
    Recommendation,
    RecommendationTracker,
    RecommenderConfig,
)
from xasflow.models.predictor import Prediction, Predictor
from xasflow.spectra import Spectrum, SpectrumError

__all__ = ["ID_KEY", "Pass", "RecommenderOptimizer", "RunCollector"]

#: bluesky_adaptive.protocols.ID_KEY
ID_KEY = "_id"


@dataclass
class Pass:
    """One spectrum's worth of energies: what was asked, what came back, what it meant."""

    number: int
    energies: np.ndarray
    dwells: np.ndarray
    order: list[int]  # indices into energies in hand-out order (most important first)
    handed: int = 0
    mu: dict[int, float] = field(default_factory=dict)  # index -> mu
    tries: dict[int, int] = field(default_factory=dict)  # index -> times handed out
    given_up: set[int] = field(default_factory=set)  # no valid outcome in max_tries
    prediction: Prediction | None = None
    recommendation: Recommendation | None = None
    error: str = ""

    @property
    def complete(self) -> bool:
        """Every energy has an outcome or was given up."""
        return len(self.mu) + len(self.given_up) >= self.energies.size

    def unmeasured(self) -> list[int]:
        """Indices still without an outcome, in hand-out order (outside suggestions last)."""
        listed = set(self.order)
        rest = [i for i in range(self.energies.size) if i not in listed]
        return [i for i in [*self.order, *rest] if i not in self.mu and i not in self.given_up]


class RecommenderOptimizer:
    """bluesky-adaptive ``Optimizer`` (+ ``SupportsStoppingCriteria``) driven by the recommender."""

    def __init__(
        self,
        predictor: Predictor,
        config: RecommenderConfig | None = None,
        *,
        actuator: str = "energy",
        initial_energies: Sequence[float] | None = None,
        max_passes: int = 8,
        mode: Literal["transmission", "fluorescence"] = "transmission",
        i0: str = "I0",
        signal: str = "It",
        energy_range: tuple[float, float] | None = None,
        max_tries: int = 3,
    ) -> None:
        """``energy_range``: energies the beamline can reach; suggestions outside are dropped.
        ``max_tries``: hand-outs of one energy per pass before it is given up (see module)."""
        if max_passes < 1:
            raise ValueError("max_passes must be >= 1")
        if max_tries < 1:
            raise ValueError("max_tries must be >= 1")
        self.max_tries = max_tries
        self.predictor = predictor
        self.tracker = RecommendationTracker(config)
        self.actuator = actuator
        self.max_passes = max_passes
        self.mode = mode
        self.i0_key, self.signal_key = i0, signal
        self.energy_range = energy_range
        self.passes: list[Pass] = []
        self._ids = itertools.count()
        self._by_id: dict[Any, tuple[int, int]] = {}  # _id -> (pass number, index)
        self._stop: tuple[bool, str | None] = (False, None)
        rec = self.tracker.recommender(predictor.manifest)
        if initial_energies is None:
            prior = rec.recommend()
            self._new_pass(prior.energies(), prior.dwells(), prior)
        else:
            e = np.unique(np.asarray(initial_energies, dtype=np.float64))
            self._new_pass(e, np.full(e.size, rec.config.dwell), None)

    # ------------------------------------------------------------------ passes

    @property
    def current(self) -> Pass:
        """The pass being measured."""
        return self.passes[-1]

    def _new_pass(
        self, energies: np.ndarray, dwells: np.ndarray, rec: Recommendation | None
    ) -> None:
        if self.energy_range is not None:
            lo, hi = self.energy_range
            keep = (energies >= lo) & (energies <= hi)
            energies, dwells = energies[keep], dwells[keep]
        order = list(range(energies.size))
        if rec is not None:  # hand out the most important region first, each ascending
            rank = np.full(energies.size, len(rec.regions), dtype=float)
            for k, region in enumerate(reversed(rec.regions)):
                inside = (energies >= region.start - 1e-6) & (energies <= region.stop + 1e-6)
                rank[inside] = len(rec.regions) - 1 - k
            order = sorted(order, key=lambda i: (rank[i], energies[i]))
        self.passes.append(Pass(len(self.passes), energies, dwells, order))

    def _finish_pass(self) -> None:
        """Predict the completed pass and plan the next one (or stop)."""
        p = self.current
        if not p.mu:  # every energy given up: nothing reaches the detector
            p.error = "no_valid_outcome"
            self._stop = (True, f"pass {p.number}: no energy gave a valid outcome")
            return
        idx = sorted(p.mu)
        energy = p.energies[idx]
        mu = np.array([p.mu[i] for i in idx])
        spectrum: Spectrum | None = None
        try:
            spectrum = Spectrum(
                energy, mu, self.predictor.manifest.element, self.predictor.manifest.edge
            )
            p.prediction = self.predictor.predict(spectrum)
        except SpectrumError as exc:
            p.error = exc.reason
            if exc.reason in ("shape", "too_short", "not_finite"):
                spectrum = None
        if p.prediction is not None:
            rec = self.tracker.update("adaptive", self.predictor.manifest, p.prediction, spectrum)
            p.recommendation = rec
            if rec.stop_early:
                self._stop = (True, rec.stop_reason)
                return
            energies, dwells = rec.energies(), rec.dwells()
            if rec.rescan is not None:
                r = rec.rescan
                inside = (energies >= r.start - 1e-6) & (energies <= r.stop + 1e-6)
                dwells[inside] = np.maximum(dwells[inside], r.dwell)
        else:  # no prediction: the prior advice, re-centred on the E0 this pass shows
            self.tracker.interrupt("adaptive")  # "in a row": this pass broke the row
            rec = self.tracker.recommender(self.predictor.manifest).recommend(None, spectrum)
            energies, dwells = rec.energies(), rec.dwells()
        if len(self.passes) >= self.max_passes:
            self._stop = (True, f"{self.max_passes} passes measured")
            return
        self._new_pass(energies, dwells, rec)

    # ------------------------------------------------------------------ bluesky-adaptive 1.0

    def suggest(self, num_points: int | None = None) -> list[dict[str, Any]]:
        """Up to ``num_points`` (default 1) unmeasured energies of the current pass (their
        dwells: :meth:`dwells`)."""
        if self._stop[0]:
            return []
        n = 1 if num_points is None else int(num_points)
        p = self.current
        if p.energies.size == 0:
            self._stop = (True, "no recommended energy is within reach")
            return []
        if p.handed >= len(p.order):  # all handed out, some gave nothing valid: ask again
            chosen: list[int] = []
            for i in p.unmeasured():
                if p.tries.get(i, 0) >= self.max_tries:
                    p.given_up.add(i)
                elif len(chosen) < n:
                    chosen.append(i)
            if not chosen:  # every energy left was given up: the pass ends without them
                if p.complete and not self._stop[0]:
                    self._finish_pass()
                    return self.suggest(num_points)  # the next pass's, or none when stopped
                return []
        else:
            chosen = p.order[p.handed : p.handed + n]
            p.handed += len(chosen)
        out = []
        for i in chosen:
            p.tries[i] = p.tries.get(i, 0) + 1
            _id = next(self._ids)
            self._by_id[_id] = (p.number, i)
            out.append({self.actuator: float(p.energies[i]), ID_KEY: _id})
        return out

    def dwells(self, suggestions: Sequence[Mapping[str, Any]]) -> list[float]:
        """The counting time (s) the recommendation set for each suggested point (importance,
        an uncertain answer, a rescan), for an acquisition plan that sets the detectors' count
        time per point. bluesky-adaptive's ``default_acquire`` moves only the actuators, so
        with it every point is counted alike, rescans included (a dwell cannot ride in the
        suggestion: it routes the scan over every float a suggestion holds)."""
        out = []
        for s in suggestions:
            number, i = self._by_id[s[ID_KEY]]
            out.append(float(self.passes[number].dwells[i]))
        return out

    def register_suggestions(self, suggestions: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``CanRegisterSuggestions``: give outside suggestions ids (they join the current pass)."""
        out = []
        p = self.current
        for s in suggestions:
            e = float(s[self.actuator])
            hit = np.flatnonzero(np.isclose(p.energies, e, atol=1e-6))
            if hit.size:
                i = int(hit[0])
            else:
                p.energies = np.append(p.energies, e)
                p.dwells = np.append(p.dwells, p.dwells.max() if p.dwells.size else 1.0)
                i = p.energies.size - 1
            p.tries[i] = p.tries.get(i, 0) + 1
            _id = next(self._ids)
            self._by_id[_id] = (p.number, i)
            out.append({**s, ID_KEY: _id})
        return out

    def ingest(self, points: Sequence[Mapping[str, Any]]) -> None:
        """Outcomes with ``"_id"`` (or an ``energy`` key for outside data) and mu or counts."""
        for point in points:
            mu = self._mu(point)
            key = self._by_id.pop(point.get(ID_KEY), None) if ID_KEY in point else None
            if key is None:
                if mu is None or self.actuator not in point:
                    continue
                fresh = self.register_suggestions([{self.actuator: point[self.actuator]}])[0]
                key = self._by_id.pop(fresh[ID_KEY])
            number, i = key
            p = self.current
            if number != p.number:
                continue  # a late outcome of a finished pass
            if mu is None:  # no valid reading: asked again, up to max_tries in all
                if i not in p.mu and p.tries.get(i, 0) >= self.max_tries:
                    p.given_up.add(i)
                continue
            p.mu[i] = mu
            p.given_up.discard(i)
        if not self._stop[0] and self.current.complete and self.current.energies.size:
            self._finish_pass()

    def _mu(self, point: Mapping[str, Any]) -> float | None:
        if "mu" in point:
            value = float(point["mu"])
        else:
            try:
                i0, sig = float(point[self.i0_key]), float(point[self.signal_key])
            except (KeyError, TypeError, ValueError):
                return None
            if self.mode == "transmission":
                value = math.log(i0 / sig) if i0 > 0 and sig > 0 else math.nan
            else:
                value = sig / i0 if i0 > 0 else math.nan
        return value if math.isfinite(value) else None

    def should_stop(self) -> tuple[bool, str | None]:
        """``SupportsStoppingCriteria``: stop when the answer is certain or passes run out."""
        return self._stop

    def get_best_points(self) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
        """The latest predicted pass: ``(pass id, {energies, n_points}, prediction dict)``."""
        for p in reversed(self.passes):
            if p.prediction is not None:
                params = {"energies": p.energies.tolist(), "n_points": int(p.energies.size)}
                outcome = p.prediction.to_dict()
                if p.recommendation is not None:
                    outcome["recommendation"] = p.recommendation.to_dict()
                return [(f"pass-{p.number}", params, outcome)]
        return []

    # ------------------------------------------------------------------ ask / tell (pre-1.0)

    def ask(self, n: int = 1) -> list[float]:
        """Energies to measure next (ask/tell style); empty when done."""
        return [s[self.actuator] for s in self.suggest(n)]

    def tell(self, x: float, y: float | Mapping[str, Any]) -> None:
        """One measurement: energy ``x`` and mu (a number) or counts (a mapping)."""
        self.tell_many([x], [y])

    def tell_many(self, xs: Sequence[float], ys: Sequence[float | Mapping[str, Any]]) -> None:
        """Several measurements at once (matched to handed-out energies by value)."""
        p = self.current
        pending = {
            float(p.energies[i]): _id
            for _id, (num, i) in list(self._by_id.items())
            if num == p.number
        }
        points = []
        for x, y in zip(xs, ys, strict=True):
            point: dict[str, Any] = dict(y) if isinstance(y, Mapping) else {"mu": float(y)}
            _id = pending.pop(round(float(x), 6), None)
            if _id is None:
                match = [e for e in pending if abs(e - float(x)) < 1e-6]
                _id = pending.pop(match[0]) if match else None
            if _id is not None:
                point[ID_KEY] = _id
            else:
                point[self.actuator] = float(x)
            points.append(point)
        self.ingest(points)


#: Acquisition runs a :class:`RunCollector` keeps for evaluation (the oldest go first).
_MAX_UNEVALUATED = 64


class RunCollector:
    """An ``EvaluationFunction``: RunEngine documents -> outcomes keyed by suggestion id.

    Subscribe it (``RE.subscribe(collector)``); ``collector(uid, suggestions)`` then returns
    ``[{"_id", <keys>...}]`` for the acquisition run ``uid``, whose start document lists
    ``blop_acquisition_order`` (as ``bluesky_adaptive.plans.default_acquire`` writes it).
    """

    __name__ = "RunCollector"

    def __init__(self, keys: Sequence[str] = ("I0", "It")) -> None:
        self.keys = list(keys)
        self._order: dict[str, list[Any]] = {}  # acquisition run uid -> suggestion ids
        self._rows: dict[str, list[dict[str, Any]]] = {}  # ... -> its primary events' values
        self._router = SafeRouter([self._factory], "adaptive run collector")

    def __call__(self, *args: Any) -> Any:
        """``(name, doc)`` from the RunEngine, or ``(uid, suggestions)`` from the plan."""
        first, second = args
        if isinstance(first, str) and isinstance(second, Mapping):
            self._document(first, second)
            return None
        return self.evaluate(first, second)

    def _document(self, name: str, doc: Mapping[str, Any]) -> None:
        self._router(name, doc)

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """An acquisition run (its start lists the order): collect its primary events."""
        if "blop_acquisition_order" not in start:
            return [], []
        self._order[start["uid"]] = list(start["blop_acquisition_order"])
        rows = self._rows[start["uid"]] = []
        while len(self._order) > _MAX_UNEVALUATED:  # runs no plan asked for (aborted plans)
            oldest = next(iter(self._order))
            del self._order[oldest], self._rows[oldest]
        keys = self.keys

        def primary(name: str, descriptor: dict[str, Any]) -> list[Any]:
            return [_RowCollector(keys, rows)] if descriptor.get("name") == "primary" else []

        return [], [primary]

    def evaluate(self, uid: str, suggestions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Outcomes of run ``uid``: acquisition order zipped with its primary events."""
        order, rows = self._order.pop(uid), self._rows.pop(uid)
        if len(order) != len(rows):
            raise RuntimeError(f"run {uid}: {len(order)} points asked, {len(rows)} events read")
        return [{ID_KEY: _id, **row} for _id, row in zip(order, rows, strict=True)]


class _RowCollector(SinkRouter):
    """The primary stream of one acquisition run: appends each event's ``keys`` to ``rows``."""

    def __init__(self, keys: list[str], rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.keys, self.rows = keys, rows

    def event(self, doc: Any) -> Any:
        self.rows.append({k: doc["data"].get(k) for k in self.keys})
