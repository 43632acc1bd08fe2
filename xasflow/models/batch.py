"""Decoding a batch of graph outputs into calibrated answers with their conformal doubt.

Pure numpy on the arrays onnxruntime returned, vectorised over the batch: members averaged,
classifier probabilities temperature-scaled, conformal sets and intervals from the manifest's
fitted quantiles, CN and CN-motif decoded consistently. Training's evaluation and the daemon
both go through here, so the figures a bundle reports are those it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xasflow.models.bundle import ConformalSpec, Manifest, TaskSpec
from xasflow.models.plan import (
    DecodePlan,
    class_labels,
    cn_tables,
    plan_for,
    typed,
)
from xasflow.models.results import TaskResult, task_result
from xasflow.models.uncertainty import (
    PROB_EPS,
    combined_ood,
    intervals,
    is_unbounded,
    set_mask,
    spread_score,
    tempered,
)


@dataclass
class TaskArrays:
    """One task's answers for a batch of n spectra.

    ``index`` is the chosen class per row (classifiers), ``values`` the point prediction
    (regressors: (n,); multi-output: (n, k)); ``sets`` (n, K) bool and ``interval`` (n, 2)
    carry the conformal doubt when the bundle was calibrated.
    """

    spec: TaskSpec
    values: np.ndarray
    index: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    sets: np.ndarray | None = None
    interval: np.ndarray | None = None
    std: np.ndarray | None = None
    lead: list[str | None] | None = None  # multi-output: label to rank first (consistency)
    #: Rows with no answer consistent with the CN answer (no CN-motif label of that CN): their
    #: value is None; probabilities, sets and scores stay as calibrated.
    blank: np.ndarray | None = None
    #: classifiers: the labels and their text keys, when the decoder has them at hand
    names: tuple[tuple[Any, ...], tuple[str, ...]] | None = None

    def point(self) -> np.ndarray:
        """The point prediction per row: class labels (None where blank), values, or the
        (n, k) score matrix."""
        if self.index is not None:
            labels = np.asarray(self.spec.classes, dtype=object)[self.index]
            if self.blank is not None:
                labels[self.blank] = None
            return labels
        return self.values

    def results(self) -> list[TaskResult]:
        """Every row as a :class:`TaskResult`, built in one pass over the batch.

        The arrays become Python lists once per task (``tolist``), not per row: indexing
        numpy row by row cost ~8 us per task and row, more than the network in a batch of 64.
        """
        if self.index is not None and self.probabilities is not None:
            return self._classifier_rows()
        if self.spec.kind == "regressor":
            values = self.values.tolist()
            if self.interval is None:
                return [task_result(v) for v in values]
            bounds = self.interval.tolist()
            return [
                task_result(v, interval=(b[0], b[1])) for v, b in zip(values, bounds, strict=True)
            ]
        return self._ranking_rows()

    def _classifier_rows(self) -> list[TaskResult]:
        assert self.index is not None and self.probabilities is not None
        labels, keys = self.names or class_labels(typed(self.spec.classes))
        chosen = self.index.tolist()
        if self.blank is not None and self.blank.any():  # None: one past the labels
            labels = (*labels, None)
            chosen = np.where(self.blank, len(labels) - 1, self.index).tolist()
        probs = self.probabilities.tolist()
        if self.sets is None:
            return [
                task_result(labels[k], dict(zip(keys, p, strict=True)))
                for k, p in zip(chosen, probs, strict=True)
            ]
        members: list[list[Any]] = [[] for _ in chosen]  # sets hold 1-2 of up to 22 classes:
        rows, cols = np.nonzero(self.sets)  # walk the members, not every class of every row
        for i, k in zip(rows.tolist(), cols.tolist(), strict=True):
            members[i].append(labels[k])
        return [
            task_result(labels[k], dict(zip(keys, p, strict=True)), prediction_set=s)
            for k, p, s in zip(chosen, probs, members, strict=True)
        ]

    def _ranking_rows(self) -> list[TaskResult]:
        """Multi-output rows: outputs above the threshold ranked, the ``lead`` label first."""
        spec, values = self.spec, self.values
        names = spec.outputs or [str(k) for k in range(values.shape[1])]
        order_arr = np.argsort(-values, axis=1, kind="stable")
        thr = spec.threshold if spec.threshold is not None else -np.inf
        # sorted from the top, the outputs at or above the threshold are a prefix of each order
        n_kept = (np.take_along_axis(values, order_arr, axis=1) >= thr).sum(axis=1).tolist()
        orders, rows = order_arr.tolist(), values.tolist()
        leads = self.lead if self.lead is not None else [None] * len(rows)
        blank = self.blank.tolist() if self.blank is not None else [False] * len(rows)
        position = {name: k for k, name in enumerate(names)}
        unique = len(position) == len(names)  # then a lead already first stays as it is
        out = []
        for row, order, kept, lead, none in zip(rows, orders, n_kept, leads, blank, strict=True):
            ranking = [(names[k], row[k]) for k in order[:kept]]
            first = unique and ranking and ranking[0][0] == lead
            if lead is not None and lead in position and not first:
                ranking = [(lead, row[position[lead]])] + [r for r in ranking if r[0] != lead]
            top = None if none else ranking[0][0] if ranking else names[order[0]]
            out.append(task_result(top, ranking=ranking))
        return out


def member_mean(raw: dict[str, dict[str, np.ndarray]], spec: TaskSpec, n: int) -> np.ndarray:
    """Members' outputs averaged, as float64 (n, width)."""
    outs = [
        np.asarray(raw[m.file][m.output], dtype=np.float64).reshape(n, -1)
        for m in spec.graph_members()
    ]
    return outs[0] if len(outs) == 1 else np.mean(outs, axis=0)  # one member: no copy


def member_spread(
    raw: dict[str, dict[str, np.ndarray]], spec: TaskSpec, n: int
) -> np.ndarray | None:
    """Deep-ensemble spread of a regressor (mean of members' std outputs), if any member has one."""
    stds = [
        np.asarray(raw[m.file][m.std_output], dtype=np.float64).reshape(n, -1)[:, 0]
        for m in spec.graph_members()
        if m.std_output
    ]
    if not stds:
        return None
    return stds[0] if len(stds) == 1 else np.mean(stds, axis=0)


def decode_task(spec: TaskSpec, raw: dict[str, dict[str, np.ndarray]], n: int) -> TaskArrays:
    """One task's batch from the raw graph outputs."""
    mean = member_mean(raw, spec, n)
    conf: ConformalSpec | None = spec.conformal
    if spec.kind == "classifier":
        probs = np.clip(mean, 0.0, None)
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        if not np.isfinite(probs).all():  # checked once here, not in each step below
            raise ValueError("probabilities contain NaN or infinity")
        if spec.temperature is not None:
            probs = tempered(probs, spec.temperature)
        top = np.argmax(probs, axis=1)
        sets = set_mask(probs, conf.qhat, conf.method, top) if conf is not None else None
        return TaskArrays(spec, values=probs, index=top, probabilities=probs, sets=sets)
    if spec.kind == "regressor":
        values = mean[:, 0]
        std = member_spread(raw, spec, n)
        interval = None
        if conf is not None:
            if is_unbounded(conf.qhat):  # no finite bound was fitted: none is made up
                lo, hi = np.full_like(values, -np.inf), np.full_like(values, np.inf)
            elif conf.method == "scaled" and std is not None:
                lo, hi = intervals(values, conf.qhat, std, conf.offset)
            else:
                lo, hi = intervals(values, conf.qhat)
            interval = np.column_stack([lo, hi])
        return TaskArrays(spec, values=values, interval=interval, std=std)
    return TaskArrays(spec, values=mean)


def make_consistent(
    tasks: dict[str, TaskArrays], tables: tuple[np.ndarray, ...] | None = None
) -> None:
    """The CN-motif label (and the motif ranking's head) follow the CN answer.

    CN is the better-measured task, so it decides; the environment answer becomes its most
    probable label of that CN (kept in its prediction set), and the ranking of motifs leads
    with it. Where the bundle has no label of that CN (CN 9 and 10 have no motif in Zheng's
    list), neither gives an answer (``blank``: value None) rather than one of another CN;
    their probabilities, sets and scores stay.

    The CN-motif set keeps only labels of a CN in the CN set, so the two sets never contradict
    each other (a row whose CN set has no motif label keeps its calibrated set). On the Cu
    test split this left 2.3 labels of 2.7 and the motif set's coverage at 0.886 (0.917 before):
    with the CN set's 90 %, the two hold together at least 80 % of the time (union bound).
    ``tables``: :func:`~xasflow.models.plan.cn_tables` of the two tasks, if at hand.
    """
    cn, env = tasks.get("cn"), tasks.get("environment")
    if cn is None or env is None or env.probabilities is None or cn.index is None:
        return
    env_cn, cn_classes, of_class = tables or cn_tables(
        typed(env.spec.classes), tuple(cn.spec.classes or ())
    )
    cn_values = cn_classes[cn.index]
    allowed = env_cn[None, :] == cn_values[:, None]
    masked = np.where(allowed, env.probabilities, -1.0)
    best = np.argmax(masked, axis=1)
    has = allowed.any(axis=1)
    assert env.index is not None
    env.index = np.where(has, best, env.index)
    env.blank = ~has
    if env.sets is not None and cn.sets is not None:
        joint = env.sets & (cn.sets @ of_class.T)  # boolean product: any CN class of the set
        env.sets = np.where(joint.any(axis=1, keepdims=True), joint, env.sets)
    if env.sets is not None:
        rows = np.flatnonzero(has)
        env.sets[rows, env.index[rows]] = True
    motifs = tasks.get("motifs")
    if motifs is not None:
        motifs.lead = [None if label is None else str(label) for label in env.point()]
        motifs.blank = env.blank


def block_probabilities(
    plan: DecodePlan, raw: dict[str, dict[str, np.ndarray]], n: int
) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
    """The block tasks' calibrated probabilities side by side ((n, sum of K)) and each task's
    columns; None where an output is missing or a probability is not finite (decoding task by
    task then raises as it always did, the first task's error first).

    Each step is :func:`decode_task`'s on the same numbers: clipped at zero, rows normalised,
    then ``softmax(log(p + eps) / T)``; elementwise steps once for all tasks, row sums and
    maxima per task on its own columns (numpy sums a row's columns the same way whatever
    surrounds them, so every figure is the one task-by-task decoding gives).
    """
    if not plan.block:
        return None
    try:
        parts = [
            np.reshape(raw[t.members[0].file][t.members[0].output], (n, -1))
            if len(t.members) == 1
            else member_mean(raw, t.spec, n)
            for t in plan.block
        ]
    except KeyError:
        return None
    widths = tuple(p.shape[1] for p in parts)
    if 0 in widths:
        return None
    starts, temps, _, seg = plan.columns(widths)
    probs = np.concatenate(parts, axis=1, dtype=np.float64)  # float32 to float64: exact
    np.maximum(probs, 0.0, out=probs)  # np.clip(p, 0.0, None) is this call
    spans = []
    a = 0
    for w in widths:
        spans.append((a, a + w))
        p = probs[:, a : a + w]
        p /= np.maximum(np.add.reduce(p, axis=1, keepdims=True), 1e-12)
        a += w
    if not np.isfinite(probs).all():
        return None
    logits = probs + PROB_EPS
    np.log(logits, out=logits)
    logits /= temps
    logits -= np.maximum.reduceat(logits, starts, axis=1)[:, seg]  # maxima are exact
    e = np.exp(logits, out=logits)
    for a, b in spans:
        p = e[:, a:b]
        p /= np.add.reduce(p, axis=1, keepdims=True)
    return e, spans


def block_arrays(
    plan: DecodePlan, raw: dict[str, dict[str, np.ndarray]], n: int
) -> dict[str, TaskArrays] | None:
    """The plan's block classifiers decoded together (see :mod:`xasflow.models.plan`): what
    :func:`decode_task` gives each, or None where that must decide (a missing output, a
    probability not finite)."""
    found = block_probabilities(plan, raw, n)
    if found is None:
        return None
    probs, spans = found
    qhats = plan.columns(tuple(b - a for a, b in spans))[2]
    lac = (1.0 - probs) <= qhats if any(t.conformal is not None for t in plan.block) else None
    rows = np.arange(n)
    out = {}
    for t, (a, b) in zip(plan.block, spans, strict=True):
        p = probs[:, a:b]
        top = np.argmax(p, axis=1)
        sets = None
        if t.conformal is not None and lac is not None:
            if t.conformal.method == "lac":
                sets = lac[:, a:b]
                sets[rows, top] = True
            else:
                sets = set_mask(np.ascontiguousarray(p), t.conformal.qhat, t.conformal.method, top)
        out[t.name] = TaskArrays(
            t.spec, p, index=top, probabilities=p, sets=sets, names=(t.labels, t.keys)
        )
    return out


def batch_size(raw: dict[str, dict[str, np.ndarray]]) -> int:
    """The rows in a batch of graph outputs (its first output's)."""
    first = next(iter(raw.values()))
    return int(next(iter(first.values())).shape[0])


def decode_batch(
    manifest: Manifest, raw: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[str, TaskArrays], np.ndarray | None]:
    """Every task of ``manifest`` decoded from ``raw`` (file -> output -> array), and OOD scores."""
    n = batch_size(raw)
    plan = plan_for(manifest)
    block = block_arrays(plan, raw, n)
    if block is None:  # task by task, as its checks raise
        tasks = {name: decode_task(spec, raw, n) for name, spec in manifest.tasks.items()}
    else:
        tasks = {
            name: block[name] if name in block else decode_task(spec, raw, n)
            for name, spec in manifest.tasks.items()
        }
    make_consistent(tasks, plan.tables)
    return tasks, ood_scores(manifest, raw, n)


def ood_scores(
    manifest: Manifest, raw: dict[str, dict[str, np.ndarray]], n: int
) -> np.ndarray | None:
    """The batch's out-of-domain scores (n,), combined with the ensemble's spread where the
    bundle says so; None for a bundle without an OOD graph."""
    spec = manifest.ood
    if spec is None:
        return None
    ood = np.asarray(raw[spec.file][spec.output], dtype=np.float64).reshape(n)
    if spec.spread is not None and spec.recon_scale is not None:
        spread = spread_score([raw[f][o] for f, o in spec.spread.outputs])
        ood = combined_ood(ood, spec.recon_scale, spread, spec.spread.scale)
    return ood
