"""Benchmark: multi-task network ensembles (MLP, CNN) on the Cu FEFF data against the forests.

Builds the Cu dataset (label cache reused when warm), grids it, splits it by material and forms
the targets exactly as ``xasflow.training.fit.train`` does, trains a deep ensemble per
architecture on the train rows (early stopping on the validation rows), and scores on the test
rows with ``fit.evaluate_task``: one network (member 0), the ensemble mean, and, as the baseline,
the forest candidate's test metrics recorded in the shipped bundle ``models/cu-k/manifest.json``
(same split salt and fractions). Also times each ensemble's training and its ONNX graph (onnxruntime, 1 thread) per
spectrum and per batch of 64, and checks ONNX against torch on the test split.

    nice -n 10 .venv/bin/python bench/nn.py --json bench/results/nn.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from xasflow import paths
from xasflow.spectra import model_input
from xasflow.training.dataset import build_feff_dataset, grid_dataset
from xasflow.training.fit import TASKS, TrainConfig, evaluate_task, task_targets
from xasflow.training.nn import (
    NetConfig,
    NetworkEnsemble,
    fit_network_ensemble,
    targets_from_tuples,
)
from xasflow.training.select import FOREST
from xasflow.training.split import split_dataset

KEYS = ("accuracy", "top1_accuracy", "jaccard", "mae", "r2", "baseline_accuracy", "baseline_mae")
SHIPPED = paths.REPO_ROOT / "models" / "cu-k" / "manifest.json"


def _point(task: str, kind: str, pred: np.ndarray, classes: list | None) -> np.ndarray:
    """Class labels from probabilities; values otherwise."""
    if kind == "classifier":
        return np.asarray(classes, dtype=object)[np.argmax(pred, axis=1)]
    return pred


def _score(
    preds: dict[str, np.ndarray], ens: NetworkEnsemble, tuples: dict, parts: dict
) -> dict[str, dict[str, float]]:
    """Test-split metrics per task, as ``fit.train`` computes them for the forests."""
    out: dict[str, dict[str, float]] = {}
    for task, (kind, y, valid) in tuples.items():
        te = parts["test"][valid[parts["test"]]]
        fit_rows = np.concatenate([parts["train"], parts["val"]])
        fit_rows = fit_rows[valid[fit_rows]]
        pred = _point(task, kind, preds[task][te], ens.tasks[task].classes)
        if kind == "classifier":
            pred = pred.astype(np.asarray(y).dtype)
        m = evaluate_task(task, kind, pred, y[te], y[fit_rows])
        out[task] = {k: round(float(m[k]), 4) for k in KEYS if k in m}
    return out


def _latency(session: ort.InferenceSession, x: np.ndarray, batch: int, repeats: int) -> float:
    """Median milliseconds of one ``session.run`` on ``batch`` rows."""
    rows = [x[(i * batch) % len(x) :][:batch] for i in range(repeats)]
    rows = [r if len(r) == batch else x[:batch] for r in rows]
    for r in rows[:10]:
        session.run(None, {"x": r})
    times = []
    for r in rows:
        t0 = time.perf_counter()
        session.run(None, {"x": r})
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 4)


def _run_arch(
    arch: str, x: np.ndarray, tuples: dict, targets: dict, parts: dict, args: argparse.Namespace
) -> dict[str, Any]:
    cfg = NetConfig(arch=arch, members=args.members, threads=args.threads, seed=args.seed)
    t0 = time.perf_counter()
    ens = fit_network_ensemble(x, targets, parts["train"], parts["val"], cfg)
    seconds = time.perf_counter() - t0
    members = ens.predict_members(x)
    mean = ens.predict(x)
    graph = ens.to_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    xt = x[parts["test"]]
    got = dict(zip(names, session.run(None, {"x": xt}), strict=True))
    parity = max(
        float(np.max(np.abs(got[t].reshape(v[parts["test"]].shape) - v[parts["test"]])))
        for t, v in mean.items()
    )
    return {
        "config": json.loads(cfg.model_dump_json()),
        "train_seconds": round(seconds, 1),
        "member_seconds": [m["seconds"] for m in ens.members_info],
        "member_epochs": [m["epochs"] for m in ens.members_info],
        "member_snapshots": [m["snapshots"] for m in ens.members_info],
        "best_epochs": [m["best_epoch"] for m in ens.members_info],
        "single": _score({t: v[0] for t, v in members.items()}, ens, tuples, parts),
        "ensemble": _score(mean, ens, tuples, parts),
        "onnx_bytes": len(graph),
        "onnx_gz_bytes": len(gzip.compress(graph, compresslevel=6, mtime=0)),
        "onnx_torch_max_abs_diff_test": parity,
        "onnx_p50_ms_per_spectrum": _latency(session, xt, 1, args.repeats),
        "onnx_p50_ms_batch64": _latency(session, xt, 64, max(args.repeats // 5, 20)),
        "embedding_dim": int(got["embedding"].shape[1]),
    }


def main() -> int:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(paths.cu_feff_archive()))
    ap.add_argument("--json", required=True)
    ap.add_argument("--archs", default="mlp,cnn")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=300, help="timed ONNX calls per batch size")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = build_feff_dataset(args.data, "Cu", progress=False)
    tc = TrainConfig()
    g = grid_dataset(ds, tc.prep)
    sub = ds.subset(g.rows)
    parts = split_dataset(sub, tc.split_salt, tc.test_fraction, tc.val_fraction, tc.split_by)
    x = model_input(g.y, tc.features, tc.prep)
    tuples = task_targets(sub, np.arange(len(sub)))
    tuples = {t: tuples[t] for t in TASKS}
    # as fit.train does: CN rows weighted by the dominant CrystalNN weight
    weights = {"cn": np.nan_to_num(np.nanmax(sub.cn_vector, axis=1))}
    targets = targets_from_tuples(tuples, weights)
    data_seconds = time.perf_counter() - t0

    shipped = json.loads(SHIPPED.read_text())
    report: dict[str, Any] = {
        "benchmark": "nn",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()),
        },
        "n_rows": {k: len(v) for k, v in parts.items()},
        "input_width": int(x.shape[1]),
        "rows_with_spectrum_above_5": int(np.sum(x[:, : tc.prep.n_points].max(axis=1) > 5)),
        "data_seconds": round(data_seconds, 1),
        "baseline": {
            "what": "the forest candidate's test metrics recorded in "
            f"{SHIPPED.relative_to(paths.REPO_ROOT)} (training.candidates_test, raw outputs as "
            "scored here; tasks.*.metrics are the served bundle's)",
            "bundle_id": shipped["bundle_id"],
            "tasks": {
                t: {k: round(float(v), 4) for k, v in per[FOREST].items() if k in KEYS}
                for t, per in shipped["training"]["candidates_test"].items()
                if FOREST in per
            },
        },
        "networks": {},
    }
    for arch in args.archs.split(","):
        print(f"training {args.members} x {arch} ...", flush=True)
        report["networks"][arch] = _run_arch(arch, x, tuples, targets, parts, args)
        print(json.dumps(report["networks"][arch]["ensemble"]), flush=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["targets"] = {"network_train_seconds_total": 900}
    report["network_train_seconds_total"] = round(
        sum(r["train_seconds"] for r in report["networks"].values()), 1
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
