"""Benchmark: out-of-domain candidates that use a bundle's network graph, beside its PCA score.

For a bundle that has a network ensemble graph (``mlp.onnx`` or ``cnn.onnx``), scores with
every candidate the rows of its material-grouped validation split (the threshold: the
quantile flagging 5 %), its test split (the flag rate, target <= 5 %) and the measured Cu
references of ``bench/references-cu.csv`` (metals and sulfides should be flagged, oxides
not). Candidates:

* ``recon``: the bundle's own score (PCA reconstruction error, ``ood.onnx``);
* ``cn_spread``: the summed per-class spread of the members' CN probabilities (``cn_std``);
* ``emb_recon10`` / ``emb_mahalanobis`` / ``emb_knn5``: distance of the members' mean
  ``embedding`` from the training rows' (PCA reconstruction with 10 axes, Mahalanobis,
  mean distance to the 5 nearest);
* ``max(a, b)``: two candidates, each divided by its own threshold, the larger one
  (so either flags), thresholded again at 5 % of validation.

    .venv/bin/python bench/ood_networks.py --bundle models/cu-k --json bench/results/ood-networks.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path
from typing import Any

import numpy as np
from report import write_json

from xasflow import paths
from xasflow.adapters.columns import read_spectrum_file
from xasflow.models.predictor import Predictor
from xasflow.spectra import model_input
from xasflow.training.dataset import build_feff_dataset, grid_dataset
from xasflow.training.split import bundle_split

HERE = Path(__file__).resolve().parent
FLAG = 0.05


def _threshold(val: np.ndarray) -> float:
    return float(np.quantile(val, 1 - FLAG))


def _embedding_scores(emb: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
    """Distances of ``emb`` rows from the training embeddings ``train``."""
    mu = train.mean(axis=0)
    cov = np.cov((train - mu).T) + 1e-3 * np.eye(train.shape[1])
    inv = np.linalg.inv(cov)
    c = emb - mu
    _, _, vt = np.linalg.svd(train - mu, full_matrices=False)
    v = vt[:10]
    knn = []
    for start in range(0, len(emb), 256):
        d = ((emb[start : start + 256, None, :] - train[None]) ** 2).sum(-1)
        knn.append(np.sort(d, axis=1)[:, :5].mean(axis=1))
    return {
        "emb_recon10": ((c - (c @ v.T) @ v) ** 2).sum(axis=1),
        "emb_mahalanobis": np.einsum("ij,jk,ik->i", c, inv, c),
        "emb_knn5": np.concatenate(knn),
    }


def main() -> int:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(paths.REPO_ROOT / "models" / "cu-k"))
    ap.add_argument("--data", default=str(paths.cu_feff_archive()))
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    predictor = Predictor(args.bundle, all_outputs=True)  # the spread and embedding too
    m = predictor.manifest
    net = next((f for f in ("mlp.onnx", "cnn.onnx") if f in m.graph_files()), None)
    if net is None:
        raise SystemExit(f"{args.bundle} serves no network graph")
    ds = build_feff_dataset(args.data, m.element, progress=False)
    g = grid_dataset(ds, m.prep)
    sub = ds.subset(g.rows)
    t = m.training
    parts = bundle_split(sub, t)
    x = model_input(g.y, m.features, m.prep)
    names, xs, should = [], [], []
    with open(HERE / "references-cu.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            path = paths.shared_data_dir() / row["file"]
            if path.exists():
                prep = predictor.prepare(read_spectrum_file(path, element="Cu"))
                xs.append(model_input(prep.y, m.features, m.prep)[0])
                names.append(path.stem)
                should.append(row["out_of_domain"] == "true")
    rx = np.asarray(xs, dtype=np.float32)

    def outputs(rows: np.ndarray) -> dict[str, np.ndarray]:
        raw = predictor.run(rows)
        return {
            "recon": raw[m.ood.file][m.ood.output] if m.ood else np.zeros(len(rows)),
            "cn_spread": raw[net]["cn_std"].sum(axis=1),
            "embedding": raw[net]["embedding"],
        }

    data, refs = outputs(x), outputs(rx)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {
        k: (data[k], refs[k]) for k in ("recon", "cn_spread")
    }
    train_emb = data["embedding"][parts["train"]]
    emb_data = _embedding_scores(data["embedding"], train_emb)
    emb_refs = _embedding_scores(refs["embedding"], train_emb)
    scores.update({k: (emb_data[k], emb_refs[k]) for k in emb_data})
    for a, b in itertools.combinations(["recon", "cn_spread", "emb_recon10"], 2):
        ta, tb = _threshold(scores[a][0][parts["val"]]), _threshold(scores[b][0][parts["val"]])
        scores[f"max({a}, {b})"] = (
            np.maximum(scores[a][0] / ta, scores[b][0] / tb),
            np.maximum(scores[a][1] / ta, scores[b][1] / tb),
        )
    report: dict[str, Any] = {"benchmark": "ood_networks", "bundle": m.bundle_id, "network": net}
    cands: dict[str, Any] = {}
    for name, (all_rows, ref) in scores.items():
        thr = _threshold(all_rows[parts["val"]])
        flags = ref > thr
        cands[name] = {
            "val_flagged": float(np.mean(all_rows[parts["val"]] > thr)),
            "test_flagged": float(np.mean(all_rows[parts["test"]] > thr)),
            "references_right": int(np.sum(flags == np.asarray(should))),
            "references": {n: round(float(s / thr), 3) for n, s in zip(names, ref, strict=True)},
        }
        print(
            f"{name:32s} test {cands[name]['test_flagged']:.3f} right "
            f"{cands[name]['references_right']}/{len(names)}  "
            + " ".join(f"{n[:10]}:{v:.2f}" for n, v in cands[name]["references"].items())
        )
    report["candidates"] = cands
    report["n_references"] = len(names)
    report["note"] = "reference values are score / threshold: above 1 is flagged"
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
