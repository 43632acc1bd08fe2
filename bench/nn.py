"""Benchmark: multi-task network ensembles (MLP, CNN) on the Cu FEFF data against the forests.

Builds the Cu dataset (label cache reused when warm), grids it, splits it by material and forms
the targets exactly as ``xasflow.training.fit.train`` does, trains a deep ensemble per
architecture on the train rows (early stopping on the validation rows), and scores on the test
rows with ``fit.evaluate_task``: one network (member 0), the ensemble mean, and, as the baseline,
the forest candidate's test metrics recorded in the shipped bundle ``models/cu-k/manifest.json``
(same split salt and fractions). Also times each ensemble's training and its ONNX graph
(onnxruntime, 1 thread) per spectrum and per batch of 64, and checks ONNX against torch on the
test split. The networks are configured as ``xasflow train`` configures them (threads,
augmentation; ``--no-augment`` to leave it off).

``--devices cpu,cuda`` trains every architecture on each device in one run, so a GPU's time
sits beside the CPU baseline of the same machine. A machine without the labelling stack (no
pymatgen) trains from inputs saved here with ``--save-inputs``:

    nice -n 10 .venv/bin/python bench/nn.py --json bench/results/nn.json
    .venv/bin/python bench/nn.py --save-inputs out/nn-inputs.npz
    python bench/nn.py --inputs out/nn-inputs.npz --devices cuda,cpu --json nn-gpu.json
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
from report import write_report

from xasflow import paths
from xasflow.training.nn import (
    NetConfig,
    NetworkEnsemble,
    fit_network_ensemble,
    resolve_device,
    targets_from_tuples,
)
from xasflow.training.nn_augment import NetAugment
from xasflow.training.scoring import evaluate_task

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
    arch: str, device: str, inputs: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    x, tuples, parts = inputs["x"], inputs["tuples"], inputs["parts"]
    targets = targets_from_tuples(tuples, inputs["weights"])
    augment = NetAugment() if args.no_augment else NetAugment(**inputs["augment"])
    cfg = NetConfig(
        arch=arch, members=args.members, threads=args.threads, seed=args.seed, augment=augment
    )
    t0 = time.perf_counter()
    ens = fit_network_ensemble(
        x, targets, parts["train"], parts["val"], cfg, grid=inputs["grid"], device=device
    )
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
        "device": ens.members_info[0]["device"],
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


def _plain_labels(y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """An object label column as a plain numpy dtype (invalid rows take a valid row's label),
    so the saved inputs load without pickle."""
    y = np.asarray(y)
    if y.dtype != object:
        return y
    fill = y[np.flatnonzero(valid)[0]]
    return np.array([v if ok else fill for v, ok in zip(y, valid, strict=True)])


def _prepare(data: str) -> dict[str, Any]:
    """The Cu inputs exactly as ``fit.train`` forms them (needs the labelling stack)."""
    from xasflow.spectra import model_input
    from xasflow.training.dataset import build_feff_dataset, grid_dataset
    from xasflow.training.fit import TASKS, TrainConfig, task_targets
    from xasflow.training.split import split_dataset

    ds = build_feff_dataset(data, "Cu", progress=False)
    tc = TrainConfig()
    g = grid_dataset(ds, tc.prep)
    sub = ds.subset(g.rows)
    parts = split_dataset(sub, tc.split_salt, tc.test_fraction, tc.val_fraction, tc.split_by)
    tuples = task_targets(sub, np.arange(len(sub)))
    return {
        "x": model_input(g.y, tc.features, tc.prep),
        "grid": np.asarray(tc.prep.grid),
        "n_points": tc.prep.n_points,
        "parts": {k: np.asarray(v) for k, v in parts.items()},
        "tuples": {t: tuples[t] for t in TASKS},
        # as fit.train does: CN rows weighted by the dominant CrystalNN weight
        "weights": {"cn": np.nan_to_num(np.nanmax(sub.cn_vector, axis=1))},
        "augment": tc.network_augment.model_dump(),
        "threads": tc.network_threads,
    }


def _save_inputs(inputs: dict[str, Any], path: Path) -> None:
    arrays: dict[str, np.ndarray] = {"x": inputs["x"], "grid": inputs["grid"]}
    arrays.update({f"part_{k}": v for k, v in inputs["parts"].items()})
    arrays.update({f"weight_{k}": v for k, v in inputs["weights"].items()})
    kinds = {}
    for t, (kind, y, valid) in inputs["tuples"].items():
        kinds[t] = kind
        arrays[f"y_{t}"] = _plain_labels(y, valid)
        arrays[f"valid_{t}"] = np.asarray(valid, bool)
    meta = {k: inputs[k] for k in ("n_points", "augment", "threads")} | {"kinds": kinds}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def _load_inputs(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        tuples = {t: (k, z[f"y_{t}"], z[f"valid_{t}"]) for t, k in meta["kinds"].items()}
        return {
            "x": z["x"],
            "grid": z["grid"],
            "n_points": meta["n_points"],
            "parts": {k[5:]: z[k] for k in z.files if k.startswith("part_")},
            "weights": {k[7:]: z[k] for k in z.files if k.startswith("weight_")},
            "tuples": tuples,
            "augment": meta["augment"],
            "threads": meta["threads"],
        }


def _baseline() -> dict[str, Any]:
    """The forest candidate's test metrics recorded in the shipped bundle's manifest."""
    from xasflow.training.select import FOREST

    shipped = json.loads(SHIPPED.read_text())
    return {
        "what": "the forest candidate's test metrics recorded in "
        f"{SHIPPED.relative_to(paths.REPO_ROOT)} (training.candidates_test, raw outputs as "
        "scored here; tasks.*.metrics are the served bundle's)",
        "bundle_id": shipped["bundle_id"],
        "tasks": {
            t: {k: round(float(v), 4) for k, v in per[FOREST].items() if k in KEYS}
            for t, per in shipped["training"]["candidates_test"].items()
            if FOREST in per
        },
    }


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main() -> int:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(paths.cu_feff_archive()))
    ap.add_argument("--inputs", help="train from inputs saved by --save-inputs (no labelling)")
    ap.add_argument("--save-inputs", help="write the prepared inputs here and stop")
    ap.add_argument("--json")
    ap.add_argument("--archs", default="mlp,cnn")
    ap.add_argument("--devices", default="cpu", help="comma list of cpu, cuda[:N], auto")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as xasflow train)")
    ap.add_argument("--no-augment", action="store_true", help="train without augmentation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=300, help="timed ONNX calls per batch size")
    args = ap.parse_args()
    if not (args.json or args.save_inputs):
        ap.error("give --json (run the benchmark) or --save-inputs")
    devices = args.devices.split(",")
    for d in devices:
        resolve_device(d)  # an absent GPU is an error before any training, not after

    t0 = time.perf_counter()
    inputs = _load_inputs(Path(args.inputs)) if args.inputs else _prepare(args.data)
    data_seconds = time.perf_counter() - t0
    if args.save_inputs:
        _save_inputs(inputs, Path(args.save_inputs))
        print(f"inputs saved to {args.save_inputs} ({len(inputs['x'])} rows)")
        return 0
    args.threads = args.threads or inputs["threads"]
    x, parts = inputs["x"], inputs["parts"]
    report: dict[str, Any] = {
        "benchmark": "nn",
        "machine": {
            "cpus": os.cpu_count(),
            "gpu": _gpu(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()),
        },
        "n_rows": {k: len(v) for k, v in parts.items()},
        "input_width": int(x.shape[1]),
        "rows_with_spectrum_above_5": int(np.sum(x[:, : inputs["n_points"]].max(axis=1) > 5)),
        "data_seconds": round(data_seconds, 1),
        "baseline": _baseline(),
        "networks": {},
    }
    totals: dict[str, float] = {}
    for device in devices:
        totals[device] = 0.0
        for arch in args.archs.split(","):
            key = arch if devices == ["cpu"] else f"{arch}@{device}"
            print(f"training {args.members} x {arch} on {device} ...", flush=True)
            run = _run_arch(arch, device, inputs, args)
            report["networks"][key] = run
            totals[device] = round(totals[device] + run["train_seconds"], 1)
            print(json.dumps(run["ensemble"]), flush=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    # the target is for 2 CPU cores; per device, the whole ensemble of every arch
    report["targets"] = {"network_train_seconds_total": 900}
    report["network_train_seconds_total"] = totals
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
