"""Hand-made recommender inputs shared by the recommendation and feedback tests: a Cu K
manifest with known region importances, predictions of chosen certainty, and transmission
counts of a packaged FEFF demo spectrum; and the pieces a recommended region was cut into."""

from __future__ import annotations

import numpy as np

from xasflow.daemon.recommend import Recommendation, Region
from xasflow.models.bundle import Manifest, TaskSpec
from xasflow.models.predictor import Prediction, TaskResult
from xasflow.spectra import FeatureSpec, PrepParams

REGIONS = {
    "pre-edge": (-3.5, 11.5),
    "main peak": (11.5, 26.5),
    "post-peak": (26.5, 41.5),
    "beyond": (41.5, 200.0),
}


def importance(single: dict[str, float], pairs: dict[tuple[str, str], float]) -> dict[str, float]:
    out = dict(single)
    out.update({f"{a} + {b}": v for (a, b), v in pairs.items()})
    return out


# cn depends on the main peak (and the edge), valence on the pre-edge, nothing on post-peak
CN_IMPORTANCE = importance(
    {"pre-edge": 0.10, "main peak": 0.30, "post-peak": 0.0, "beyond": 0.02},
    {
        ("pre-edge", "main peak"): 0.40,
        ("pre-edge", "post-peak"): 0.10,
        ("pre-edge", "beyond"): 0.12,
        ("main peak", "post-peak"): 0.30,
        ("main peak", "beyond"): 0.32,
        ("post-peak", "beyond"): 0.02,
    },
)
VALENCE_IMPORTANCE = importance(
    {"pre-edge": 0.20, "main peak": 0.0, "post-peak": 0.0, "beyond": 0.0},
    {
        ("pre-edge", "main peak"): 0.10,
        ("pre-edge", "post-peak"): 0.10,
        ("pre-edge", "beyond"): 0.10,
        ("main peak", "post-peak"): 0.0,
        ("main peak", "beyond"): 0.0,
        ("post-peak", "beyond"): 0.0,
    },
)


def manifest(**task_importance: dict[str, float]) -> Manifest:
    """A hand-made Cu K manifest (no ONNX needed: the recommender reads only the manifest)."""
    imps = {"cn": CN_IMPORTANCE, "valence": VALENCE_IMPORTANCE, **task_importance}
    tasks = {
        "cn": TaskSpec(
            kind="classifier",
            file="cn.onnx",
            target="cn",
            classes=[2, 4, 6],
            region_importance=imps["cn"],
        ),
        "valence": TaskSpec(
            kind="classifier",
            file="valence.onnx",
            target="valence",
            classes=[1, 2],
            region_importance=imps["valence"],
        ),
    }
    return Manifest(
        bundle_id="cu-k-hand",
        element="Cu",
        edge="K",
        created="2026-01-01T00:00:00Z",
        code_version="test",
        prep=PrepParams(window_start=-3.5, window_stop=116.5, n_points=240),
        features=FeatureSpec(),
        input_width=240,
        tasks=tasks,
        regions=REGIONS,
    )


def prediction(cn: dict[str, float], valence: dict[str, float], e0: float = 8985.0) -> Prediction:
    def res(p: dict[str, float]) -> TaskResult:
        return TaskResult(value=int(max(p, key=p.__getitem__)), probabilities=p)

    return Prediction(
        bundle_id="cu-k-hand",
        element="Cu",
        edge="K",
        e0=e0,
        edge_step=1.0,
        results={"cn": res(cn), "valence": res(valence)},
    )


SURE = {"2": 0.02, "4": 0.95, "6": 0.03}
UNSURE = {"2": 0.30, "4": 0.40, "6": 0.30}
VAL_SURE = {"1": 0.02, "2": 0.98}
VAL_UNSURE = {"1": 0.45, "2": 0.55}


def demo_channels(name: str, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Transmission counts of a packaged FEFF demo spectrum (no ophyd needed)."""
    from xasflow.sim.feff_demo import load_demo_spectra

    demo = next(d for d in load_demo_spectra() if d.name == name)
    # a measured scan starts well below the edge: the calculation's first value held flat
    # over 150 eV of pre-edge (a scan that starts at the edge has no pre-edge line to fit)
    energy = np.arange(demo.energy[0] - 150.0, demo.energy[-1], 0.3)
    mu = np.interp(energy, demo.energy, demo.mu)
    rng = np.random.default_rng(seed)
    i0 = rng.poisson(1e6, energy.size).astype(float)
    it = rng.poisson(1e6 * np.exp(-(0.3 + mu))).astype(float)
    return energy, {"i0": i0, "it": it}


def pieces(rec: Recommendation, name: str) -> list[Region]:
    """The pieces a model region was cut into, in energy order."""
    return sorted(
        (r for r in rec.regions if r.name == name or r.name.startswith(f"{name} (")),
        key=lambda r: r.start,
    )
