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
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from xasflow.models.bundle import Manifest, write_bundle
from xasflow.models.predictor import Predictor
from xasflow.training.dataset import Dataset
from xasflow.training.evaluate import NoTestRows, evaluate_bundle, training_baselines
from xasflow.training.rebuild import open_for_rewrite, rewrite_main, training_data

__all__ = ["METRICS_NOTE", "rescore_bundle", "served_metrics", "with_served_metrics"]

#: ``training.metrics`` of a bundle whose ``tasks.*.metrics`` were measured as served.
METRICS_NOTE = (
    "tasks.*.metrics: the bundle as served (its graphs, calibration and consistent decode), "
    "on the test split, as xasflow evaluate scores it"
)


def served_metrics(bundle: str | Path, ds: Dataset) -> dict[str, dict[str, float]]:
    """Per task the finite numeric figures ``xasflow evaluate`` gives ``bundle`` on ``ds``'s
    test split (tables such as the confusion matrix are left to ``evaluate``; a task with no
    labelled test row has none). Raises :class:`NoTestRows` when ``ds`` holds no row of the
    bundle's test split, or the split cannot be recovered (no salt, other data)."""
    ev = evaluate_bundle(Predictor(bundle), ds)
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
    would be (a verified draft, scored on ``ds``; a task evaluate cannot score has none), and
    the trivial answers of its training rows (``training.baselines``: the baselines of data
    scored without them, such as measured references).
    Where ``ds`` holds no test row of the bundle's split the metrics stay, and
    ``training.metrics`` says they were not measured as served, and why."""
    with tempfile.TemporaryDirectory() as tmp:
        draft = write_bundle(Path(tmp) / "draft", manifest, files)
        try:
            metrics = served_metrics(draft, ds)
        except NoTestRows as exc:
            log(f"metrics not measured as served: {exc}")
            note = f"tasks.*.metrics: not measured as served ({exc})"
            return manifest.model_copy(update={"training": {**manifest.training, "metrics": note}})
    tasks = {
        name: spec.model_copy(update={"metrics": metrics.get(name, {})})
        for name, spec in manifest.tasks.items()
    }
    training = {
        **manifest.training,
        "metrics": METRICS_NOTE,
        "baselines": training_baselines(manifest, ds),
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
        log(f"{name}: {len(changed)} of {len(spec.metrics)} figures changed")
    return write_bundle(path if out is None else out, rescored, files, signing_key=signing_key)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: rescore one bundle directory."""
    return rewrite_main(rescore_bundle, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
