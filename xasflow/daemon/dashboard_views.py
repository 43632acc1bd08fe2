"""What the dashboard shows, as pure views of state published to it: one run's counts and
decimated history (:class:`RunView`), the latest spectrum and prediction with its doubt
(:func:`latest_views`), the health numbers (:func:`health_view`), the latest advice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xasflow.daemon.analysis_rows import finite_number

__all__ = [
    "RunView",
    "clean",
    "health_view",
    "latest_views",
    "nan_number",
    "recommendation_view",
    "regions_view",
    "series",
]

_HISTORY_POINTS = 20_000  # per run, before decimation by 2
_HISTORY_BINS = 400  # points per history series sent to the page
_RAW_POINTS = 800  # raw spectrum points sent to the page
_MOTIFS_SHOWN = 8
#: History columns kept per analysed or rejected spectrum of a run.
_COLUMNS = (
    "index",
    "time",
    "ok",
    "cn",
    "cn_probability",
    "valence",
    "valence_probability",
    "distance",
    "charge",
    "e0",
    "out_of_domain",  # 1 out of domain, 0 in, NaN no answer (binned: the fraction out)
)


class _Numbers(list[Any]):
    """A list already JSON-safe (from :func:`_series`): :func:`_clean` passes it through."""


def clean(value: Any) -> Any:
    """JSON-safe copy: numpy to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, _Numbers):
        return value
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_number(value)
    return str(value)


def series(values: np.ndarray, digits: int = 5) -> list[float | None]:
    """A float array as a JSON list, rounded, non-finite as None."""
    a = np.round(np.asarray(values, dtype=np.float64), digits)
    if np.isfinite(a).all():
        return _Numbers(a.tolist())
    return _Numbers(v if math.isfinite(v) else None for v in a.tolist())


def json_loads(text: Any) -> Any:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class RunView:
    """What the dashboard keeps of one analysis run."""

    raw_uid: str
    kind: str = "unknown"
    element: str | None = None
    edge: str | None = None
    bundle_id: str | None = None
    scan_id: int | None = None
    plan_name: str | None = None
    sample: str | None = None
    started: float | None = None
    n_ok: int = 0
    n_rejected: int = 0
    n_out_of_domain: int = 0
    missing: int | None = None  # raw events the run lost (its stop's raw_missing_events)
    exit_status: str | None = None
    reason: str = ""
    ended: float | None = None
    last: dict[str, Any] | None = None  # last primary event data
    recommendation: dict[str, Any] | None = None  # last recommendations event data
    data: np.ndarray = field(  # history rows (see _COLUMNS), the first ``n`` in use
        default_factory=lambda: np.empty((256, len(_COLUMNS)), dtype=np.float64)
    )
    n: int = 0
    stride: int = 1  # keep every stride-th spectrum (the history is decimated when full)
    seen: int = 0  # primary events seen
    keys: list[str] = field(default_factory=list)  # its analysis start and descriptor uids

    def add(self, data: dict[str, Any], t: float) -> None:
        """Count one primary event and keep it in the (decimated) history."""
        ok = data.get("status") == "ok"
        if ok:
            self.n_ok += 1
            self.n_out_of_domain += bool(data.get("out_of_domain"))
        else:
            self.n_rejected += 1
        self.last = data
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        index = data.get("index")
        row = (
            float(index) if isinstance(index, int) else math.nan,
            t,
            1.0 if ok else 0.0,
            nan_number(data.get("cn")),
            nan_number(data.get("cn_probability")),
            nan_number(data.get("valence")),
            nan_number(data.get("valence_probability")),
            nan_number(data.get("distance")),
            nan_number(data.get("charge")),
            nan_number(data.get("e0")),
            (1.0 if data.get("out_of_domain") else 0.0) if ok else math.nan,
        )
        if self.n == self.data.shape[0]:  # grow geometrically up to the cap
            grown = np.empty((min(2 * self.n, _HISTORY_POINTS), len(_COLUMNS)))
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n] = row
        self.n += 1
        if self.n >= _HISTORY_POINTS:  # halve the resolution, keep the whole run
            half = self.data[: self.n : 2].copy()
            self.data[: half.shape[0]] = half
            self.n = half.shape[0]
            self.stride *= 2

    def column(self, name: str) -> np.ndarray:
        """One history column (a view)."""
        return self.data[: self.n, _COLUMNS.index(name)]

    def summary(self) -> dict[str, Any]:
        """The run's identity and counts."""
        return {
            "raw_uid": self.raw_uid,
            "kind": self.kind,
            "sample": self.sample,
            "element": self.element,
            "edge": self.edge,
            "bundle_id": self.bundle_id,
            "scan_id": self.scan_id,
            "plan_name": self.plan_name,
            "started": self.started,
            "ended": self.ended,
            "n_ok": self.n_ok,
            "n_rejected": self.n_rejected,
            "n_out_of_domain": self.n_out_of_domain,
            "missing": self.missing,
            "exit_status": self.exit_status,
            "reason": self.reason,
        }

    def history(self, bins: int = _HISTORY_BINS) -> dict[str, Any]:
        """The run's predictions over time, averaged into at most ``bins`` points."""
        cols = {name: self.column(name) for name in _COLUMNS}
        n = self.n
        out: dict[str, Any] = {"n": n, "stride": self.stride, "binned": n > bins}
        if n > bins:
            edges = np.linspace(0, n, bins + 1).astype(int)
            starts = edges[:-1][np.diff(edges) > 0]
            counts = np.diff(np.append(starts, n))
            for name, a in cols.items():
                finite = np.isfinite(a)
                sums = np.add.reduceat(np.where(finite, a, 0.0), starts)
                k = np.add.reduceat(finite.astype(np.float64), starts)
                with np.errstate(invalid="ignore", divide="ignore"):
                    cols[name] = np.where(k > 0, sums / np.maximum(k, 1), np.nan)
            out["counts"] = counts.tolist()
        for name, a in cols.items():
            out[name] = series(a, 4)
        return out


def nan_number(value: Any) -> float:
    v = finite_number(value)
    return math.nan if v is None else v


def regions_view(manifest: Any, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Regions (relative to E0, clipped to the model window) and per-task shares."""
    cached = cache.get(manifest.bundle_id)
    if cached is not None:
        return cached
    from xasflow.daemon.recommend import region_shares

    prep = manifest.prep
    names = list(manifest.regions)
    shares = {
        task: region_shares(spec.region_importance, names)
        for task, spec in manifest.tasks.items()
        if spec.region_importance
    }
    regions = []
    for name in names:
        lo, hi = manifest.regions[name]
        lo, hi = max(float(lo), prep.window_start), min(float(hi), prep.window_stop)
        if hi <= lo:
            continue
        per_task = {task: float(s.get(name, 0.0)) for task, s in shares.items()}
        regions.append(
            {
                "name": name,
                "start": lo,
                "stop": hi,
                "importance": per_task,
                "max": max(per_task.values(), default=0.0),
            }
        )
    out = {"regions": regions, "tasks": sorted(shares)}
    cache.clear()  # one bundle in view at a time
    cache[manifest.bundle_id] = out
    return out


def latest_views(
    latest: Any, cache: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plotted spectrum and the full prediction of the pipeline's latest spectrum."""
    prep, pred, manifest = latest.prepared, latest.prediction, latest.manifest
    spec = prep.spectrum
    e, mu = np.asarray(spec.energy), np.asarray(spec.mu)
    step = max(1, math.ceil(e.size / _RAW_POINTS))
    grid = manifest.prep.grid
    regions = regions_view(manifest, cache)
    spectrum = {
        "raw_uid": latest.raw_uid,
        "index": latest.index,
        "bundle_id": manifest.bundle_id,
        "element": manifest.element,
        "edge": manifest.edge,
        "e0": prep.e0,
        "edge_step": prep.edge_step,
        "energy_shift": latest.energy_shift,
        "extrapolated": prep.extrapolated,
        "window": [manifest.prep.window_start, manifest.prep.window_stop],
        "energy": series(e[::step], 3),
        "mu": series(mu[::step], 5),
        "grid": series(grid, 3),  # relative to E0
        "y": series(prep.y, 5),
        **regions,
    }
    res = pred.results
    tasks: dict[str, Any] = {}
    for name, r in res.items():
        entry: dict[str, Any] = {"value": r.value, "kind": manifest.tasks[name].kind}
        spec_t = manifest.tasks.get(name)
        if r.probabilities is not None:
            entry["probabilities"] = r.probabilities
            entry["confidence"] = r.confidence
        if r.ranking is not None:
            entry["ranking"] = [[lab, s] for lab, s in r.ranking[:_MOTIFS_SHOWN]]
            entry["n_ranked"] = len(r.ranking)
        if r.prediction_set is not None:
            entry["prediction_set"] = list(r.prediction_set)
        coverage = manifest.set_coverage(name)
        if r.unbounded:  # no finite bound was fitted
            entry["interval_unbounded"] = True
        elif r.interval is not None:
            entry["interval"] = [r.interval[0], r.interval[1]]
        if coverage is not None:
            entry["coverage"] = coverage
        if spec_t is not None:
            entry["metrics"] = dict(spec_t.metrics)
            entry["unit"] = spec_t.unit
            mae = spec_t.metrics.get("mae")
            if mae is not None:
                entry["uncertainty"] = mae  # held-out mean absolute error
        tasks[name] = entry
    motifs = res.get("motifs") or res.get("environment")
    env = res.get("environment")
    prediction = {
        "raw_uid": latest.raw_uid,
        "index": latest.index,
        "bundle_id": pred.bundle_id,
        "element": pred.element,
        "edge": pred.edge,
        "e0": pred.e0,
        "flags": list(pred.flags),
        "out_of_domain": pred.out_of_domain,
        "ood_score": pred.ood_score,
        "tasks": tasks,
        "environment": None if env is None or env.value is None else str(env.value),
        "motifs": (
            [[lab, s] for lab, s in motifs.ranking[:_MOTIFS_SHOWN]]
            if motifs is not None and motifs.ranking
            else []
        ),
    }
    return spectrum, prediction


def health_view(h: dict[str, Any]) -> dict[str, Any]:
    """The health numbers the page shows, from ``DaemonView.health()``."""
    c = h.get("counters", {})
    inp, out, store = h.get("input", {}), h.get("output", {}), h.get("store", {})
    return {
        "ready": h.get("ready"),
        "serving": h.get("serving"),
        "version": h.get("version"),
        "uptime_s": h.get("uptime_s"),
        "queue_depth": h.get("queue_depth"),
        "open_runs": h.get("open_runs"),
        "received": c.get("spectra_received"),
        "analysed": c.get("spectra_analysed"),
        "rejected_total": c.get("spectra_rejected"),  # both stages
        "rejected_per_stage": c.get("spectra_rejected_by_stage", {}),
        "out_of_domain": c.get("out_of_domain"),
        "events_lost": c.get("events_lost", {}),
        "events_lost_total": c.get("events_lost_total"),
        "rejected": c.get("rejected", {}),
        "rejected_by_stage": c.get("rejected_by_stage", {}),
        "decode_errors": c.get("decode_errors", {}),
        "runs_opened": c.get("runs_opened"),
        "runs_closed": c.get("runs_closed", {}),
        "model_swaps": c.get("model_swaps"),
        "latency": c.get("latency", {}),
        "input": {
            k: inp.get(k)
            for k in (
                "address",
                "received",
                "dropped_overflow",
                "backpressure_waits",
                "own_output_dropped",
            )
        },
        "output": {k: out.get(k) for k in ("address", "sent")},
        "store": {k: store.get(k) for k in ("directory", "stored", "queued", "dropped")},
        "models": [
            {
                k: m.get(k)
                for k in ("bundle_id", "element", "edge", "created", "loaded_at", "metrics")
            }
            for m in h.get("models", [])
        ],
        "models_refused": h.get("models_refused", {}),
        "internal_errors": h.get("internal_errors"),
    }


def recommendation_view(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recommendations event's data with its JSON fields decoded."""
    if not data:
        return None
    out = {k: data.get(k) for k in ("index", "n_points", "scan_time", "stop_early", "stop_reason")}
    out["uncertainty"] = data.get("uncertainty")
    out["regions"] = json_loads(data.get("regions")) or []
    out["rescan"] = json_loads(data.get("rescan"))
    out["dropped"] = json_loads(data.get("dropped")) or []  # outside the monochromator's range
    return out
