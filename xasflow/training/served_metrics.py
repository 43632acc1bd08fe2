"""Rescore a bundle's manifest metrics as the bundle serves them (its test split, as evaluated).

A manifest reports its bundle's test-split figures measured through the bundle's own graphs
and decoder, the path ``xasflow evaluate`` and the daemon run.

Training scores each candidate on its raw outputs, task by task. The served bundle answers
after calibration, after the CN-consistent decode of the CN-motif label and the motif ranking
(:func:`~xasflow.models.batch.make_consistent`) and, once quantised, through int8 graphs. On
the shipped Cu bundle the motif ranking's top label scored 0.626 raw and 0.690 served, and the
CN-motif label 0.703 raw and 0.690 served; the dashboard and ``/health`` showed the raw ones.
Every step that writes a bundle's graphs (:func:`~xasflow.training.bundle_export.export_bundle`,
:func:`~xasflow.training.quantize.quantize_bundle`) scores the draft before sealing it, and
``python -m xasflow.training.served_metrics BUNDLE`` rescores an existing one in place.
The candidates' own figures stay in ``tasks.*.selection`` (validation) and the training log.
The drop-region importances the recommender spends scan time by are measured on the same
draft, on the validation split (:mod:`~xasflow.training.served_importance`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from xasflow.models.bundle import Manifest
from xasflow.models.bundle_write import write_bundle
from xasflow.models.predictor import Predictor
from xasflow.training.dataset import Dataset, Gridded, grid_dataset
from xasflow.training.evaluate import NoTestRows, evaluate_bundle, training_baselines
from xasflow.training.rebuild import open_for_rewrite, rewrite_main, training_data
from xasflow.training.served_importance import served_region_importance

__all__ = [
    "IMPORTANCE_NOTE",
    "METRICS_NOTE",
    "rescore_bundle",
    "served_metrics",
    "with_served_metrics",
]

#: ``training.metrics`` of a bundle whose ``tasks.*.metrics`` were measured as served.
METRICS_NOTE = (
    "tasks.*.metrics: the bundle as served (its graphs, calibration and consistent decode), "
    "on the test split, as xasflow evaluate scores it"
)
#: ``training.region_importance`` of a bundle whose importances were measured as served.
IMPORTANCE_NOTE = (
    "tasks.*.region_importance: primary score lost on the validation split when a region "
    "(or pair) is replaced by the training mean curve, through the bundle as served"
)


def served_metrics(
    bundle: str | Path, ds: Dataset, gridded: Gridded | None = None
) -> dict[str, dict[str, float]]:
    """Per task the finite numeric figures ``xasflow evaluate`` gives ``bundle`` on ``ds``'s
    test split (tables such as the confusion matrix are left to ``evaluate``; a task with no
    labelled test row has none). Raises :class:`NoTestRows` when ``ds`` holds no row of the
    bundle's test split, or the split cannot be recovered (no salt, other data).
    ``gridded``: ``ds`` already prepared with the bundle's preprocessing."""
    return _figures(Predictor(bundle), ds, gridded)


def _figures(predictor: Predictor, ds: Dataset, g: Gridded | None) -> dict[str, dict[str, float]]:
    ev = evaluate_bundle(predictor, ds, g)
    if ev.scope != "test split":
        raise NoTestRows(f"the data are scored as {ev.scope!r}, not the bundle's test split")
    return {
        name: {
            key: float(value)
            for key, value in figures.items()
            if isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        }
        for name, figures in ev.tasks.items()
    }


def with_served_metrics(
    manifest: Manifest,
    files: dict[str, bytes],
    ds: Dataset,
    log: Callable[[str], None] = print,
) -> Manifest:
    """``manifest`` with each task's metrics measured on the bundle ``manifest`` + ``files``
    would be (a verified draft, scored on ``ds``; a task evaluate cannot score has none), its
    drop-region importances measured through the same draft on the validation split
    (:mod:`~xasflow.training.served_importance`), and the trivial answers of its training
    rows (``training.baselines``: the baselines of data scored without them, such as
    measured references).
    Where ``ds`` holds no test row of the bundle's split, metrics and importances stay, and
    ``training.metrics`` says they were not measured as served, and why."""
    g = grid_dataset(ds, manifest.prep)  # once for the three passes below
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor(write_bundle(Path(tmp) / "draft", manifest, files))
        try:
            metrics = _figures(predictor, ds, g)
        except NoTestRows as exc:
            log(f"metrics not measured as served: {exc}")
            note = f"tasks.*.metrics: not measured as served ({exc})"
            return manifest.model_copy(update={"training": {**manifest.training, "metrics": note}})
        importance = served_region_importance(predictor, ds, g)
    tasks = {
        name: spec.model_copy(
            update={
                "metrics": metrics.get(name, {}),
                "region_importance": importance.get(name, spec.region_importance),
            }
        )
        for name, spec in manifest.tasks.items()
    }
    training = {
        **manifest.training,
        "metrics": METRICS_NOTE,
        "region_importance": IMPORTANCE_NOTE,
        "baselines": training_baselines(manifest, ds, g),
    }
    return manifest.model_copy(update={"tasks": tasks, "training": training})


def rescore_bundle(
    bundle: str | Path,
    out: str | Path | None = None,
    data: str | Path | None = None,
    signing_key: str | bytes | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``bundle`` (to ``out``, default: in place) with its metrics measured as served,
    on its training data (``data``, default ``training.source``; the fingerprint must match)."""
    path, manifest = open_for_rewrite(bundle, signing_key, "rescoring")
    ds = training_data(manifest, data)
    files = {name: (path / name).read_bytes() for name in manifest.files}
    rescored = with_served_metrics(manifest, files, ds, log)
    quantised = rescored.training.get("quantization")
    measured = rescored.training.get("metrics") == METRICS_NOTE
    if measured and isinstance(quantised, dict) and "metrics" in quantised:
        # quantize's own note from before this module: "the float graphs'" figures
        quantised = {k: v for k, v in quantised.items() if k != "metrics"}
        training = {**rescored.training, "quantization": quantised}
        rescored = rescored.model_copy(update={"training": training})
    for name, spec in rescored.tasks.items():
        before = manifest.tasks[name].metrics
        changed = {k for k in {*spec.metrics, *before} if before.get(k) != spec.metrics.get(k)}
        moved = (
            max(
                (abs(v - manifest.tasks[name].region_importance.get(k, 0.0)))
                for k, v in spec.region_importance.items()
            )
            if spec.region_importance
            else 0.0
        )
        log(
            f"{name}: {len(changed)} of {len(spec.metrics)} figures changed;"
            f" region importances moved by up to {moved:.3f}"
        )
    return write_bundle(path if out is None else out, rescored, files, signing_key=signing_key)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: rescore one bundle directory."""
    return rewrite_main(rescore_bundle, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
