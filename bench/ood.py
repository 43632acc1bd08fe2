"""Benchmark: out-of-domain scorers, probability calibration and conformal coverage on Cu data.

Builds the Cu dataset as ``fit.train`` does (shared FEFF tree, the config's grid and
material-grouped split), then
- scores OOD candidates (PCA reconstruction error, Mahalanobis in PCA space, their
  probabilistic-PCA sum, 5-nearest-neighbour distance in whitened PCA space), each with the
  threshold that flags 5 % of the validation split, on the test split and on every measured Cu
  spectrum of the XAS Data Library (plus CuO scaled by 0.85 and 1.15, and the packaged FEFF10
  demo spectra), and checks ONNX against numpy for the chosen scorer;
- fits ExtraTrees (``fit.make_estimator``) on the train rows only for cn, valence, distance and
  charge; the validation rows calibrate: ECE before/after temperature scaling, LAC vs APS set
  coverage and size, absolute vs tree-spread-normalised interval coverage, all on the test split.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ood.py --json bench/results/ood.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np
from report import write_json

from xasflow import paths
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra import SpectrumError, featurize, linear_matrix, model_input, prepare
from xasflow.training import calibrate as C
from xasflow.training import ood as O
from xasflow.training.dataset import build_feff_dataset, grid_dataset
from xasflow.training.fit import TrainConfig, make_estimator, task_targets
from xasflow.training.split import split_dataset, split_keys

ALPHA = 0.1
SHOULD_FLAG = ("Cu_Foil", "cu_metal", "CuS_", "Cu2S", "CuCl")


def load_data(cfg: TrainConfig) -> dict[str, Any]:
    """Grid, split and featurise the shared Cu FEFF set exactly as training does."""
    ds = build_feff_dataset(paths.cu_feff_archive(), "Cu", progress=False)
    g = grid_dataset(ds, cfg.prep)
    sub = ds.subset(g.rows)
    parts = split_dataset(sub, cfg.split_salt, cfg.test_fraction, cfg.val_fraction, cfg.split_by)
    x_in = model_input(g.y, cfg.features, cfg.prep)
    feats = featurize(g.y, cfg.features, cfg.prep, linear_matrix(cfg.features, cfg.prep))
    return {"sub": sub, "parts": parts, "x_in": x_in, "X": feats}


def measured_inputs(cfg: TrainConfig) -> dict[str, np.ndarray]:
    """Model inputs of every Cu XDI file of the shared library (and the FEFF10 demo spectra)."""
    out: dict[str, np.ndarray] = {}
    for path in sorted((paths.xas_data_library() / "Cu").glob("*.xdi")):
        try:
            prep = prepare(xdi_to_spectrum(read_xdi(path)), cfg.prep)
        except (SpectrumError, ValueError) as exc:
            print(f"  {path.name}: not prepared ({exc})", file=sys.stderr)
            continue
        out[path.name] = model_input(prep.y, cfg.features, cfg.prep)
    try:
        from xasflow.sim.feff_demo import load_demo_spectra

        for demo in load_demo_spectra():
            prep = prepare(demo.to_spectrum(), cfg.prep)
            out[f"feff10-demo:{demo.name}"] = model_input(prep.y, cfg.features, cfg.prep)
    except (ImportError, SpectrumError) as exc:
        print(f"  demo spectra skipped ({exc})", file=sys.stderr)
    return out


def other_element_inputs(cfg: TrainConfig) -> dict[str, np.ndarray]:
    """Model inputs of every K-edge XDI spectrum of the other elements (each at its own edge)."""
    out: dict[str, np.ndarray] = {}
    for path in sorted(paths.xas_data_library().glob("*/*.xdi")):
        if path.parent.name == "Cu":
            continue
        try:
            spectrum = xdi_to_spectrum(read_xdi(path))
            if spectrum.edge != "K":
                continue
            prep = prepare(spectrum, cfg.prep)
        except (SpectrumError, ValueError):
            continue
        out[f"{path.parent.name}/{path.name}"] = model_input(prep.y, cfg.features, cfg.prep)
    return out


def _knn_scores(train_z: np.ndarray, z: np.ndarray, k: int = 5) -> np.ndarray:
    """Distance to the k-th nearest training row (whitened PCA coordinates)."""
    d2 = (z**2).sum(1)[:, None] - 2 * z @ train_z.T + (train_z**2).sum(1)[None]
    return np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0))


def _knn_score_fn(s: O.OodScorer, train: np.ndarray) -> Any:
    """Score function: 5th-neighbour distance in the whitened PCA space of scorer ``s``."""
    rt = s.runtime()

    def z_of(a: np.ndarray) -> np.ndarray:
        a = np.atleast_2d(a)
        w = a[:, rt["window"][0] : rt["window"][1]]
        if rt["norm_window"] is not None:
            w = w / a[:, rt["norm_window"][0] : rt["norm_window"][1]].mean(axis=1, keepdims=True)
        return (w - s.mean) @ s.components.T * s.inv_scale

    train_z = z_of(train)

    def score(a: np.ndarray) -> np.ndarray:
        return _knn_scores(train_z, z_of(a))

    return score


def ood_candidates(
    data: dict[str, Any], meas: dict[str, np.ndarray], grid: np.ndarray
) -> list[dict[str, Any]]:
    """Every candidate scorer: test flagged fraction and measured score / threshold."""
    x, parts = data["x_in"], data["parts"]
    tr, va, te = x[parts["train"]], x[parts["val"]], x[parts["test"]]
    cuo = meas.get("CuO_tenorite_13K_01.xdi")
    rows = []
    w60 = O.energy_window(grid, -3.5, 60.0)
    full = (0, grid.size)
    # (scored columns, columns whose mean divides each spectrum or None)
    windows = {
        "full": (full, None),
        "full/mean": (full, full),
        "-3.5..60eV": (w60, None),
        "-3.5..60eV/mean-of-window": (w60, w60),
        "-3.5..60eV/mean-of-full": (w60, full),
    }
    for wname, (win, norm) in windows.items():
        normalise = norm is not None
        for k in (5, 10, 20):
            for method in (*O.METHODS, "knn5"):
                fit_method = "mahalanobis" if method == "knn5" else method
                s = O.fit_ood(tr, va, fit_method, k, win, normalise, norm_window=norm)
                if method == "knn5":
                    score = _knn_score_fn(s, tr)
                    v = score(va)
                    thr = float(np.sort(v)[int(np.ceil(0.95 * len(v))) - 1])
                else:
                    score, thr = s.score, s.threshold
                row: dict[str, Any] = {
                    "method": method,
                    "n_components": k,
                    "window": wname,
                    "normalise": normalise,
                    "threshold": thr,
                    "val_flagged": float(np.mean(score(va) > thr)),
                    "test_flagged": float(np.mean(score(te) > thr)),
                    "ratio": {n: float(score(v)[0] / thr) for n, v in meas.items()},
                }
                if cuo is not None:
                    row["ratio"]["CuO x0.85"] = float(score(cuo * 0.85)[0] / thr)
                    row["ratio"]["CuO x1.15"] = float(score(cuo * 1.15)[0] / thr)
                r = row["ratio"]
                bad = [n for n in meas if n.startswith(SHOULD_FLAG)]
                good = [n for n in r if n not in bad and not n.startswith("feff10")]
                row["flags_all_foreign"] = all(r[n] > 1 for n in bad)
                row["foreign_flagged"] = int(sum(r[n] > 1 for n in bad))
                row["oxides_flagged"] = int(sum(r[n] > 1 for n in good))
                rows.append(row)
    return rows


def chosen_ood(
    data: dict[str, Any],
    meas: dict[str, np.ndarray],
    grid: np.ndarray,
    others: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The chosen scorer in full: per-file scores, ONNX parity and cost."""
    import onnxruntime as ort

    x, parts = data["x_in"], data["parts"]
    s = O.fit_default_ood(x[parts["train"]], x[parts["val"]], grid)
    te = x[parts["test"]]
    sess = ort.InferenceSession(s.to_onnx(x.shape[1]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": te})[0]
    want = s.score(te)
    batch = te[:64]
    t_onnx = _best(lambda: sess.run(None, {"x": batch}))
    t_np = _best(lambda: s.score(batch))
    t_one = _best(lambda: s.score(te[:1]))
    per_file = {}
    for name, v in meas.items():
        per_file[name] = {"score": float(s.score(v)[0]), "flagged": bool(s.flags(v)[0])}
    cuo = meas.get("CuO_tenorite_13K_01.xdi")
    if cuo is not None:
        for f in (0.85, 1.15):
            per_file[f"CuO_tenorite_13K_01.xdi x{f}"] = {
                "score": float(s.score(cuo * f)[0]),
                "flagged": bool(s.flags(cuo * f)[0]),
            }
    other_flags = s.flags(np.vstack(list(others.values()))) if others else np.zeros(0, bool)
    by_element: dict[str, list[bool]] = {}
    for name, flag in zip(others, other_flags, strict=True):
        by_element.setdefault(name.split("/")[0], []).append(bool(flag))
    return {
        "spec": s.spec(),
        "test_flagged_fraction": float(np.mean(s.flags(te))),
        "other_elements": {
            "n": len(others),
            "flagged_fraction": float(np.mean(other_flags)) if others else None,
            "flagged_by_element": {k: f"{sum(v)}/{len(v)}" for k, v in by_element.items()},
        },
        "onnx_max_rel_diff": float(np.max(np.abs(got - want) / np.abs(want))),
        "onnx_batch64_ms": t_onnx * 1e3,
        "numpy_batch64_ms": t_np * 1e3,
        "numpy_one_ms": t_one * 1e3,
        "onnx_bytes": len(s.to_onnx(x.shape[1])),
        "measured": per_file,
    }


def _best(fn: Any, repeat: int = 50) -> float:
    """Best of ``repeat`` wall times (seconds) of ``fn()``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def runtime_cost() -> dict[str, float]:
    """Milliseconds of the daemon-side calls (temperature, LAC sets, intervals) per batch."""
    from xasflow.models import uncertainty as U

    rng = np.random.default_rng(0)
    out = {}
    for n in (1, 64):
        p = rng.dirichlet(np.ones(10), size=n)
        pred = rng.normal(size=n)

        def calls(p: np.ndarray = p, pred: np.ndarray = pred) -> None:
            U.prediction_sets(U.apply_temperature(p, 0.7), 0.75, "lac")
            U.intervals(pred, 0.1)

        out[f"batch{n}_ms"] = _best(calls, 200) * 1e3
    return out


def _ece_std(probs: np.ndarray, y_idx: np.ndarray, n: int = 200) -> float:
    """Bootstrap standard deviation of the ECE over test rows (its sampling noise)."""
    rng = np.random.default_rng(0)
    picks = (rng.integers(0, len(y_idx), len(y_idx)) for _ in range(n))
    return float(np.std([C.ece(probs[i], y_idx[i]) for i in picks]))


def classifier_figures(
    name: str,
    data: dict[str, Any],
    cfg: TrainConfig,
    params: dict[str, Any],
    meas: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """ECE before/after temperature scaling and LAC/APS sets, calibrated on validation;
    the calibrated answer and LAC set of each measured reference."""
    sub, parts, X = data["sub"], data["parts"], data["X"]
    kind, y, valid = task_targets(sub, np.arange(len(sub)))[name]
    tr, va, te = (parts[k][valid[parts[k]]] for k in ("train", "val", "test"))
    weight = None
    if name == "cn" and cfg.weight_by_label_confidence:
        weight = np.nanmax(sub.cn_vector[tr], axis=1)
    t0 = time.perf_counter()
    est = make_estimator(kind, params, cfg, name).fit(X[tr], y[tr], sample_weight=weight)
    fit_s = time.perf_counter() - t0
    classes = list(est.classes_)
    # validation/test labels unseen in training cannot be scored by any set: counted, dropped
    seen = set(classes)
    va = va[[v in seen for v in y[va]]]
    n_te = len(te)
    te = te[[v in seen for v in y[te]]]
    p_va, p_te = est.predict_proba(X[va]), est.predict_proba(X[te])
    y_va, y_te = C.label_indices(y[va], classes), C.label_indices(y[te], classes)
    out: dict[str, Any] = {
        "classes": [c.item() if hasattr(c, "item") else c for c in classes],
        "fit_seconds": fit_s,
        "n_cal": len(va),
        "n_test": len(te),
        "n_test_unseen_label": n_te - len(te),
        "accuracy": float(np.mean(np.argmax(p_te, 1) == y_te)),
        "ece_raw": C.ece(p_te, y_te),
        "nll_raw": C.nll(p_te, y_te),
    }
    for method in ("lac", "aps"):
        cal = C.calibrate_classifier(p_va, y_va, ALPHA, method)
        mask = cal.sets(p_te)
        out["temperature"] = cal.temperature
        out[method] = {
            "qhat": cal.qhat,
            "set_coverage": C.set_coverage(mask, y_te),
            "mean_set_size": C.mean_set_size(mask),
            "singleton_fraction": float(np.mean(mask.sum(1) == 1)),
        }
    lac = C.calibrate_classifier(p_va, y_va, ALPHA, "lac")
    p_cal = lac.probabilities(p_te)
    if meas:
        matrix = linear_matrix(cfg.features, cfg.prep)
        x_m = np.vstack(list(meas.values())).astype(np.float64) @ matrix
        p_m = lac.probabilities(est.predict_proba(x_m))
        sets = lac.sets(est.predict_proba(x_m))
        out["measured"] = {
            n: {
                "value": out["classes"][int(np.argmax(p_m[i]))],
                "p": round(float(p_m[i].max()), 3),
                "set": [out["classes"][k] for k in np.flatnonzero(sets[i])],
            }
            for i, n in enumerate(meas)
        }
    out["ece_calibrated"] = C.ece(p_cal, y_te)
    out["ece_calibrated_bootstrap_std"] = _ece_std(p_cal, y_te)
    out["nll_calibrated"] = C.nll(p_cal, y_te)
    # what a bundle serves: the model refitted on train+val, with the calibration above
    rows = np.concatenate([tr, va])
    w = np.nanmax(sub.cn_vector[rows], axis=1) if weight is not None else None
    refit = make_estimator(kind, params, cfg, name).fit(X[rows], y[rows], sample_weight=w)
    if list(refit.classes_) == classes:
        p_ref = refit.predict_proba(X[te])
        mask = lac.sets(p_ref)
        out["refit_train_val"] = {
            "accuracy": float(np.mean(np.argmax(p_ref, 1) == y_te)),
            "ece_raw": C.ece(p_ref, y_te),
            "ece_calibrated": C.ece(lac.probabilities(p_ref), y_te),
            "lac_set_coverage": C.set_coverage(mask, y_te),
            "lac_mean_set_size": C.mean_set_size(mask),
        }

        # calibrated instead on out-of-fold probabilities of all train+val rows (5 folds)
        def fit_predict(fit_rows: np.ndarray, held: np.ndarray) -> np.ndarray:
            r = rows[fit_rows]
            wf = w[fit_rows] if w is not None else None
            e = make_estimator(kind, params, cfg, name).fit(X[r], y[r], sample_weight=wf)
            return C.align_columns(e.predict_proba(X[rows[held]]), list(e.classes_), classes)

        oof = C.cross_fit(
            fit_predict, split_keys(sub, cfg.split_by)[rows], n_splits=5, seed=cfg.seed
        )
        cf = C.calibrate_classifier(oof, C.label_indices(y[rows], classes), ALPHA, "lac")
        mask = cf.sets(p_ref)
        y_rows = C.label_indices(y[rows], classes)
        cf_ece = C.calibrate_classifier(oof, y_rows, ALPHA, "lac", objective="ece")
        out["cross_fit_train_val"] = {
            "temperature": cf.temperature,
            "qhat": cf.qhat,
            "ece_calibrated": C.ece(cf.probabilities(p_ref), y_te),
            "ece_calibrated_bootstrap_std": _ece_std(cf.probabilities(p_ref), y_te),
            "lac_set_coverage": C.set_coverage(mask, y_te),
            "lac_mean_set_size": C.mean_set_size(mask),
            "ece_objective": {
                "temperature": cf_ece.temperature,
                "ece_calibrated": C.ece(cf_ece.probabilities(p_ref), y_te),
                "lac_set_coverage": C.set_coverage(cf_ece.sets(p_ref), y_te),
                "lac_mean_set_size": C.mean_set_size(cf_ece.sets(p_ref)),
            },
        }
    return out


def regressor_figures(
    name: str, data: dict[str, Any], cfg: TrainConfig, params: dict[str, Any]
) -> dict[str, Any]:
    """Interval coverage and width: absolute residuals vs tree-spread-normalised residuals."""
    sub, parts, X = data["sub"], data["parts"], data["X"]
    kind, y, valid = task_targets(sub, np.arange(len(sub)))[name]
    tr, va, te = (parts[k][valid[parts[k]]] for k in ("train", "val", "test"))
    est = make_estimator(kind, params, cfg, name).fit(X[tr], y[tr])

    def pred_spread(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_tree = np.stack([t.predict(X[rows]) for t in est.estimators_])
        return per_tree.mean(0), per_tree.std(0)

    (m_va, s_va), (m_te, s_te) = pred_spread(va), pred_spread(te)
    out: dict[str, Any] = {
        "n_cal": len(va),
        "n_test": len(te),
        "mae": float(np.mean(np.abs(m_te - y[te]))),
    }
    variants = (
        ("absolute", None, None, None),
        ("tree_spread", s_va, s_te, None),
        ("tree_spread_offset_median", s_va, s_te, float(np.median(s_va))),
    )
    for label, scale_va, scale_te, offset in variants:
        cal = C.calibrate_regressor(m_va, y[va], ALPHA, scale_va, offset)
        lo, hi = cal.interval(m_te, scale_te)
        width = hi - lo
        out[label] = {
            **cal.spec(),
            "interval_coverage": C.interval_coverage(lo, hi, y[te]),
            "mean_width": float(width.mean()),
            "median_width": float(np.median(width)),
        }
    # what a bundle serves: refitted on train+val, with the absolute threshold fitted above
    refit = make_estimator(kind, params, cfg, name).fit(
        X[np.concatenate([tr, va])], y[np.concatenate([tr, va])]
    )
    cal = C.calibrate_regressor(m_va, y[va], ALPHA)
    pred = refit.predict(X[te])
    lo, hi = cal.interval(pred)
    out["refit_train_val"] = {
        "mae": float(np.mean(np.abs(pred - y[te]))),
        "absolute_interval_coverage": C.interval_coverage(lo, hi, y[te]),
    }
    rows = np.concatenate([tr, va])

    def fit_predict(fit_rows: np.ndarray, held: np.ndarray) -> np.ndarray:
        e = make_estimator(kind, params, cfg, name).fit(X[rows[fit_rows]], y[rows[fit_rows]])
        return e.predict(X[rows[held]])

    oof = C.cross_fit(fit_predict, split_keys(sub, cfg.split_by)[rows], n_splits=5, seed=cfg.seed)
    cf = C.calibrate_regressor(oof, y[rows], ALPHA)
    lo, hi = cf.interval(pred)
    out["cross_fit_train_val"] = {
        "qhat": cf.qhat,
        "absolute_interval_coverage": C.interval_coverage(lo, hi, y[te]),
        "mean_width": float(np.mean(hi - lo)),
    }
    return out


def main() -> int:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--skip-models", action="store_true", help="OOD only")
    args = ap.parse_args()
    if not paths.cu_feff_archive().exists():
        print(f"shared Cu FEFF data not found at {paths.cu_feff_archive()}", file=sys.stderr)
        return 2
    cfg = TrainConfig()
    t0 = time.perf_counter()
    data = load_data(cfg)
    meas = measured_inputs(cfg)
    grid = cfg.prep.grid
    report: dict[str, Any] = {
        "host": platform.node(),
        "n_rows": {k: len(v) for k, v in data["parts"].items()},
        "alpha": ALPHA,
        "calibration_runtime": runtime_cost(),
        "ood_chosen": chosen_ood(data, meas, grid, other_element_inputs(cfg)),
        "ood_candidates": ood_candidates(data, meas, grid),
    }
    print(json.dumps(report["ood_chosen"], indent=1))
    if not args.skip_models:
        report["tasks"] = {}
        for name in ("cn", "valence"):
            report["tasks"][name] = classifier_figures(
                name, data, cfg, cfg.grid["classifier"][0], meas
            )
            print(name, json.dumps(report["tasks"][name]))
        for name in ("distance", "charge"):
            report["tasks"][name] = regressor_figures(name, data, cfg, cfg.grid["regressor"][0])
            print(name, json.dumps(report["tasks"][name]))
    report["seconds"] = time.perf_counter() - t0
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
