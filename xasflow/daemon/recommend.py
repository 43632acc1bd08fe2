"""Energy-region recommendations: what to measure next, whether to stop, what to rescan.

A :class:`Recommender` turns a bundle's drop-region importances (manifest ``regions`` and
each task's ``region_importance``) and the current :class:`~xasflow.models.predictor.Prediction`
into a :class:`Recommendation`. Everything is a pure, deterministic function of its inputs
(no clocks, no randomness), so the same spectrum always gives the same advice.

How it decides (all knobs in :class:`RecommenderConfig`):

1. **Region importance.** For each task the manifest stores the score lost when one region,
   or a pair, is replaced by the training mean (``"pre-edge"``, ``"pre-edge + main peak"``,
   ...). A truncated Shapley estimate gives each region its share::

       phi_r = 1/2 * v({r}) + 1/2 * mean_s (v({r, s}) - v({s}))

   clipped at 0 and divided by the task's largest |v| (scores of different tasks have
   different units). Tasks are combined with ``task_weights`` scaled by how uncertain each
   task still is, ``0.5 + 0.5 * u_task`` (``u_task`` = 1 - (p1 - p2) for classifiers, 1 - the
   gap between the two top motif scores, 0.5 for regressors, 1 with no prediction yet), and
   the result is scaled so the most important region has importance 1.
2. **Steps and dwell.** The finest useful step of a region starting ``lo`` eV above E0 is
   ``max(fine_step, 2 * 3.81 * k(lo) * k_step)`` with ``k = sqrt(lo / 3.81)`` (constant steps in
   photoelectron wavenumber: features broaden away from the edge; ``fine_step`` unless given
   is 0.65 of the absorber's core-hole width, 1.0 eV for Cu K, since no measured feature is
   narrower than that width: ``RecommenderConfig.for_edge``); a region above the edge
   is cut into pieces where that step has grown by ``piece_growth`` (``beyond``,
   ``beyond (2/4)``, ...), each on its own grid, so far above the edge it is measured as
   coarsely as its features allow, not at the step of its start. A region of importance
   ``w`` gets that step times ``coarse_factor ** (1 - w)`` (finer where it matters) and the
   dwell ``dwell * (dwell_floor + (1 - dwell_floor) * w)``; while the answer is uncertain
   (cn uncertainty above ``uncertain_above``) regions with ``w >= 0.5`` get
   ``uncertain_dwell_factor`` times that dwell. Around E0 (``edge_window``) the step never
   exceeds ``edge_max_step``, because E0 fixes the model grid. Regions are clipped to the
   model window (``prep.window_start`` .. ``prep.window_stop``) widened by ``e0_margin``;
   nothing beyond the window is recommended, since the model never sees it. With
   ``mono_range`` every region, on the axis the monochromator drives, is clipped to what it
   reaches, and one wholly outside is dropped (``Recommendation.dropped``, saying so).
3. **Support regions** the preprocessing needs, importance 0: the pre-edge line
   (``prep.pre_edge``, ``pre_edge_step``) and the approach to the window (``approach_step``).
4. **Stop early** (:mod:`xasflow.daemon.recommend_stop`) when the last ``stop_count`` (2)
   spectra of the run have the same single-value 90 % conformal cn set, each with a cn
   probability of at least
   ``stop_set_probability`` (a bundle without sets: the same cn with probability at least
   ``stop_probability``), never out of domain, and none of them with incomplete data or an
   unchecked energy scale (:data:`~xasflow.daemon.recommend_types.STOP_WITHHOLDING_FLAGS`:
   ``seq_gap``, ``extrapolated_*``, ``align_failed``, ...; the reason names the flag).
5. **Rescan** the most important region (``w >= rescan_importance``) whose measured noise
   exceeds ``noise_threshold``: the noise is the robust scatter of mu / edge step (of the
   spectrum as recorded: HERFD broadening would smooth it away) around local quadratics
   (7 points, on their energies) within the region, corrected for the fit's own variance. The rescan covers the region with as many points as its grid
   (its k pieces' mean step, uniform) and raises the dwell by
   ``(noise / noise_threshold) ** 2`` (counting statistics), at most ``max_rescan_factor``.

E0 itself can be ambiguous: a pre-edge shoulder nearly as steep as the edge makes the
steepest point jump between scans. When the measured spectrum's smoothed derivative has
another local maximum within ``e0_ambiguity_window`` eV of E0 at least ``e0_ambiguity_ratio``
as high, the margin grows by that distance, so the next scan covers the window from either.

Without a prediction (the first spectrum of a run, or one the model could not use) E0 is
found in the measured spectrum when one is given (:func:`~xasflow.spectra.find_e0`), else
it is the tabulated edge energy; the margin is then ``prior_e0_margin`` (chemical shifts
move E0 by several eV).

The analysis run carries the advice as a ``recommendations`` stream, at most one event per
analysed spectrum (the daemon throttles it, but never past a turn of stop-early):
:data:`RECOMMENDATION_KEYS`, :func:`recommendation_row` and :func:`recommendation_docs`;
:class:`RecommendationTracker` keeps each run's history and the decision last said.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from xasflow.daemon.recommend_docs import (
    RECOMMENDATION_KEYS,
    RECOMMENDATION_STREAM,
    parse_recommendation_row,
    recommendation_docs,
    recommendation_row,
    waveform_regions,
)
from xasflow.daemon.recommend_grid import (
    finest_step,
    k_pieces,
    moved_region,
    tidy_region,
    within_range,
)
from xasflow.daemon.recommend_stop import settles
from xasflow.daemon.recommend_types import (
    Recommendation,
    RecommenderConfig,
    Region,
    cn_uncertainty,
    region_shares,
    task_uncertainty,
)
from xasflow.models.bundle import Manifest
from xasflow.models.predictor import Prediction
from xasflow.spectra import Spectrum, SpectrumError, edge_energy, find_e0
from xasflow.spectra.quality import e0_ambiguity, estimate_noise

__all__ = [
    "RECOMMENDATION_KEYS",
    "RECOMMENDATION_STREAM",
    "Recommendation",
    "RecommendationTracker",
    "Recommender",
    "RecommenderConfig",
    "Region",
    "cn_uncertainty",
    "e0_ambiguity",
    "estimate_noise",
    "finest_step",
    "k_pieces",
    "parse_recommendation_row",
    "recommendation_docs",
    "recommendation_row",
    "region_shares",
    "task_uncertainty",
    "waveform_regions",
]

_PRE_EDGE_NAME = "pre-edge line"
_APPROACH_NAME = "approach"


# --------------------------------------------------------------------------- recommender


class Recommender:
    """Recommends the next scan for one bundle (see the module docstring for the rules)."""

    def __init__(self, manifest: Manifest, config: RecommenderConfig | None = None) -> None:
        self.manifest = manifest
        self.config = (config or RecommenderConfig()).for_edge(manifest.element, manifest.edge)
        prep = manifest.prep
        lo, hi = prep.window_start, prep.window_stop
        regions = {
            name: (max(a, lo), min(b, hi))
            for name, (a, b) in manifest.regions.items()
            if min(b, hi) > max(a, lo)
        }
        if not regions:  # a bundle without regions: the whole window is one region
            regions = {"window": (lo, hi)}
        self.regions: dict[str, tuple[float, float]] = dict(
            sorted(regions.items(), key=lambda kv: kv[1][0])
        )
        names = list(self.regions)
        self.shares: dict[str, dict[str, float]] = {
            task: region_shares(spec.region_importance, names)
            for task, spec in manifest.tasks.items()
            if spec.region_importance
        }

    def importance(self, prediction: Prediction | None) -> tuple[dict[str, float], dict[str, str]]:
        """Region -> importance in 0..1 (max 1), and region -> the task that drives it."""
        cfg = self.config
        total = dict.fromkeys(self.regions, 0.0)
        best: dict[str, tuple[float, str]] = {}
        for task, shares in self.shares.items():
            weight = cfg.task_weights.get(task, 0.0)
            if weight <= 0:
                continue
            weight *= 0.5 + 0.5 * task_uncertainty(prediction, task)
            for r, share in shares.items():
                contrib = weight * share
                total[r] += contrib
                if contrib > best.get(r, (0.0, ""))[0]:
                    best[r] = (contrib, task)
        top = max(total.values(), default=0.0)
        if top <= 0:
            return dict.fromkeys(self.regions, 1.0), dict.fromkeys(self.regions, "")
        return (
            {r: v / top for r, v in total.items()},
            {r: best.get(r, (0.0, ""))[1] for r in self.regions},
        )

    def recommend(
        self,
        prediction: Prediction | None = None,
        spectrum: Spectrum | None = None,
        history: Sequence[Prediction] = (),
        measured: Spectrum | None = None,
    ) -> Recommendation:
        """The next scan after ``prediction`` of ``spectrum`` (the measured mu on absolute eV).

        Its regions, rescan and E0 are on the axis the scan was recorded on, the one the
        monochromator drives: for a spectrum the daemon aligned to its reference foil
        (``meta["energy_shift"]``), the aligned values minus that shift.

        ``history`` is the run's predictions so far, oldest first, ending with ``prediction``
        (stop-early looks at its last ``stop_count``). With no prediction, the prior advice
        from the importances alone, centred on :meth:`prior_e0`. ``measured``: ``spectrum``
        before HERFD broadening, where the rescan's noise is measured (None: ``spectrum``).
        """
        cfg, m = self.config, self.manifest
        prep = m.prep
        if prediction is not None and math.isfinite(prediction.e0):
            e0, margin = float(prediction.e0), cfg.e0_margin
            if spectrum is not None:
                margin += e0_ambiguity(
                    spectrum, e0, cfg.e0_ambiguity_window, cfg.e0_ambiguity_ratio
                )
        else:
            e0, margin = self.prior_e0(spectrum), cfg.prior_e0_margin
        u_cn = task_uncertainty(prediction, "cn") if "cn" in m.tasks else 1.0
        unsure = prediction is None or u_cn > cfg.uncertain_above
        weights, drivers = self.importance(prediction)

        regions: list[Region] = []
        spans: list[Region] = []  # each model region whole: its noise is measured once
        names = list(self.regions)
        for i, name in enumerate(names):
            lo, hi = self.regions[name]
            if i == 0:
                lo = min(lo, prep.window_start) - margin
            if i == len(names) - 1:
                hi = max(hi, prep.window_stop) + margin
            w = weights[name]
            dwell = cfg.dwell * (cfg.dwell_floor + (1.0 - cfg.dwell_floor) * w)
            why = f"importance {w:.2f}"
            if drivers[name]:
                why += f", mostly for {drivers[name]}"
            if unsure and w >= 0.5:
                dwell *= cfg.uncertain_dwell_factor
                # u_cn is 1 - (p1 - p2), not the published uncertainty (1 - p1): say which
                why += f"; cn answer uncertain (top two {1 - u_cn:.2f} apart): longer dwell"
            pieces = k_pieces(lo, hi, cfg)
            for k, (a, b) in enumerate(pieces):
                step = finest_step(a, cfg) * cfg.coarse_factor ** (1.0 - w)
                if a < cfg.edge_window[1] and b > cfg.edge_window[0]:
                    step = min(step, cfg.steps()[1])
                label = name if k == 0 else f"{name} ({k + 1}/{len(pieces)})"
                regions.append(tidy_region(label, e0 + a, e0 + b, step, dwell, why, w))
            own = regions[-len(pieces) :]
            points = sum(r.n_points for r in own) - (len(own) - 1)  # shared piece ends once
            start, stop = own[0].start, own[-1].stop
            # the whole region at its pieces' mean step: as many points as its grid has
            step = (stop - start) / max(points - 1, 1) if len(own) > 1 else own[0].step
            spans.append(dataclasses.replace(own[0], stop=stop, step=step))
        first = min(r.start for r in regions) - e0
        pre_lo, pre_hi = prep.pre_edge
        support: list[Region] = []
        if pre_hi < first:
            support.append(
                tidy_region(
                    _PRE_EDGE_NAME,
                    e0 + pre_lo,
                    e0 + pre_hi,
                    cfg.pre_edge_step,
                    cfg.dwell * cfg.dwell_floor,
                    "pre-edge line for normalisation",
                    0.0,
                )
            )
            support.append(
                tidy_region(
                    _APPROACH_NAME,
                    e0 + pre_hi,
                    e0 + first,
                    cfg.approach_step,
                    cfg.dwell * cfg.dwell_floor,
                    "from the pre-edge line up to the model window",
                    0.0,
                )
            )
        regions.sort(key=lambda r: (-r.importance, r.start))
        regions += support

        noise: dict[str, float] = {}
        rescan: Region | None = None
        noisy = spectrum if measured is None else measured  # broadening smooths the noise away
        if noisy is not None and prediction is not None and prediction.edge_step > 0:
            for r in sorted(spans, key=lambda r: (-r.importance, r.start)):
                if r.importance <= 0:
                    continue
                n = estimate_noise(noisy.energy, noisy.mu, r.start, r.stop, prediction.edge_step)
                if n is None:
                    continue
                noise[r.name] = n
                if (
                    rescan is None
                    and r.importance >= cfg.rescan_importance
                    and (n > cfg.noise_threshold)
                ):
                    factor = min(cfg.max_rescan_factor, (n / cfg.noise_threshold) ** 2)
                    rescan = Region(
                        r.name,
                        r.start,
                        r.stop,
                        r.step,
                        round(r.dwell * factor, 4),
                        f"noise {100 * n:.1f}% of the edge step > {100 * cfg.noise_threshold:.1f}%"
                        f" in a region of importance {r.importance:.2f}: "
                        f"{factor:.1f}x dwell",
                        r.importance,
                    )

        stop, stop_reason = self.settles(prediction, history)
        # on the recorded axis the monochromator drives: the analysis saw ``spectrum`` aligned
        # to its reference foil (energy + shift); noise was measured there, on the same frame
        shift = float(spectrum.meta.get("energy_shift", 0.0)) if spectrum is not None else 0.0
        if shift:
            regions = [moved_region(r, -shift) for r in regions]
            rescan = None if rescan is None else moved_region(rescan, -shift)
            e0 -= shift
        dropped: list[Region] = []
        if cfg.mono_range is not None:  # what the monochromator reaches, on the axis it drives
            regions, rescan, dropped = within_range(regions, rescan, *cfg.mono_range)
        return Recommendation(
            regions=regions,
            stop_early=stop,
            stop_reason=stop_reason,
            rescan=rescan,
            e0=e0,
            uncertainty=cn_uncertainty(prediction),
            element=m.element,
            edge=m.edge,
            bundle_id=m.bundle_id,
            noise=noise,
            dropped=dropped,
        )

    def prior_e0(self, spectrum: Spectrum | None = None) -> float:
        """E0 before the model has spoken: found in ``spectrum`` if possible, else tabulated."""
        m = self.manifest
        if spectrum is not None:
            try:
                spec = spectrum if spectrum.element else spectrum.with_(element=m.element)
                return float(find_e0(spec, m.prep.e0_search))
            except (SpectrumError, ValueError):
                pass
        return float(edge_energy(m.element, m.edge))

    def settles(
        self, prediction: Prediction | None, history: Sequence[Prediction]
    ) -> tuple[bool, str]:
        """Whether the last ``stop_count`` spectra settle the cn answer, and why (the rule:
        :func:`~xasflow.daemon.recommend_stop.settles`)."""
        return settles(self.config, self.manifest, prediction, history)


# --------------------------------------------------------------------------- per-run state


class RecommendationTracker:
    """Keeps the recent predictions of each open run, so stop-early can see the run."""

    def __init__(self, config: RecommenderConfig | None = None, max_runs: int = 1024) -> None:
        self.config = config or RecommenderConfig()
        self.max_runs = max_runs
        self._recommenders: dict[str, Recommender] = {}
        self._history: dict[str, list[Prediction]] = {}
        self._said: dict[str, bool] = {}  # the stop-early decision last recommended, per run

    def recommender(self, manifest: Manifest) -> Recommender:
        """The (cached) recommender of a bundle."""
        rec = self._recommenders.get(manifest.bundle_id)
        if rec is None:
            if len(self._recommenders) >= 16:
                self._recommenders.pop(next(iter(self._recommenders)))
            rec = self._recommenders[manifest.bundle_id] = Recommender(manifest, self.config)
        return rec

    def update(
        self,
        run_key: str,
        manifest: Manifest,
        prediction: Prediction,
        spectrum: Spectrum | None = None,
    ) -> Recommendation:
        """Add a run's newest prediction and recommend what follows it."""
        return self.recommend_observed(
            run_key, manifest, self.observe(run_key, prediction), spectrum
        )

    def recommend_observed(
        self,
        run_key: str,
        manifest: Manifest,
        history: list[Prediction],
        spectrum: Spectrum | None = None,
        measured: Spectrum | None = None,
    ) -> Recommendation:
        """Recommend after the run's newest prediction, already observed (``history``)."""
        rec = self.recommender(manifest).recommend(history[-1], spectrum, history, measured)
        self._said[run_key] = rec.stop_early
        return rec

    def turns(self, run_key: str, manifest: Manifest, history: list[Prediction]) -> bool:
        """Whether the stop-early decision after ``history`` (the run's, just observed)
        differs from the one last recommended: a throttled caller must not hide that."""
        stop, _ = self.recommender(manifest).settles(history[-1], history)
        return stop != self._said.get(run_key, False)

    def decided(self, run_key: str, manifest: Manifest, history: list[Prediction]) -> None:
        """Advice after ``history`` was decided and will be computed later: its stop-early
        decision counts as recommended now, for the next spectrum's :meth:`turns`."""
        self._said[run_key], _ = self.recommender(manifest).settles(history[-1], history)

    def interrupt(self, run_key: str) -> None:
        """A spectrum of the run got no answer: the spectra "in a row" start again."""
        hist = self._history.get(run_key)
        if hist is not None:
            hist.clear()

    def observe(self, run_key: str, prediction: Prediction) -> list[Prediction]:
        """Add a run's newest prediction to its history without recommending (cheap).

        A caller that recommends less often than spectra arrive (the daemon at fly-scan rates)
        still lets stop-early see every prediction. Returns the run's recent history.
        """
        hist = self._history.get(run_key)
        if hist is None:
            if len(self._history) >= self.max_runs:
                oldest = next(iter(self._history))
                self._history.pop(oldest)
                self._said.pop(oldest, None)
            hist = self._history[run_key] = []
        if hist and hist[-1].bundle_id != prediction.bundle_id:
            hist.clear()  # a redeployed model starts the agreement count afresh
        hist.append(prediction)
        del hist[: -max(1, self.config.stop_count)]
        return hist

    def close(self, run_key: str) -> None:
        """Forget a finished run."""
        self._history.pop(run_key, None)
        self._said.pop(run_key, None)

    @property
    def open_runs(self) -> list[str]:
        """Runs with a history."""
        return list(self._history)
