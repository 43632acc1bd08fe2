"""A manifest's decoding worked out once: its constants, and which tasks decode as one block.

The daemon decodes batches of one spectrum as often as of 64, where numpy's overhead per call
is most of the time. So the constants (class labels and their text keys, the CN tables,
temperatures and set thresholds per column) are derived once per manifest, and the tempered
classifiers are calibrated together as one (n, sum of K) array
(:func:`~xasflow.models.batch.block_probabilities`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from xasflow.models.bundle import ConformalSpec, Manifest, MemberSpec, TaskSpec

_CN_OF_LABEL = re.compile(r"^CN(\d+)-")


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars (for JSON and equality)."""
    return value.item() if isinstance(value, np.generic) else value


def typed(classes: list[Any] | None) -> tuple[tuple[type, Any], ...]:
    """A class list as a cache key: (4, 6) and (4.0, 6.0) are equal tuples, not equal lists
    of labels ("4" against "4.0"), so each class goes with its type."""
    return tuple((type(c), c) for c in classes or ())


@lru_cache(maxsize=64)
def class_labels(
    classes: tuple[tuple[type, Any], ...],
) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """A class list as Python scalars and as text keys, worked out once per list (the
    decoder needs both for every batch)."""
    labels = tuple(_plain(c) for _, c in classes)
    return labels, tuple(str(c) for c in labels)


@lru_cache(maxsize=64)
def _class_ints(classes: tuple[Any, ...]) -> np.ndarray:
    """A CN class list as integers, parsed once per list."""
    arr = np.asarray([_plain(c) for c in classes]).astype(np.int64)
    arr.setflags(write=False)  # shared between calls
    return arr


@lru_cache(maxsize=64)
def _label_cns(labels: tuple[str, ...]) -> np.ndarray:
    """The CN each ``CN<k>-motif`` label names (-1 for none); parsed once per class list."""
    out = []
    for label in labels:
        match = _CN_OF_LABEL.match(label)
        out.append(int(match.group(1)) if match else -1)
    arr = np.array(out, dtype=np.int64)
    arr.setflags(write=False)  # shared between calls
    return arr


@lru_cache(maxsize=64)
def cn_tables(
    env_classes: tuple[tuple[type, Any], ...], cn_classes: tuple[Any, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CN of each CN-motif label, the CN classes as integers, and which label goes with
    which CN class ((labels, CN classes) bool), worked out once per pair of class lists."""
    env_cn = _label_cns(class_labels(env_classes)[1])
    cn_ints = _class_ints(cn_classes)
    of_class = env_cn[:, None] == cn_ints[None, :]
    of_class.setflags(write=False)  # shared between calls
    return env_cn, cn_ints, of_class


@dataclass(frozen=True)
class BlockTask:
    """A tempered classifier decoded in the block: its members, temperature and set rule."""

    name: str
    spec: TaskSpec
    members: list[MemberSpec]
    temperature: float
    conformal: ConformalSpec | None
    labels: tuple[Any, ...]
    keys: tuple[str, ...]


def _in_block(spec: TaskSpec) -> bool:
    """Whether a task's decoding can go in the block and give what :func:`decode_task` gives
    without raising: a classifier with a finite temperature and a LAC or APS set (or none)."""
    if spec.kind != "classifier" or spec.temperature is None:
        return False
    if not (math.isfinite(spec.temperature) and spec.temperature > 0):
        return False
    conf = spec.conformal
    return conf is None or (conf.method in ("lac", "aps") and not math.isnan(conf.qhat))


class DecodePlan:
    """What decoding a manifest's graph outputs needs, derived once (see the module)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        tasks = manifest.tasks
        self.names = list(tasks)
        self.block = [
            BlockTask(
                name,
                spec,
                spec.graph_members(),
                float(spec.temperature or 0.0),
                spec.conformal,
                *class_labels(typed(spec.classes)),
            )
            for name, spec in tasks.items()
            if _in_block(spec)
        ]
        cn, env = tasks.get("cn"), tasks.get("environment")
        #: (CN of each CN-motif label, CN classes as integers, label-to-class table)
        self.tables = (
            cn_tables(typed(env.classes), tuple(cn.classes or ()))
            if cn is not None
            and env is not None
            and cn.kind == "classifier"
            and env.kind == "classifier"
            else None
        )
        motifs = tasks.get("motifs")
        lac = {t.name for t in self.block if t.conformal is None or t.conformal.method == "lac"}
        #: whether :mod:`xasflow.models.single` decodes one spectrum of this manifest: every
        #: classifier in the block with a LAC set or none, and the CN answer's ranking lead
        #: only on a ranking task
        self.single = all(
            name in lac for name, spec in tasks.items() if spec.kind == "classifier"
        ) and (motifs is None or motifs.kind == "multi_regressor")
        #: the single-spectrum path's own constants, made on its first use
        self.python: Any = None
        self._columns: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}

    def columns(self, widths: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """For block tasks of these widths: each task's first column, and per column its
        temperature, its set threshold (+inf without a LAC set) and its task's number."""
        found = self._columns.get(widths)
        if found is None:
            starts = np.cumsum((0, *widths[:-1]))
            temps = np.repeat([t.temperature for t in self.block], widths)
            qhats = np.repeat(
                [
                    t.conformal.qhat
                    if t.conformal is not None and t.conformal.method == "lac"
                    else np.inf
                    for t in self.block
                ],
                widths,
            )
            seg = np.repeat(np.arange(len(widths)), widths)
            found = self._columns[widths] = (starts, temps, qhats, seg)
        return found


_PLANS: dict[int, DecodePlan] = {}


def plan_for(manifest: Manifest) -> DecodePlan:
    """The manifest's plan, made on first use. Kept by identity: a manifest is not changed
    in place once loaded (its changed copies are new objects, ``model_copy``)."""
    plan = _PLANS.get(id(manifest))
    if plan is None or plan.manifest is not manifest:
        if len(_PLANS) >= 16:  # the plan holds its manifest: a few bundles at a time
            _PLANS.clear()
        plan = _PLANS[id(manifest)] = DecodePlan(manifest)
    return plan
