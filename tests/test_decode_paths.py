"""The decoder's fast paths give exactly what the general path gives: the classifier block
against task-by-task decoding, one spectrum on Python floats against the same row in a batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from xasflow import paths
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.models.batch import decode_batch, decode_task, make_consistent
from xasflow.models.bundle import Manifest
from xasflow.models.plan import plan_for
from xasflow.models.predictor import Prediction, Predictor
from xasflow.models.single import decode_one
from xasflow.models.views import join_views, view_counts

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


def _row(raw: Raw, i: int) -> Raw:
    return {f: {o: a[i : i + 1] for o, a in outs.items()} for f, outs in raw.items()}


def _fields(p: Prediction) -> Any:
    """Every field, floats as bits (NaN and -0.0 compared exactly)."""

    def bits(v: Any) -> Any:
        if isinstance(v, float):
            return ("float", v.hex())
        if isinstance(v, dict):
            return [(bits(k), bits(x)) for k, x in v.items()]
        if isinstance(v, list | tuple):
            return (type(v).__name__, [bits(x) for x in v])
        return (type(v).__name__, v)

    rows = {n: bits(vars(r)) for n, r in p.results.items()}
    return bits(vars(p) | {"results": None}), rows


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


def test_one_spectrum_as_its_row_in_a_batch(predictor: Predictor) -> None:
    template = predictor.run(np.zeros((1, predictor.manifest.input_width), np.float32))
    shipped = predictor.manifest
    spectra = [_prepared(i) for i in range(64)]
    try:
        for manifest in _variants(shipped):
            predictor.manifest = manifest
            plan = plan_for(manifest)
            raw = _fake(template, 64, seed=3)
            batch = predictor.predictions(spectra, raw)
            for i in range(64):
                one = _row(raw, i)
                if plan.single:
                    assert decode_one(plan, one) is not None  # the fast path answers
                assert _fields(predictor.predictions([spectra[i]], one)[0]) == _fields(batch[i])
    finally:
        predictor.manifest = shipped


def test_one_spectrum_unusual_rows_go_the_general_way(predictor: Predictor) -> None:
    """A NaN score, a negative spread or a NaN probability: the general path decides (an
    answer ranked as numpy ranks it, or its error)."""
    template = predictor.run(np.zeros((1, predictor.manifest.input_width), np.float32))
    plan = plan_for(predictor.manifest)
    for output, value in (("motifs", np.nan), ("distance_std", -1.0), ("cn", np.nan)):
        raw = _fake(template, 1, seed=5)
        raw["mlp.onnx"][output].flat[0] = value
        assert decode_one(plan, raw) is None
    raw = _fake(template, 1, seed=5)
    raw["mlp.onnx"]["motifs"].flat[0] = np.nan
    got = predictor.predictions([_prepared(0)], raw)[0]["motifs"]
    tasks, _ = decode_batch(predictor.manifest, raw)
    assert vars(got) == vars(tasks["motifs"].results()[0])
    raw["mlp.onnx"]["distance_std"].flat[0] = -1.0
    with pytest.raises(ValueError, match="scale must be finite"):
        predictor.predictions([_prepared(0)], raw)


def _prepared(i: int) -> Any:
    """What ``predictions`` reads of a prepared spectrum."""
    return SimpleNamespace(e0=8979.0 + i, edge_step=1.0 + i / 64, extrapolated=float(i % 2))


def test_library_spectra_one_by_one_and_in_a_batch(predictor: Predictor, xdi_library: Path) -> None:
    files = sorted((xdi_library / "Cu").glob("*.xdi"))
    prepared = [predictor.prepare(xdi_to_spectrum(read_xdi(f))) for f in files]
    raw = predictor.run(predictor.model_input(prepared))
    batch = predictor.predictions(prepared, raw)
    counts = view_counts([p.alternates for p in prepared])  # rows per spectrum: its grids
    assert counts.max() > 1  # measured Cu(II) edges rise twice: the joined path is taken
    starts = np.concatenate(([0], np.cumsum(counts)))
    for i, p in enumerate(prepared):
        own = {
            f: {o: a[starts[i] : starts[i + 1]] for o, a in outs.items()} for f, outs in raw.items()
        }
        one = join_views(predictor.manifest, own, counts[i : i + 1])
        assert decode_one(plan_for(predictor.manifest), one) is not None
        assert _fields(predictor.predictions([p], own)[0]) == _fields(batch[i])
