"""Drop-region importances of a bundle as it serves them, measured on its validation split.

A region's importance is the score a task loses when that region (or a pair of regions) of
every spectrum is replaced by the training spectra's mean curve (TRIXS-style occlusion,
:func:`~xasflow.training.scoring.occlusions`). The recommender spends scan time by these
numbers, so they are measured as the bundle answers (its graphs, calibration and consistent
decode, through :func:`~xasflow.training.evaluate.predict_arrays`) and on the validation
split: the test rows only score a bundle, they never shape what it does.
"""

from __future__ import annotations

import numpy as np

from xasflow.models.predictor import Predictor
from xasflow.training.dataset import Dataset, Gridded, grid_dataset
from xasflow.training.evaluate import predict_arrays
from xasflow.training.fit import task_targets
from xasflow.training.scoring import evaluate_task, occlusions, primary_score
from xasflow.training.split import bundle_split

__all__ = ["served_region_importance"]


def served_region_importance(
    predictor: Predictor, ds: Dataset, gridded: Gridded | None = None
) -> dict[str, dict[str, float]]:
    """Per task of ``predictor``'s bundle, region (or ``"a + b"``) -> primary score lost on
    the bundle's validation split of ``ds`` (its training data; ``gridded``: ``ds`` already
    prepared with the bundle's preprocessing). Empty when the bundle has no regions or the
    data hold no validation row; a task with no labelled validation row gets none."""
    m = predictor.manifest
    if not m.regions:
        return {}
    g = gridded if gridded is not None else grid_dataset(ds, m.prep)
    sub = ds.subset(g.rows)
    parts = bundle_split(sub, m.training)
    val, train = parts["val"], parts["train"]
    if not val.size or not train.size:
        return {}
    targets = {
        name: target
        for name, target in task_targets(sub, np.arange(len(sub))).items()
        if name in m.tasks and target[2][val].any()
    }

    def scores(y: np.ndarray) -> dict[str, float]:
        point = predict_arrays(predictor, y).point
        out = {}
        for name, (kind, target, valid) in targets.items():
            keep = valid[val]
            figures = evaluate_task(
                name,
                kind,
                point[name][keep],
                target[val][keep],
                target[train][valid[train]],
                m.tasks[name].threshold,
            )
            out[name] = primary_score(name, kind, figures)
        return out

    y_val = g.y[val]
    base = scores(y_val)
    mean_curve = g.y[train].mean(axis=0)
    importance: dict[str, dict[str, float]] = {name: {} for name in targets}
    for key, occluded in occlusions(y_val, mean_curve, m.prep.grid, m.regions):
        for name, score in scores(occluded).items():
            importance[name][key] = float(base[name] - score)
    return importance
