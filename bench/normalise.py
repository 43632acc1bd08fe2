"""Benchmark: xasflow's E0 and edge step against Larch ``pre_edge`` on the shared XDI library.

Every ``*.xdi`` file of the shared XAS Data Library is read with xasflow's XDI adapter (mu from
``mu_from_channels``), and the same energy and mu arrays go to both tools: xasflow's
``find_e0`` + ``normalize`` (the default, Larch-consistent ``PrepParams`` and the legacy
fixed-window one, for the before/after comparison) and Larch's ``pre_edge`` with its defaults,
each finding its own E0. A file xasflow rejects is counted under its reason, not compared;
``failed`` counts files that neither normalise nor are rejected with a reason (a crash, or a
non-finite step). With the shared Cu FEFF archive present it also counts the FEFF spectra
whose normalised values leave [-2, 2] and [-5, 5] on the Cu model's grid, before and after.
Needs the optional ``larch`` extra (``pip install xasflow[larch]``).

    .venv/bin/python bench/normalise.py --json bench/results/normalise.json
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from report import write_json

from xasflow import paths
from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum
from xasflow.spectra import PrepParams, Spectrum, SpectrumError, find_e0, normalize


def _larch() -> tuple[Any, Any, str]:
    try:
        import larch
        from larch import Group
        from larch.xafs import pre_edge
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            f"this benchmark needs xraylarch (pip install xasflow[larch]): {exc}"
        ) from None
    return pre_edge, Group, str(larch.__version__)


def _xasflow(spectrum: Spectrum, params: PrepParams) -> tuple[float, float]:
    e0 = find_e0(spectrum, params.e0_search)
    return e0, normalize(spectrum, e0, params)[1]


def _timed(fn: Any, repeat: int) -> tuple[Any, float]:
    """Result of ``fn()`` and its best-of-``repeat`` wall time in ms."""
    best = np.inf
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best * 1e3


def _summary(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Agreement statistics of one xasflow variant (``key``) with Larch."""
    ok = [r for r in rows if key in r and "larch" in r]
    de0 = np.array([abs(r[key]["e0"] - r["larch"]["e0"]) for r in ok])
    rel = np.array([abs(r[key]["step"] / r["larch"]["step"] - 1) for r in ok])
    rejected = Counter(r[f"{key}_rejected"] for r in rows if f"{key}_rejected" in r)
    failed = [r["file"] for r in rows if f"{key}_failed" in r]
    worst = sorted(ok, key=lambda r: -abs(r[key]["step"] / r["larch"]["step"] - 1))[:5]
    return {
        "n_compared": len(ok),
        "e0_abs_diff_median_ev": float(np.median(de0)),
        "e0_abs_diff_p90_ev": float(np.percentile(de0, 90)),
        "edge_step_rel_diff_median": float(np.median(rel)),
        "edge_step_rel_diff_p90": float(np.percentile(rel, 90)),
        "edge_step_rel_diff_max": float(rel.max()),
        "within_3pct": int(np.count_nonzero(rel <= 0.03)),
        "rejected": dict(rejected),
        "n_rejected": int(sum(rejected.values())),
        "failed": len(failed),
        "failed_files": failed,
        "worst": [
            {"file": r["file"], "xasflow": r[key]["step"], "larch": r["larch"]["step"]}
            for r in worst
        ],
        "ms": float(np.mean([r[f"{key}_ms"] for r in rows if f"{key}_ms" in r])),
    }


def _feff_outliers(archive: Path) -> dict[str, Any]:
    """How many shared Cu FEFF spectra leave [-2, 2] and [-5, 5] on the Cu model's grid
    (``training.fit``'s window), legacy vs default normalisation, and what is rejected."""
    from xasflow.adapters.feff import read_feff_tree
    from xasflow.spectra import prepare

    spectra = [site.to_spectrum() for site in read_feff_tree(archive, element="Cu").sites()]
    out: dict[str, Any] = {"n_spectra": len(spectra)}
    for key, params in (
        ("after", PrepParams(window_stop=116.5, n_points=240)),
        ("before_legacy", PrepParams(method="legacy", window_stop=116.5, n_points=240)),
    ):
        peaks, rejected = [], Counter()
        for spectrum in spectra:
            try:
                peaks.append(float(np.abs(prepare(spectrum, params).y).max()))
            except SpectrumError as exc:
                rejected[exc.reason] += 1
        top = np.asarray(peaks)
        out[key] = {
            "over_2": int(np.count_nonzero(top > 2)),
            "over_5": int(np.count_nonzero(top > 5)),
            "max": float(top.max()),
            "p99": float(np.percentile(top, 99)),
            "rejected": dict(rejected),
        }
    return out


def main() -> int:
    """Run the comparison and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=str(paths.xas_data_library()))
    ap.add_argument("--json", required=True)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (best kept)")
    ap.add_argument("--feff", default=str(paths.cu_feff_archive()), help="Cu FEFF tree")
    ap.add_argument("--no-feff", action="store_true", help="skip the FEFF outlier count")
    args = ap.parse_args()
    pre_edge, group, larch_version = _larch()

    variants = {"xasflow": PrepParams(), "legacy": PrepParams(method="legacy")}
    feff_range = PrepParams(norm2=120.0)
    files = sorted(Path(args.library).glob("*/*.xdi"))
    if not files:
        raise SystemExit(f"no XDI files under {args.library}/*/")
    rows: list[dict[str, Any]] = []
    unreadable: Counter[str] = Counter()
    for path in files:
        row: dict[str, Any] = {"file": f"{path.parent.name}/{path.name}"}
        try:
            spectrum = xdi_to_spectrum(read_xdi(path))
        except (SpectrumError, ValueError) as exc:
            unreadable[getattr(exc, "reason", type(exc).__name__)] += 1
            continue
        rows.append(row)
        for key, params in variants.items():
            try:
                (e0, step), ms = _timed(lambda p=params, s=spectrum: _xasflow(s, p), args.repeat)
            except SpectrumError as exc:
                row[f"{key}_rejected"] = exc.reason
                continue
            except Exception as exc:  # a crash is what "failed" counts
                row[f"{key}_failed"] = repr(exc)
                continue
            if not (np.isfinite(step) and step > 0):
                row[f"{key}_failed"] = f"edge step {step}"
                continue
            row[key] = {"e0": e0, "step": step}
            row[f"{key}_ms"] = ms

        if "xasflow" in row and spectrum.energy[-1] - row["xasflow"]["e0"] >= 300:
            # the step a long scan gets from FEFF's range alone (post-edge to E0+120 eV)
            with contextlib.suppress(SpectrumError):  # then it is simply not counted
                row["feff_range_step"] = normalize(spectrum, row["xasflow"]["e0"], feff_range)[1]

        def run_larch(s: Spectrum = spectrum) -> Any:
            g = group(energy=s.energy, mu=s.mu)
            pre_edge(g)
            return g

        try:
            g, ms = _timed(run_larch, args.repeat)
            row["larch"] = {"e0": float(g.e0), "step": float(g.edge_step)}
            row["larch_ms"] = ms
        except Exception as exc:  # Larch's own failures are recorded
            row["larch_failed"] = repr(exc)

    now, before = _summary(rows, "xasflow"), _summary(rows, "legacy")
    ranged = [
        abs(r["feff_range_step"] / r["xasflow"]["step"] - 1) for r in rows if "feff_range_step" in r
    ]
    report = {
        "n_files": len(files),
        "n_read": len(rows),
        "unreadable": dict(unreadable),
        "larch_version": larch_version,
        "e0_abs_diff_median_ev": now["e0_abs_diff_median_ev"],
        "edge_step_rel_diff_median": now["edge_step_rel_diff_median"],
        "edge_step_rel_diff_p90": now["edge_step_rel_diff_p90"],
        "failed": now["failed"],
        "rejected": now["rejected"],
        "xasflow_ms": now["ms"],
        "larch_ms": float(np.mean([r["larch_ms"] for r in rows if "larch_ms" in r])),
        "larch_failed": [r["file"] for r in rows if "larch_failed" in r],
        "targets": {
            "e0_abs_diff_median_ev": 0.3,
            "edge_step_rel_diff_median": 0.03,
            "edge_step_rel_diff_p90": 0.10,
            "failed": 0,
        },
        "feff_range_step_rel_diff": {
            "what": "long scans (>= E0+300 eV): |step with the post-edge cut at E0+120 eV, "
            "as FEFF's range allows / default step - 1|",
            "n": len(ranged),
            "median": float(np.median(ranged)) if ranged else None,
            "p90": float(np.percentile(ranged, 90)) if ranged else None,
        },
        "after": now,
        "before_legacy": before,
        "params": variants["xasflow"].model_dump(mode="json"),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if not args.no_feff and Path(args.feff).exists():
        report["feff_cu"] = _feff_outliers(Path(args.feff))
        print("FEFF Cu |y| > 2 / > 5:", {k: v for k, v in report["feff_cu"].items()})
    write_json(args.json, report)
    show = ("e0_abs_diff_median_ev", "edge_step_rel_diff_median", "edge_step_rel_diff_p90")
    for label, s in (("after", now), ("before", before)):
        print(label, {k: round(s[k], 4) for k in show}, "rejected", s["rejected"], end=" ")
        print("failed", s["failed"], f"{s['ms']:.3f} ms")
    print(f"larch {report['larch_ms']:.2f} ms/spectrum, files {len(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
