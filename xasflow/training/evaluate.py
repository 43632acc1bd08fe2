"""Score a bundle on a dataset through its ONNX graphs, the path the daemon runs.

When the dataset is the one the bundle was trained on (same fingerprint), only the
material-grouped test split recovered from the manifest's salt is scored; any other dataset
(a reference table, a new FEFF tree) is scored whole as an external set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xasflow.models.bundle import Manifest
from xasflow.models.predictor import Predictor
from xasflow.spectra import model_input
from xasflow.training.dataset import Dataset, Gridded, grid_dataset, material_average
from xasflow.training.fit import MOTIF_NAMES, TASKS, evaluate_task, task_targets
from xasflow.training.split import split_rows


@dataclass
class Evaluation:
    """Held-out metrics plus the arrays the report plots."""

    element: str
    scope: str  # "test split" or "external"
    n_spectra: int
    n_materials: int
    tasks: dict[str, dict[str, Any]]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    truths: dict[str, np.ndarray] = field(default_factory=dict)
    material_average: dict[str, dict[str, Any]] = field(default_factory=dict)
    issues: dict[str, int] = field(default_factory=dict)

    def to_json(self, manifest: Manifest) -> dict[str, Any]:
        """The JSON written by ``xasflow evaluate --json``."""
        return {
            "element": self.element,
            "edge": manifest.edge,
            "bundle_id": manifest.bundle_id,
            "scope": self.scope,
            "n_spectra": self.n_spectra,
            "n_materials": self.n_materials,
            "tasks": self.tasks,
            "material_average": self.material_average,
            "issues": self.issues,
            "region_importance": {
                name: task.region_importance for name, task in manifest.tasks.items()
            },
        }


def predict_arrays(predictor: Predictor, y: np.ndarray, batch: int = 4096) -> dict[str, np.ndarray]:
    """Per task, the bundle's point prediction for each gridded row (label or values)."""
    m = predictor.manifest
    out: dict[str, list[np.ndarray]] = {name: [] for name in m.tasks}
    for start in range(0, len(y), batch):
        raw = predictor.run(model_input(y[start : start + batch], m.features, m.prep))
        for name, task in m.tasks.items():
            if task.kind == "classifier":
                probs = np.asarray(raw[name][1])
                out[name].append(np.asarray(task.classes)[np.argmax(probs, axis=1)])
            elif task.kind == "regressor":
                values = np.asarray(raw[name][0])
                out[name].append(values.reshape(values.shape[0], -1)[:, 0])
            else:
                values = np.asarray(raw[name][0])
                full = np.zeros((len(values), len(MOTIF_NAMES)))
                full[:, [MOTIF_NAMES.index(o) for o in task.outputs or []]] = values
                out[name].append(full)
    return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in out.items()}


def _score(
    ds: Dataset, rows: np.ndarray, train_rows: np.ndarray | None, pred: dict[str, np.ndarray]
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Metrics of ``pred`` (aligned to ``rows``) against the labels; baselines from ``train_rows``."""
    targets = task_targets(ds, np.arange(len(ds)))
    tasks: dict[str, dict[str, Any]] = {}
    preds: dict[str, np.ndarray] = {}
    truths: dict[str, np.ndarray] = {}
    for name in TASKS:
        if name not in pred:
            continue
        kind, target, valid = targets[name]
        keep = valid[rows]
        if not keep.any():
            continue
        base_rows = train_rows[valid[train_rows]] if train_rows is not None else rows[keep]
        tasks[name] = evaluate_task(
            name, kind, pred[name][keep], target[rows][keep], target[base_rows]
        )
        preds[name] = pred[name][keep]
        truths[name] = target[rows][keep]
    return tasks, preds, truths


def _merge_environment(tasks: dict[str, dict[str, Any]]) -> None:
    """Zheng's pair of figures under ``environment``: top-1 label accuracy and ranking Jaccard."""
    if "environment" in tasks and "motifs" in tasks:
        for key in ("jaccard", "baseline_jaccard"):
            tasks["environment"][key] = tasks["motifs"][key]


def evaluate_bundle(predictor: Predictor, ds: Dataset) -> Evaluation:
    """Metrics of a bundle on ``ds``: its test split when ``ds`` is the training data, else all."""
    m = predictor.manifest
    if ds.element != m.element:
        raise ValueError(f"bundle is for {m.element}, data is {ds.element}")
    g: Gridded = grid_dataset(ds, m.prep)
    if len(g.rows) == 0:
        raise ValueError("no spectrum in the data could be prepared with the bundle's window")
    sub = ds.subset(g.rows)
    same = m.training.get("fingerprint") == ds.fingerprint
    if same:
        parts = split_rows(
            sub.material_id,
            m.training.get("split_salt", ""),
            m.training.get("test_fraction", 0.2),
            m.training.get("val_fraction", 0.1),
        )
        rows, train_rows = parts["test"], np.concatenate([parts["train"], parts["val"]])
    else:
        rows, train_rows = np.arange(len(sub)), None
    pred = predict_arrays(predictor, g.y[rows])
    tasks, preds, truths = _score(sub, rows, train_rows, pred)
    _merge_environment(tasks)
    issues: dict[str, int] = {}
    for issue in [*ds.issues, *g.issues]:
        issues[issue.reason] = issues.get(issue.reason, 0) + 1
    ev = Evaluation(
        element=ds.element,
        scope="test split" if same else "external",
        n_spectra=len(rows),
        n_materials=int(np.unique(sub.material_id[rows]).size),
        tasks=tasks,
        predictions=preds,
        truths=truths,
        issues=issues,
    )
    if same:
        # what an experiment measures: the site average of a whole material
        test_g = Gridded(g.y[rows], g.e0[rows], g.rows[rows], [])
        avg_y, avg_ds = material_average(ds, test_g)
        if len(avg_ds):
            avg_pred = predict_arrays(predictor, avg_y)
            base = ds.subset(g.rows[train_rows])
            joined = _concat(avg_ds, base)
            ev.material_average, _, _ = _score(
                joined, np.arange(len(avg_ds)), np.arange(len(avg_ds), len(joined)), avg_pred
            )
            _merge_environment(ev.material_average)
            for metrics in ev.material_average.values():
                metrics["n_materials"] = len(avg_ds)
    return ev


def _concat(a: Dataset, b: Dataset) -> Dataset:
    """Rows of ``a`` then ``b`` (label arrays only; spectra lists joined)."""
    return Dataset(
        element=a.element,
        edge=a.edge,
        source=a.source,
        fingerprint=a.fingerprint,
        material_id=np.concatenate([a.material_id, b.material_id]),
        site_index=np.concatenate([a.site_index, b.site_index]),
        multiplicity=np.concatenate([a.multiplicity, b.multiplicity]),
        complete=np.concatenate([a.complete, b.complete]),
        spectra=[*a.spectra, *b.spectra],
        cn_vector=np.vstack([a.cn_vector, b.cn_vector]),
        motif_vector=np.vstack([a.motif_vector, b.motif_vector]),
        distance=np.concatenate([a.distance, b.distance]),
        valence=np.concatenate([a.valence, b.valence]),
        bvs=np.concatenate([a.bvs, b.bvs]),
    )
