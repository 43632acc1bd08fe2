"""The decoder's fast paths give exactly what the general path gives: the classifier block
against task-by-task decoding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from xasflow import paths
from xasflow.models.batch import decode_batch, decode_task, make_consistent
from xasflow.models.bundle import Manifest
from xasflow.models.predictor import Predictor

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"
Raw = dict[str, dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(BUNDLE)


def _fake(template: Raw, n: int, seed: int) -> Raw:
    """Graph outputs of n rows: Dirichlet probabilities, coarse values (ties, zeros, scores
    below the ranking threshold) and one all-zero row."""
    rng = np.random.default_rng(seed)
    out: Raw = {}
    for file, outputs in template.items():
        out[file] = {}
        for name, arr in outputs.items():
            shape = (n, *arr.shape[1:])
            width = int(np.prod(shape[1:]))
            v = rng.dirichlet(np.full(width, rng.uniform(0.05, 2.0)), size=n).reshape(shape)
            v[1::3] = rng.integers(0, 8, size=v[1::3].shape) / 8.0
            v[2::5] = 0.0
            out[file][name] = v.astype(arr.dtype)
    return out


def _variants(m: Manifest) -> list[Manifest]:
    """The shipped manifest, and copies with the other decoding rules."""
    t = m.tasks

    def task(name: str, **kw: Any) -> Manifest:
        return m.model_copy(update={"tasks": {**t, name: t[name].model_copy(update=kw)}})

    def conf(name: str, **kw: Any) -> Manifest:
        conformal = t[name].conformal
        assert conformal is not None
        return task(name, conformal=conformal.model_copy(update=kw))

    return [
        m,
        conf("cn", method="aps"),
        task("environment", temperature=None),
        task("valence", conformal=None),
        conf("distance", method="absolute", qhat=0.1),
        conf("charge", qhat=1e6),
        task("motifs", threshold=0.5),
        m.model_copy(update={"ood": None}),
        m.model_copy(update={"tasks": {k: v for k, v in t.items() if k != "motifs"}}),
    ]


def test_block_decodes_as_task_by_task(predictor: Predictor) -> None:
    template = predictor.run(np.zeros((1, predictor.manifest.input_width), np.float32))
    for manifest in _variants(predictor.manifest):
        for n in (1, 7, 64):
            raw = _fake(template, n, seed=n)
            tasks, _ = decode_batch(manifest, raw)
            ref = {name: decode_task(spec, raw, n) for name, spec in manifest.tasks.items()}
            make_consistent(ref)
            for name, arrays in tasks.items():
                for field in ("values", "index", "probabilities", "sets", "interval", "blank"):
                    got, want = getattr(arrays, field), getattr(ref[name], field)
                    assert (got is None) == (want is None), (name, field)
                    if got is not None:
                        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (name, field)
                assert arrays.lead == ref[name].lead
                assert [vars(r) for r in arrays.results()] == [vars(r) for r in ref[name].results()]
