"""Benchmark: FEFF10 cost per site for each preset against spectrum quality, dask speedup, labels.

* ``seconds_per_site``: one NiO Ni K-edge site (rock salt, one unique site) per preset, one
  worker. Quality: the spectrum prepared as the model sees it (``TrainConfig().prep``: E0,
  edge-step normalisation, -3.5..116.5 eV) compared with the most converged preset that ran
  (RMS and max difference, E0 shift).
* ``speedup_2_workers``: the same sites (NiO at four lattice constants) with the cheapest
  preset on a LocalCluster of 1 and of 2 workers (wall time of the job; the cluster's start
  is timed apart).
* ``labels_seconds_cold`` (``--labels``): the shared Cu set's labels on 2 workers with an
  empty temporary cache (beside the multiprocessing pool's ~500 s).
* ``estimate``: a full element (``--estimate-sites``) on clusters of N cores.

The work directory keeps the trees: a re-run reuses finished sites (their recorded seconds,
marked ``reused``). A tree ``generate`` would refuse to resume (made with other code versions
or preset parameters, e.g. before an upgrade) is kept, and the preset runs in a tree beside
it keyed by this code and preset; ``trees`` says for each preset which tree ran and how
(``new``, ``resumed``, ``keyed`` with the refusal, ``fresh``). Timings on a shared machine
carry its load average, recorded here.

    .venv/bin/python bench/generate.py --json bench/results/generate.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import write_report

from xasflow import paths
from xasflow.adapters.feff import read_feff_tree
from xasflow.spectra import prepare
from xasflow.training.cluster import dask_client
from xasflow.training.feff_inputs import PRESETS
from xasflow.training.fit import TrainConfig
from xasflow.training.generate import GENERATION_FILE, code_versions, generate, resume_refusal

NIO_A = 4.177  # Å, rock-salt NiO at room temperature


def _nio(directory: Path, scales: tuple[float, ...]) -> Path:
    from pymatgen.core import Lattice, Structure

    directory.mkdir(parents=True, exist_ok=True)
    for k, scale in enumerate(scales):
        s = Structure.from_spacegroup(
            "Fm-3m", Lattice.cubic(NIO_A * scale), ["Ni", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
        )
        s.to(filename=str(directory / (f"NiO-{k}.cif" if len(scales) > 1 else "NiO.cif")))
    return directory


def _site_seconds(tree: Path, key: str = "seconds") -> list[float]:
    """Recorded wall (``seconds``) or CPU (``cpu_seconds``) time of each finished site."""
    record = json.loads((tree / GENERATION_FILE).read_text())
    return [
        site[key]
        for material in record["materials"].values()
        for site in material["sites"].values()
        if site.get(key)
    ]


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 1) if values else None


def preset_tree(work: Path, name: str) -> tuple[Path, dict[str, str]]:
    """The tree preset ``name``'s NiO site is generated into, and how it was chosen.

    ``work/presets/NAME`` unless ``generate`` would refuse to resume it: then
    ``work/presets/NAME-KEY``, KEY a digest of this code's versions and the preset's
    parameters (the refused tree is kept for the code that made it); that one is started
    afresh only if it too would be refused (its record edited or unreadable).
    """
    tree = work / "presets" / name
    why = resume_refusal(tree, "Ni", name)
    if why is None:
        how = "resumed" if (tree / GENERATION_FILE).exists() else "new"
        return tree, {"tree": str(tree), "how": how}
    what = {"code": code_versions(None), "preset": PRESETS[name].settings()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    keyed = tree.with_name(f"{name}-{key}")
    said = {"tree": str(keyed), "how": "keyed", "why": why}
    if (keyed / GENERATION_FILE).exists():
        if resume_refusal(keyed, "Ni", name) is None:
            return keyed, {**said, "how": "keyed, resumed"}
        shutil.rmtree(keyed)  # the bench's own tree, not as it made it
        return keyed, {**said, "how": "fresh"}
    return keyed, said


def presets(work: Path, names: list[str]) -> dict[str, Any]:
    """Cost per site and quality against the most converged preset that completed."""
    structures = _nio(work / "structures" / "nio", (1.0,))
    out: dict[str, Any] = {}
    prep = TrainConfig().prep
    prepared = {}
    for name in names:
        tree, chosen = preset_tree(work, name)
        if chosen["how"] not in ("new", "resumed"):
            print(f"preset {name}: {chosen['how']} tree {tree}; {chosen.get('why', '')}")
        t0 = time.perf_counter()
        report = generate(structures, "Ni", tree, name, workers=1, progress=False)
        out[name] = {
            "params": PRESETS[name].to_dict(),
            "tree": chosen,
            "seconds_per_site": _mean(_site_seconds(tree)),
            "cpu_seconds_per_site": _mean(_site_seconds(tree, "cpu_seconds")),
            "reused": report.computed == 0 and report.skipped_complete > 0,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "failures": [f.__dict__ for f in report.failures],
            "loadavg_after": os.getloadavg()[0],
        }
        sites = list(read_feff_tree(tree, element="Ni").sites())
        if sites:
            prepared[name] = prepare(sites[0].to_spectrum(), prep)
    ranked = [n for n in reversed(list(PRESETS)) if n in prepared]  # most converged first
    if ranked:
        ref = prepared[ranked[0]]
        for name, p in prepared.items():
            diff = p.y - ref.y
            out[name]["quality_vs"] = ranked[0]
            out[name]["rms_diff"] = round(float(np.sqrt(np.mean(diff**2))), 4)
            out[name]["max_abs_diff"] = round(float(np.max(np.abs(diff))), 4)
            out[name]["e0_shift_ev"] = round(float(p.e0 - ref.e0), 2)
    return out


def speedup(work: Path, preset: str, n_sites: int) -> dict[str, Any]:
    """Wall time of the same sites on a LocalCluster of 1 and of 2 workers."""
    scales = tuple(1.0 + 0.01 * k for k in range(n_sites))
    structures = _nio(work / "structures" / "speedup", scales)
    walls = {}
    for workers in (1, 2):
        tree = work / "speedup" / f"{workers}-workers"
        shutil.rmtree(tree, ignore_errors=True)  # always computed afresh
        load = os.getloadavg()[0]
        t_start = time.perf_counter()
        with dask_client(workers=workers) as client:
            client.wait_for_workers(workers)
            t0 = time.perf_counter()
            report = generate(structures, "Ni", tree, preset, progress=False, client=client)
            wall = time.perf_counter() - t0
        walls[workers] = {
            "wall_seconds": round(wall, 1),
            "cluster_start_seconds": round(t0 - t_start, 1),
            "cpu_seconds": round(sum(_site_seconds(tree, "cpu_seconds")), 1),
            "computed": report.computed,
            "failed": len(report.failures),
            "loadavg_before": load,
            "loadavg_after": os.getloadavg()[0],
        }
    return {
        "preset": preset,
        "sites": n_sites,
        "runs": walls,
        "speedup_2_workers": round(walls[1]["wall_seconds"] / walls[2]["wall_seconds"], 2),
    }


def labels_cold(jobs: int) -> dict[str, Any]:
    """Label the shared Cu set from an empty temporary cache on ``jobs`` dask workers."""
    from xasflow.training.dataset import build_feff_dataset

    archive = paths.cu_feff_archive()
    saved = os.environ.get(paths.CACHE_ENV)
    with tempfile.TemporaryDirectory(prefix="xasflow-labels-") as tmp:
        os.environ[paths.CACHE_ENV] = tmp
        try:
            t0 = time.perf_counter()
            ds = build_feff_dataset(archive, "Cu", n_jobs=jobs, progress=False)
            seconds = time.perf_counter() - t0
        finally:
            if saved is None:
                os.environ.pop(paths.CACHE_ENV)
            else:
                os.environ[paths.CACHE_ENV] = saved
    return {"labels_seconds_cold": round(seconds, 1), "rows": len(ds), "workers": jobs}


def estimate(per_site: dict[str, float | None], sites: int, efficiency: float) -> dict[str, Any]:
    """Hours for ``sites`` sites on N cores from CPU seconds per site (FEFF10 is serial)."""
    cores = (2, 16, 64, 256)
    return {
        name: {f"{n}_cores_hours": round(sites * s / (n * efficiency) / 3600, 1) for n in cores}
        for name, s in per_site.items()
        if s
    }


def main() -> int:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "xasflow-bench-generate"),
        help="the generated trees are kept here (re-runs reuse finished sites)",
    )
    ap.add_argument(
        "--presets", default="fast,standard", help="comma-separated preset names ('' for none)"
    )
    ap.add_argument("--speedup-sites", type=int, default=4, help="0 skips the speedup runs")
    ap.add_argument("--labels", action="store_true", help="also time cold labels (~10 CPU-min)")
    ap.add_argument("--estimate-sites", type=int, default=3000)
    args = ap.parse_args()
    work = Path(args.work)
    names = [n for n in args.presets.split(",") if n]
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "structure": f"NiO rock salt a={NIO_A} A, Ni K edge, one unique site (multiplicity 4)",
    }
    result["presets"] = presets(work, names)
    result["trees"] = {n: v["tree"] for n, v in result["presets"].items()}
    result["seconds_per_site"] = {n: v["seconds_per_site"] for n, v in result["presets"].items()}
    result["cpu_seconds_per_site"] = {
        n: v["cpu_seconds_per_site"] for n, v in result["presets"].items()
    }
    efficiency = 1.0
    if args.speedup_sites and names:
        cheapest = min(names, key=lambda n: result["cpu_seconds_per_site"][n] or float("inf"))
        result["speedup"] = speedup(work, cheapest, args.speedup_sites)
        result["speedup_2_workers"] = result["speedup"]["speedup_2_workers"]
        efficiency = min(1.0, result["speedup_2_workers"] / 2)
    if args.labels:
        result["labels"] = labels_cold(2)
        result["labels_seconds_cold"] = result["labels"]["labels_seconds_cold"]
    else:
        result["labels_seconds_cold"] = None
        result["labels_note"] = "not measured (run with --labels)"
    result["labels_baseline_seconds"] = 500  # the multiprocessing pool, 2 cores (issue 12)
    result["estimate"] = {
        "sites": args.estimate_sites,
        "parallel_efficiency": round(efficiency, 2),
        "basis": "cpu_seconds_per_site (wall time on this shared machine is several times it)",
        "hours": estimate(result["cpu_seconds_per_site"], args.estimate_sites, 1.0),
        "hours_at_measured_efficiency": estimate(
            result["cpu_seconds_per_site"], args.estimate_sites, efficiency
        ),
    }
    out = write_report(args.json, result, {k: v for k, v in result.items() if k != "presets"})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
