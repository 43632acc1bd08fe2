"""One spectrum decoded on Python floats once the block's numpy steps are done.

For one row numpy's overhead per call is most of the decoder's time, and most steps are a
comparison, an addition or a product per class: on Python floats they are the same IEEE
operations and give the same bits. Logarithms, exponentials and row sums stay in numpy
(:func:`~xasflow.models.batch.block_probabilities`, the code every batch goes through).
Anything unusual (a NaN score, an invalid spread, a missing output, a manifest the plan does
not cover) goes back to the general path, :func:`~xasflow.models.batch.decode_batch`, which
answers or raises as it always did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from xasflow.models.batch import block_probabilities, member_mean, member_spread, ood_scores
from xasflow.models.bundle import MemberSpec, TaskSpec
from xasflow.models.plan import DecodePlan
from xasflow.models.results import TaskResult, task_result
from xasflow.models.uncertainty import is_unbounded

Raw = dict[str, dict[str, np.ndarray]]
_INF = math.inf


@dataclass(frozen=True)
class _Regressor:
    name: str
    spec: TaskSpec
    members: list[MemberSpec]
    spread: list[MemberSpec]  # the members with a std output
    qhat: float | None  # None: no interval
    unbounded: bool
    scaled: bool
    offset: float


@dataclass(frozen=True)
class _Ranking:
    name: str
    spec: TaskSpec
    names: list[str] | None
    position: dict[str, int] | None
    threshold: float
    consistent: bool  # the ranking the CN answer leads (make_consistent's "motifs")


@dataclass(frozen=True)
class _Constants:
    regressors: list[_Regressor]
    rankings: list[_Ranking]
    #: per CN class, the CN-motif labels of its CN; per label, the CN classes of its CN;
    #: each label as the ranking's lead names it
    labels_of_cn: tuple[tuple[int, ...], ...] | None
    cns_of_label: tuple[tuple[int, ...], ...] | None
    lead_names: tuple[str, ...] | None


def _constants(plan: DecodePlan) -> _Constants:
    """The plan's constants for this path, made once."""
    if plan.python is not None:
        return plan.python
    regressors, rankings = [], []
    for name, spec in plan.manifest.tasks.items():
        members = spec.graph_members()
        if spec.kind == "regressor":
            conf = spec.conformal
            regressors.append(
                _Regressor(
                    name,
                    spec,
                    members,
                    [m for m in members if m.std_output],
                    None if conf is None else float(conf.qhat),
                    conf is not None and is_unbounded(conf.qhat),
                    conf is not None and conf.method == "scaled",
                    0.0 if conf is None else conf.offset,
                )
            )
        elif spec.kind == "multi_regressor":
            names = spec.outputs or None
            rankings.append(
                _Ranking(
                    name,
                    spec,
                    names,
                    None if names is None else {n: k for k, n in enumerate(names)},
                    spec.threshold if spec.threshold is not None else -_INF,
                    name == "motifs" and plan.tables is not None,
                )
            )
    labels_of_cn = cns_of_label = lead_names = None
    if plan.tables is not None:
        env_cn, cn_ints, _ = plan.tables
        envs, cns = env_cn.tolist(), cn_ints.tolist()
        labels_of_cn = tuple(tuple(k for k, e in enumerate(envs) if e == c) for c in cns)
        cns_of_label = tuple(tuple(j for j, c in enumerate(cns) if c == e) for e in envs)
        lead_names = tuple(str(c) for c in plan.manifest.tasks["environment"].classes or ())
    plan.python = _Constants(regressors, rankings, labels_of_cn, cns_of_label, lead_names)
    return plan.python


def _first(raw: Raw, spec: TaskSpec, members: list[MemberSpec], std: bool = False) -> float:
    """A one-row regressor's value (or spread): the first column of its members' mean."""
    if len(members) == 1:
        m = members[0]
        output = m.std_output if std and m.std_output else m.output
        return float(np.asarray(raw[m.file][output]).flat[0])
    arr = member_spread(raw, spec, 1) if std else member_mean(raw, spec, 1)[:, 0]
    assert arr is not None
    return float(arr[0])


def decode_one(plan: DecodePlan, raw: Raw) -> tuple[dict[str, TaskResult], float | None] | None:
    """One spectrum's results per task (manifest order) and its OOD score, exactly what
    :func:`~xasflow.models.batch.decode_batch` and ``TaskArrays.results`` give for a batch of
    one; None where the general path must decide."""
    if not plan.single:
        return None
    try:
        return _decode(plan, _constants(plan), raw)
    except (KeyError, IndexError, ValueError):  # the general path raises its own error
        return None


def _decode(
    plan: DecodePlan, c: _Constants, raw: Raw
) -> tuple[dict[str, TaskResult], float | None] | None:
    results: dict[str, Any] = dict.fromkeys(plan.names)
    chosen: dict[str, tuple[list[float], int, list[bool] | None]] = {}
    if plan.block:
        found = block_probabilities(plan, raw, 1)
        if found is None:
            return None
        probs, spans = found
        row = probs.tolist()[0]
        for t, (a, b) in zip(plan.block, spans, strict=True):
            if b - a != len(t.labels):
                return None
            p = row[a:b]
            k = p.index(max(p))  # np.argmax: the first of the largest
            members = None
            if t.conformal is not None:
                q = t.conformal.qhat
                members = [1.0 - v <= q for v in p]  # LAC: 1 - p <= qhat, as numpy computes
                members[k] = True
            chosen[t.name] = (p, k, members)
    lead, blank = None, False
    if c.labels_of_cn is not None and c.cns_of_label is not None:
        _, cn_k, cn_set = chosen["cn"]
        p, k, env_set = chosen["environment"]
        allowed = c.labels_of_cn[cn_k]
        blank = not allowed
        if allowed:
            k = max(allowed, key=p.__getitem__)  # the first of the largest, in label order
        if env_set is not None and cn_set is not None:
            joint = [
                s and any(cn_set[j] for j in js)
                for s, js in zip(env_set, c.cns_of_label, strict=True)
            ]
            if any(joint):
                env_set = joint
        if env_set is not None and allowed:
            env_set[k] = True
        chosen["environment"] = (p, k, env_set)
        lead = None if blank else c.lead_names[k] if c.lead_names is not None else None
    for t in plan.block:
        p, k, members = chosen[t.name]
        labels = t.labels
        value = None if blank and t.name == "environment" else labels[k]
        chosen_set = None if members is None else [labels[j] for j, m in enumerate(members) if m]
        results[t.name] = task_result(value, dict(zip(t.keys, p, strict=True)), None, chosen_set)
    for r in c.regressors:
        v = _first(raw, r.spec, r.members)
        s = _first(raw, r.spec, r.spread, std=True) if r.spread else None
        interval = None
        if r.qhat is not None:
            if r.unbounded:
                interval = (-_INF, _INF)
            elif r.scaled and s is not None:
                if not (s >= 0 and math.isfinite(s)):
                    return None
                w = r.qhat * (s + r.offset)
                interval = (v - w, v + w)
            else:
                interval = (v - r.qhat, v + r.qhat)
        results[r.name] = task_result(v, None, None, None, interval)
    for g in c.rankings:
        results[g.name] = _ranking(g, raw, lead if g.consistent else None, g.consistent and blank)
    return results, _ood(plan, raw)


def _ranking(g: _Ranking, raw: Raw, lead: str | None, blank: bool) -> TaskResult:
    """``TaskArrays._ranking_rows`` for one row."""
    members = g.spec.graph_members()
    if len(members) == 1:
        m = members[0]
        row = np.asarray(raw[m.file][m.output], dtype=np.float64).ravel().tolist()
    else:
        row = member_mean(raw, g.spec, 1)[0].tolist()
    total = sum(row)
    if total != total:  # a NaN: numpy sorts it last, Python's sort would not
        raise ValueError("NaN score")
    names = g.names or [str(k) for k in range(len(row))]
    position = g.position if g.position is not None else {n: k for k, n in enumerate(names)}
    order = sorted(range(len(row)), key=row.__getitem__, reverse=True)  # stable, as numpy's
    thr = g.threshold
    ranking = [(names[k], row[k]) for k in order if row[k] >= thr]  # a prefix of the order
    if lead is not None and lead in position:
        ranking = [(lead, row[position[lead]])] + [r for r in ranking if r[0] != lead]
    top = None if blank else ranking[0][0] if ranking else names[order[0]]
    return task_result(top, None, ranking)


def _ood(plan: DecodePlan, raw: Raw) -> float | None:
    """The batch of one's OOD score, as :func:`~xasflow.models.batch.decode_batch` makes it."""
    ood = ood_scores(plan.manifest, raw, 1)
    return None if ood is None else float(ood.tolist()[0])
