"""Score a bundle on a dataset through its ONNX graphs, the path the daemon runs.

When the dataset is computed (the training tree, a repack of it, a grown tree, Materials
Project documents), only the rows the bundle's split recovered from the manifest's salt and
grouping puts in test are scored; measured references are scored whole as an external set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xasflow.adapters.feff import ReadIssue
from xasflow.models.batch import TaskArrays
from xasflow.models.bundle import Manifest
from xasflow.models.predictor import Predictor
from xasflow.models.views import stack_views
from xasflow.spectra import model_input
from xasflow.training import calibrate as C
from xasflow.training import labels as L
from xasflow.training.dataset import Dataset, Gridded, grid_dataset, material_average
from xasflow.training.fit import TASKS, task_targets
from xasflow.training.scoring import MOTIF_NAMES, evaluate_task, trivial_answers
from xasflow.training.split import bundle_split


@dataclass
class Evaluation:
    """Held-out metrics plus the arrays the report plots."""

    element: str
    scope: str  # "test split", "test-split materials" (other data, same split) or "external"
    n_spectra: int
    n_materials: int
    tasks: dict[str, dict[str, Any]]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    truths: dict[str, np.ndarray] = field(default_factory=dict)
    material_average: dict[str, dict[str, Any]] = field(default_factory=dict)
    issues: dict[str, int] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    #: spectra the bundle's preparation refused, each with its reason (``issues`` counts them)
    unprepared: list[ReadIssue] = field(default_factory=list)

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
            "ood": self.ood,
            "region_importance": {
                name: task.region_importance for name, task in manifest.tasks.items()
            },
        }


class NoTestRows(ValueError):
    """The data hold no row the bundle's recorded split puts in test (or none prepares)."""


#: What a blank answer (no CN-motif label of the CN answered) is scored as: never the truth.
NO_ANSWER = "(no motif of that CN)"
#: A site whose dominant CN holds less than this share of CrystalNN's weight has a label two
#: CNs share (a Jahn-Teller 4 + 2, a 5 against a 6): its "dominant CN" is nearly a coin toss.
AMBIGUOUS_BELOW = 0.6


@dataclass
class BatchAnswers:
    """A bundle's answers for many gridded spectra: point predictions, the decoded tasks (with
    probabilities, sets and intervals) and the out-of-domain scores."""

    point: dict[str, np.ndarray]
    tasks: dict[str, TaskArrays]
    ood: np.ndarray | None
    #: per multi-output task, the rows served no top label (no motif of the CN answered)
    no_top: dict[str, np.ndarray] = field(default_factory=dict)


def predict_arrays(
    predictor: Predictor,
    y: np.ndarray,
    batch: int = 4096,
    alternates: Sequence[tuple[np.ndarray, ...]] | None = None,
) -> BatchAnswers:
    """Run a bundle, as the daemon does, over gridded rows ``y``; ``alternates``: each row's
    grids on its edge's rival rises (``Gridded.alternates``), joined as the daemon joins them."""
    m = predictor.manifest
    parts: list[tuple[dict[str, TaskArrays], np.ndarray | None]] = []
    for start in range(0, len(y), batch):
        rows = y[start : start + batch]
        if not alternates:
            parts.append(predictor.infer(model_input(rows, m.features, m.prep)))
            continue
        views, counts = stack_views(rows, alternates[start : start + batch])
        parts.append(predictor.infer(model_input(views, m.features, m.prep), counts))
    tasks = {name: _concat_arrays([p[0][name] for p in parts]) for name in m.tasks}
    point: dict[str, np.ndarray] = {}
    no_top: dict[str, np.ndarray] = {}
    for name, arr in tasks.items():
        if arr.spec.kind == "multi_regressor":
            full = np.zeros((len(arr.values), len(MOTIF_NAMES)))
            full[:, [MOTIF_NAMES.index(o) for o in arr.spec.outputs or []]] = arr.values
            _lift_lead(full, arr.lead, arr.spec.outputs or [], arr.spec.threshold)
            point[name] = full
            if arr.blank is not None:
                no_top[name] = arr.blank
        else:
            point[name] = arr.point()
            if arr.blank is not None and arr.blank.any():  # scored as a miss, sortable
                point[name][arr.blank] = NO_ANSWER
    oods = [p[1] for p in parts if p[1] is not None]
    return BatchAnswers(point, tasks, np.concatenate(oods) if oods else None, no_top)


def _lift_lead(
    scores: np.ndarray, lead: list[str | None] | None, outputs: list[str], threshold: float | None
) -> None:
    """Score the motif ranking the daemon serves: its head is the CN-consistent label
    (``make_consistent``), in the ranking even below the threshold, so that label is raised
    just above the row's best (and the threshold) before the metrics threshold the scores."""
    if lead is None:
        return
    floor = threshold if threshold is not None else -np.inf
    for i, label in enumerate(lead):
        if label is not None and label in outputs:
            k = MOTIF_NAMES.index(label)
            scores[i, k] = np.nextafter(max(float(scores[i].max()), floor), np.inf)


def _concat_arrays(chunks: list[TaskArrays]) -> TaskArrays:
    """Batches of one task joined row-wise."""

    def cat(name: str) -> Any:
        vals = [getattr(c, name) for c in chunks]
        return None if any(v is None for v in vals) else np.concatenate(vals)

    leads = [c.lead for c in chunks]

    return TaskArrays(
        chunks[0].spec,
        values=cat("values"),
        index=cat("index"),
        probabilities=cat("probabilities"),
        sets=cat("sets"),
        interval=cat("interval"),
        std=cat("std"),
        blank=cat("blank"),
        lead=None if any(x is None for x in leads) else [x for ls in leads for x in ls or []],
    )


def uncertainty_metrics(
    answers: BatchAnswers, targets: dict[str, np.ndarray], valid: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per task ECE, conformal set coverage and size, or interval coverage and width."""
    out: dict[str, dict[str, float]] = {}
    for name, arr in answers.tasks.items():
        if name not in targets:
            continue
        keep = valid[name]
        if not keep.any():  # no labelled row: nothing to measure (as _score skips the task)
            continue
        truth = targets[name][keep]
        entry: dict[str, float] = {}
        if arr.probabilities is not None:
            classes = [str(c) for c in arr.spec.classes or []]
            y_index = np.array([classes.index(str(t)) if str(t) in classes else -1 for t in truth])
            known = y_index >= 0  # a class the model never saw is a miss for every set
            # ... and a wrong answer for ECE: a column of its own that no row puts weight on
            probs = arr.probabilities[keep]
            unseen = np.hstack([probs, np.zeros((len(probs), 1))])
            entry["ece"] = C.ece(unseen, np.where(known, y_index, probs.shape[1]))
            if arr.sets is not None:
                sets = arr.sets[keep]
                hit = np.zeros(len(y_index), bool)
                hit[known] = sets[np.flatnonzero(known), y_index[known]]
                entry.update(set_coverage=float(hit.mean()), mean_set_size=C.mean_set_size(sets))
        if arr.interval is not None:
            lo, hi = arr.interval[keep, 0], arr.interval[keep, 1]
            entry["interval_coverage"] = C.interval_coverage(lo, hi, truth)
            width = float(np.mean(hi - lo))
            if math.isfinite(width):  # a bundle that fitted no finite bound has no width
                entry["mean_interval_width"] = width
        if entry:
            out[name] = entry
    return out


def _score(
    ds: Dataset,
    rows: np.ndarray,
    train_rows: np.ndarray | None,
    pred: dict[str, np.ndarray],
    manifest: Manifest,
    no_top: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Metrics of ``pred`` (aligned to ``rows``) against the labels; baselines from
    ``train_rows``, or without them the trivial answers the bundle recorded from its own
    training rows (``training.baselines``; a bundle without them: the scored rows' own,
    a hindsight baseline); motif rankings cut where ``manifest``'s bundle cuts them, and
    rows of ``no_top`` (aligned to ``rows``) served no top motif."""
    targets = task_targets(ds, np.arange(len(ds)))
    recorded = manifest.training.get("baselines") or {}
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
        trivial = recorded.get(name) if train_rows is None else None
        base_rows = train_rows[valid[train_rows]] if train_rows is not None else rows[keep]
        spec = manifest.tasks.get(name)
        tasks[name] = evaluate_task(
            name,
            kind,
            pred[name][keep],
            target[rows][keep],
            target[base_rows],
            spec.threshold if spec is not None else None,
            trivial=trivial,
            no_top=no_top[name][keep] if no_top and name in no_top else None,
        )
        tasks[name]["baseline_from"] = (
            "training rows" if train_rows is not None or trivial is not None else "scored rows"
        )
        preds[name] = pred[name][keep]
        truths[name] = target[rows][keep]
    return tasks, preds, truths


def training_baselines(
    manifest: Manifest, ds: Dataset, gridded: Gridded | None = None
) -> dict[str, dict[str, Any]]:
    """Per task the :func:`~xasflow.training.scoring.trivial_answers` of the rows the bundle's
    recorded split used for fitting and validation (the rows its test baselines come from),
    for ``training.baselines``. ``ds`` is the bundle's training data (``gridded``: already
    prepared with the bundle's preprocessing)."""
    g = gridded if gridded is not None else grid_dataset(ds, manifest.prep)
    sub = ds.subset(g.rows)
    parts = bundle_split(sub, manifest.training)
    train_rows = np.concatenate([parts["train"], parts["val"]])
    out: dict[str, dict[str, Any]] = {}
    for name, (kind, target, valid) in task_targets(sub, train_rows).items():
        if name in manifest.tasks and valid.any():
            out[name] = trivial_answers(name, kind, target[valid])
    return out


def cn_label_ambiguity(
    cn_vector: np.ndarray, pred: np.ndarray, truth: np.ndarray
) -> dict[str, float | int]:
    """CN accuracy split by how clear each site's label is, beside the overall figure.

    ``cn_vector`` (n, 12): the scored sites' CrystalNN weights; ``pred`` and ``truth`` their
    answered and dominant CNs. A site is ambiguous when its dominant CN holds under
    :data:`AMBIGUOUS_BELOW` of the weight. ``accuracy_in_label_set`` counts an answer among
    the CNs of Zheng's ranked label (weight >= ``labels.CN_THRESHOLD``). Empty when the data
    carry no weights. Computed data only: a reference table's one-hot CN is no CrystalNN
    weight, and :func:`evaluate_bundle` does not ask.
    """
    w = np.nan_to_num(np.asarray(cn_vector, dtype=np.float64), nan=0.0)
    if w.size == 0 or not w.any():
        return {}
    answered, true_cn = _cn_ints(pred), _cn_ints(truth)
    right = (answered == true_cn) & (answered > 0)
    column = np.clip(answered - 1, 0, L.CN_MAX - 1)
    in_set = (
        (answered >= 1) & (answered <= L.CN_MAX) & (w[np.arange(len(w)), column] >= L.CN_THRESHOLD)
    )
    ambiguous = w.max(axis=1) < AMBIGUOUS_BELOW
    out: dict[str, float | int] = {
        "ambiguous_label_fraction": float(ambiguous.mean()),
        "accuracy_in_label_set": float(in_set.mean()),
    }
    for name, rows in (("clear", ~ambiguous), ("ambiguous", ambiguous)):
        if rows.any():
            out[f"accuracy_{name}_labels"] = float(right[rows].mean())
            out[f"n_{name}_labels"] = int(rows.sum())
    return out


def _cn_ints(values: np.ndarray) -> np.ndarray:
    """CN answers or labels as integers (4, 4.0 and "4" alike); 0 for anything else (a
    blank answer, a non-integer)."""

    def one(v: Any) -> int:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return 0
        return int(f) if f.is_integer() else 0

    return np.array([one(v) for v in values], dtype=np.int64)


def _merge_environment(tasks: dict[str, dict[str, Any]]) -> None:
    """Zheng's pair of figures under ``environment``: top-1 label accuracy and ranking Jaccard."""
    if "environment" in tasks and "motifs" in tasks:
        for key in ("jaccard", "baseline_jaccard"):
            tasks["environment"][key] = tasks["motifs"][key]


def evaluate_bundle(
    predictor: Predictor, ds: Dataset, gridded: Gridded | None = None
) -> Evaluation:
    """Metrics of a bundle on ``ds``: the materials of ``ds`` its split put in test (never
    one it trained or calibrated on, by id), or all of ``ds`` for a bundle without a split.
    ``gridded``: ``ds`` already prepared with the bundle's preprocessing."""
    m = predictor.manifest
    if ds.element != m.element:
        raise ValueError(f"bundle is for {m.element}, data is {ds.element}")
    g: Gridded = gridded if gridded is not None else grid_dataset(ds, m.prep)
    if len(g.rows) == 0:
        why = "; ".join(f"{i.item}: {i.reason}: {i.detail}" for i in g.issues[:3])
        more = f" (and {len(g.issues) - 3} more)" if len(g.issues) > 3 else ""
        raise NoTestRows(
            f"no spectrum in the data could be prepared with the bundle's preprocessing: {why}"
            + more
        )
    sub = ds.subset(g.rows)
    same = m.training.get("fingerprint") == ds.fingerprint
    salt = m.training.get("split_salt")
    if same or (salt is not None and not ds.measured):
        # the bundle's own split: computed data that differ from the training data's
        # (unpacked, recompressed, grown) still hold its training materials (or their
        # formulas), which hash into train/val again and must not be scored; measured
        # references were never trained on
        parts = bundle_split(sub, m.training)
        rows, train_rows = parts["test"], np.concatenate([parts["train"], parts["val"]])
        if not rows.size:
            raise NoTestRows("nothing in the data falls in the bundle's test split")
    else:
        rows, train_rows = np.arange(len(sub)), None
    answers = predict_arrays(
        predictor, g.y[rows], alternates=[g.alternates[i] for i in rows] if g.alternates else None
    )
    tasks, preds, truths = _score(sub, rows, train_rows, answers.point, m, answers.no_top)
    _merge_environment(tasks)
    targets = task_targets(sub, rows)
    if "cn" in tasks and not ds.measured:  # CrystalNN weights: computed data only
        scored = rows[targets["cn"][2]]  # the rows _score kept for cn
        tasks["cn"].update(cn_label_ambiguity(sub.cn_vector[scored], preds["cn"], truths["cn"]))
    doubt = uncertainty_metrics(
        answers, {k: v[1] for k, v in targets.items()}, {k: v[2] for k, v in targets.items()}
    )
    for name, entry in doubt.items():
        tasks.setdefault(name, {}).update(entry)
    ood: dict[str, Any] = {}
    if answers.ood is not None and m.ood is not None:
        flagged = ~(answers.ood <= m.ood.threshold)
        ood = {
            "method": m.ood.method,
            "threshold": m.ood.threshold,
            "flagged_fraction": float(flagged.mean()),
            "score_median": float(np.median(answers.ood)),
        }
    issues: dict[str, int] = {}
    for issue in [*ds.issues, *g.issues]:
        issues[issue.reason] = issues.get(issue.reason, 0) + 1
    ev = Evaluation(
        element=ds.element,
        scope="test split"
        if same
        else "external"
        if train_rows is None
        else "test-split materials",
        n_spectra=len(rows),
        n_materials=int(np.unique(sub.material_id[rows]).size),
        tasks=tasks,
        predictions=preds,
        truths=truths,
        issues=issues,
        ood=ood,
        unprepared=list(g.issues),
    )
    if same:
        # what an experiment measures: the site average of a whole material
        test_g = Gridded(g.y[rows], g.e0[rows], g.rows[rows], [])
        avg_y, avg_ds = material_average(ds, test_g)
        if len(avg_ds):
            avg = predict_arrays(predictor, avg_y)
            base = ds.subset(g.rows[train_rows])
            joined = _concat(avg_ds, base)
            ev.material_average, _, _ = _score(
                joined,
                np.arange(len(avg_ds)),
                np.arange(len(avg_ds), len(joined)),
                avg.point,
                m,
                avg.no_top,
            )
            _merge_environment(ev.material_average)
            for metrics in ev.material_average.values():  # a row per material it scored
                metrics["n_materials"] = metrics.get("n_test", len(avg_ds))
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
        formula=np.concatenate([a.formula, b.formula]),
    )
