"""Benchmark: ``prepare_batch`` per spectrum with the batched Larch-convention normalisation
(``xasflow.spectra.norm_batch``) against the per-row normalisation it replaced.

A fly-scan page of 1,000-point measured-like Cu K spectra (sloping background, noise, E0
spread over 10 eV, each row with its own alignment shift) is prepared with the shipped
bundle's ``prep`` (``models/cu-k/manifest.json``: ``method: larch``) in batches of 1, 2, 4, 8
and 64 rows. ``batched`` is ``prepare_batch`` as shipped (below ``BATCH_MIN_ROWS`` rows it
hands each row to ``prepare``). The baseline runs in the same process: the matrix path with
every row handed to the single-spectrum ``normalize`` (exactly the code path before the
batched normalisation); also timed: the matrix path however few the rows
(``BATCH_MIN_ROWS`` = 1, which shows where that threshold belongs), with the batched
normalisation however few the rows too (``LARCH_MIN_ROWS`` = 1, the same for that one) and,
for reference, ``prepare`` row by row. Samples of the variants are interleaved; each figure is the best
(and the median) of ``--samples`` samples of about ``--sample-s`` seconds. The largest
differences of y and of the edge step between the batched and the baseline path are recorded.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/prepare_batch.py \\
        --json bench/results/prepare_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from report import write_json

from xasflow.spectra import Prepared, PrepParams, Spectrum, SpectrumError, prepare
from xasflow.spectra import batch as batch_module
from xasflow.spectra.batch import prepare_batch

CU_K = 8979.0
MANIFEST = Path(__file__).resolve().parents[1] / "models" / "cu-k" / "manifest.json"


def page(n: int, points: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(energy, mu, shifts) of a measured-like page: one axis, n rows with their own edge."""
    rng = np.random.default_rng(seed)
    energy = np.linspace(8800.0, 9400.0, points)
    rows = []
    for _ in range(n):
        rel = energy - (CU_K + rng.uniform(-5, 5))
        edge = 0.5 + np.arctan(rel / 0.775) / np.pi
        white = rng.uniform(0.4, 1.6) * np.exp(-0.5 * ((rel - rng.uniform(3, 7)) / 2.5) ** 2)
        k = np.sqrt(np.clip(rel, 0, None) * 0.2625)
        wiggle = 0.15 * np.sin(2 * k * rng.uniform(1.8, 2.3) + 1.0) * np.exp(-rel / 80) * (rel > 5)
        background = 0.4 + 2e-4 * (energy - 8800)
        rows.append(background + 0.8 * (edge + white + wiggle) + 0.003 * rng.normal(size=points))
    return energy, np.array(rows), rng.uniform(-3.0, 3.0, n)


def _per_row_norm(
    axes: np.ndarray, rel: np.ndarray, mu: np.ndarray, *args: Any
) -> tuple[np.ndarray, np.ndarray, list[SpectrumError | None], np.ndarray]:
    """A stand-in for ``normalize_larch_batch`` that leaves every row to ``normalize``."""
    n = mu.shape[0]
    return np.empty_like(rel), np.empty(n), [None] * n, np.arange(n)


def _row_by_row(
    energy: np.ndarray, mu: np.ndarray, params: PrepParams, shifts: np.ndarray
) -> list[Prepared | SpectrumError]:
    out: list[Prepared | SpectrumError] = []
    for row, s in zip(mu, shifts, strict=True):
        try:
            out.append(prepare(Spectrum(energy + s, row, "Cu", "K"), params))
        except SpectrumError as exc:
            out.append(exc)
    return out


def _variants(
    energy: np.ndarray, mu: np.ndarray, shifts: np.ndarray, params: PrepParams
) -> dict[str, Callable[[], list[Prepared | SpectrumError]]]:
    """The timed calls on one page: the batched path, its baseline and ``prepare`` per row."""

    def batched() -> list[Prepared | SpectrumError]:
        return prepare_batch(energy, mu, params, "Cu", "K", shifts=shifts)

    def matrix() -> list[Prepared | SpectrumError]:  # however few the rows
        with mock.patch.object(batch_module, "BATCH_MIN_ROWS", 1):
            return batched()

    def forced() -> list[Prepared | SpectrumError]:
        with mock.patch.object(batch_module, "LARCH_MIN_ROWS", 1):
            return matrix()

    def baseline() -> list[Prepared | SpectrumError]:
        with mock.patch.object(batch_module, "normalize_larch_batch", _per_row_norm):
            return matrix()

    return {
        "batched": batched,
        "matrix_without_batch_threshold": matrix,
        "batched_without_row_threshold": forced,
        "baseline_per_row_normalize": baseline,
        "prepare_row_by_row": lambda: _row_by_row(energy, mu, params, shifts),
    }


def _sample(fn: Callable[[], Any], seconds: float) -> float:
    """Seconds per call of ``fn``, over as many calls as fill about ``seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls


def main() -> int:
    """Time the variants and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--sizes", default="1,2,4,8,64", help="batch sizes (rows)")
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--sample-s", type=float, default=0.3, help="seconds per sample")
    args = ap.parse_args()
    params = PrepParams.model_validate(json.loads(MANIFEST.read_text())["prep"])
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {}
    for n in sizes:
        energy, mu, shifts = page(n, seed=n)
        variants = _variants(energy, mu, shifts, params)
        new, old = (
            variants["batched_without_row_threshold"](),
            variants["baseline_per_row_normalize"](),
        )
        ok = [(a, b) for a, b in zip(new, old, strict=True) if isinstance(a, Prepared)]
        assert all(isinstance(b, Prepared) for _, b in ok), "the two paths disagree on a row"
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.samples):  # interleaved, so a busy moment hits every variant
            for key, fn in variants.items():
                samples[key].append(_sample(fn, args.sample_s) / n * 1e6)
        row: dict[str, Any] = {
            f"{k}_us_per_spectrum": {"best": min(v), "median": float(np.median(v))}
            for k, v in samples.items()
        }
        best = {k: min(v) for k, v in samples.items()}
        row["speedup_vs_baseline"] = best["baseline_per_row_normalize"] / best["batched"]
        row["n_prepared"] = len(ok)
        pairs = [(a, b) for a, b in ok if isinstance(b, Prepared)]
        row["max_abs_dy"] = max(float(np.abs(a.y - b.y).max()) for a, b in pairs)
        row["max_rel_d_edge_step"] = max(abs(a.edge_step / b.edge_step - 1) for a, b in pairs)
        results[str(n)] = row
        print(n, {k: round(v, 1) for k, v in best.items()}, flush=True)
    report = {
        "benchmark": "prepare_batch",
        "points": 1000,
        "prep": "models/cu-k/manifest.json (method larch, edge_step, energy weighting, edge_tail)",
        "batch_sizes": results,
        "samples": args.samples,
        "sample_s": args.sample_s,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
