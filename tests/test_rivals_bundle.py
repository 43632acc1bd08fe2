"""A bundle served on its edges' rival rises (xasflow.training.rivals): the graphs untouched,
the doubt refitted, and each spectrum answered from the mean of its grids' outputs, with its
out-of-domain score from E0's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch")
pytest.importorskip("pymatgen.core")

from scan_helpers import two_rises

from xasflow.models.batch import decode_batch
from xasflow.models.bundle import verify_bundle
from xasflow.models.predictor import Predictor
from xasflow.spectra import Spectrum, model_input

ENERGY = np.arange(8800.0, 9200.0, 0.5)
#: two rises of equal slope 6 eV apart (scan_helpers.two_rises), with point noise
TWO_RISES = two_rises(ENERGY) + np.random.default_rng(3).normal(0.0, 0.002, ENERGY.size)
CLEAR = 0.2 + np.arctan((ENERGY - 8984.0) / 1.5) / np.pi + 0.5


def test_the_rewrite_keeps_the_graphs_and_refits_the_doubt(
    tiny_mlp_bundle: Path, tiny_rivals_bundle: Path, tmp_path: Path
) -> None:
    from xasflow.training.rivals import RATIO, WINDOW, rivals_bundle

    before, after = verify_bundle(tiny_mlp_bundle), verify_bundle(tiny_rivals_bundle)
    assert before.prep.e0_rivals is None
    assert (after.prep.e0_rivals, after.prep.e0_rival_window) == (RATIO, WINDOW)
    assert after.prep.model_dump(exclude={"e0_rivals"}) == before.prep.model_dump(
        exclude={"e0_rivals"}
    )
    for name in before.files:  # the graphs are the trained ones
        assert (tiny_rivals_bundle / name).read_bytes() == (tiny_mlp_bundle / name).read_bytes()
    assert after.ood == before.ood
    record = after.training["e0_rivals"]
    assert record["validation_spectra"] > 0
    assert 0 <= record["validation_spectra_with_rivals"] <= record["validation_spectra"]
    for name, task in after.tasks.items():  # measured as served, every task
        assert task.metrics, name
    with pytest.raises(ValueError, match="already serves rival rises"):
        rivals_bundle(tiny_rivals_bundle, tmp_path / "again", log=lambda _: None)


def test_a_spectrum_is_answered_from_the_mean_of_its_grids(tiny_rivals_bundle: Path) -> None:
    predictor = Predictor(tiny_rivals_bundle)
    m = predictor.manifest
    prepared = predictor.prepare(Spectrum(ENERGY, TWO_RISES, "Cu", "K"))
    assert len(prepared.alternates) == 1
    served = predictor.predict_prepared([prepared])[0]
    rows = np.vstack([prepared.y, *prepared.alternates])
    raw = predictor.run(model_input(rows, m.features, m.prep))
    mean = {
        f: {o: np.asarray(v, dtype=np.float64).mean(axis=0, keepdims=True) for o, v in outs.items()}
        for f, outs in raw.items()
    }
    tasks, _ = decode_batch(m, mean)
    for name in ("cn", "valence"):
        probs = served[name].probabilities
        assert probs is not None
        np.testing.assert_allclose(
            [probs[str(c)] for c in m.tasks[name].classes], tasks[name].probabilities[0], atol=1e-9
        )
    for name in ("distance", "charge"):
        assert served[name].value == pytest.approx(float(tasks[name].values[0]), abs=1e-9)
    # the out-of-domain score is E0's grid's alone
    alone = predictor.infer(model_input(prepared.y[None, :], m.features, m.prep))[1]
    assert alone is not None and served.ood_score == pytest.approx(float(alone[0]), abs=1e-12)
    # and differs from the other grid's: the mean was not taken
    other = predictor.infer(model_input(rows[1:], m.features, m.prep))[1]
    assert other is not None and abs(float(other[0]) - float(alone[0])) > 1e-6


def test_neighbours_in_a_batch_do_not_change_an_answer(tiny_rivals_bundle: Path) -> None:
    predictor = Predictor(tiny_rivals_bundle)
    two = predictor.prepare(Spectrum(ENERGY, TWO_RISES, "Cu", "K"))
    clear = predictor.prepare(Spectrum(ENERGY, CLEAR, "Cu", "K"))
    assert two.alternates and not clear.alternates
    together = predictor.predict_prepared([clear, two, clear])
    alone = [predictor.predict_prepared([p])[0] for p in (clear, two, clear)]
    for a, b in zip(together, alone, strict=True):
        assert _close(a.to_dict(), b.to_dict()), (a.to_dict(), b.to_dict())


def _close(a: object, b: object) -> bool:
    """Equal, floats to 1e-9 (a batch of one takes the single-row decoder)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a))
    return a == b
