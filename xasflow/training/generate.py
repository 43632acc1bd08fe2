"""FEFF10 training spectra generated from structures, one dask task per symmetry-unique site.

``xasflow dataset generate`` reads CIF/POSCAR structures (a directory or a tar), finds the
symmetry-unique sites of the absorbing element (pymatgen's SpacegroupAnalyzer), writes each
site's ``feff.inp`` with a named :mod:`~xasflow.training.feff_inputs` preset, runs FEFF10
(feff10-rs) as a ``dask.distributed`` task and writes the Lightshow layout that
:func:`xasflow.adapters.feff.read_feff_tree` reads::

    TREE/generation.json                    element, edge, preset and its parameters, sites
    TREE/failures.json                      every failed item of the last run, with reason
    TREE/<material>/POSCAR
    TREE/<material>/FEFF-XANES/NNN_<El>/{feff.inp, feff.out, xmu.dat}

Workers return the files' text (:func:`~xasflow.training.feff_site.run_site`, one site) and
the client (this module: plan, submit, write) writes them, so a remote cluster needs no
shared file system. A site whose ``xmu.dat`` parses completely is skipped on a re-run, which
must use the preset and the code versions (pymatgen, feff10-rs) the tree records.
Default preset: ``standard`` (see ``bench/generate.py`` for cost against quality).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xasflow.adapters.feff_xmu import parse_xmu
from xasflow.training.feff_inputs import (
    DEFAULT_PRESET,
    Failure,
    FeffPreset,
    InputStructure,
    get_preset,
    read_structures,
    unique_sites,
)
from xasflow.training.feff_site import Runner, SiteOutcome, SiteTask, run_site

SCHEMA = "xasflow.generation/1"
GENERATION_FILE = "generation.json"
FAILURES_FILE = "failures.json"


@dataclass
class GenerationReport:
    """Counts and failures of one ``generate`` call."""

    out: Path
    preset: str
    n_materials: int = 0
    n_sites: int = 0
    skipped_complete: int = 0
    computed: int = 0
    failures: list[Failure] = field(default_factory=list)
    site_seconds: dict[str, float] = field(default_factory=dict)
    site_cpu_seconds: dict[str, float] = field(default_factory=dict)
    not_absorbing: int = 0
    wall_seconds: float = 0.0

    def failure_counts(self) -> dict[str, int]:
        """Number of failures per reason tag."""
        return dict(sorted(Counter(f.reason for f in self.failures).items()))

    def summary(self) -> str:
        """One paragraph for the command line."""
        fails = self.failure_counts()
        return (
            f"{self.out}: {self.n_sites} unique sites in {self.n_materials} materials "
            f"(preset {self.preset}): {self.computed} computed, {self.skipped_complete} already "
            f"complete, {len(self.failures)} failed"
            + (f" ({', '.join(f'{k} {v}' for k, v in fails.items())})" if fails else "")
            + (
                f"; {self.not_absorbing} structures without the element"
                if self.not_absorbing
                else ""
            )
            + f"; {self.wall_seconds:.0f} s"
        )


def site_complete(site_dir: Path) -> bool:
    """True when ``site_dir/xmu.dat`` exists and parses as a complete FEFF spectrum."""
    try:
        parse_xmu((site_dir / "xmu.dat").read_bytes())
    except (OSError, ValueError):
        return False
    return True


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outcome(out: Path, outcome: SiteOutcome) -> None:
    """Write a site's files (xmu.dat last, so its presence means complete; none on failure)."""
    site = out / outcome.task.site_dir
    for name in sorted(outcome.files, key=lambda n: n == "xmu.dat"):
        _write_text(site / name, outcome.files[name])


def generation_record(tree: str | Path) -> dict[str, Any] | None:
    """The ``generation.json`` of a generated tree (preset, element, sites), or None.

    For training code that records the FEFF preset of its data in the bundle manifest.
    """
    path = Path(tree) / GENERATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _load_record(
    out: Path, preset: FeffPreset, element: str, edge: str, code: dict[str, str]
) -> dict[str, Any]:
    """The tree's generation record; a ValueError if it was made with other settings or code.

    The record names one preset and one set of code versions for every site of the tree, so
    a resume under other versions (a newer pymatgen writes other cards, a newer FEFF other
    spectra) is refused rather than recorded as if the earlier sites came from it too. The
    preset's description is not compared (a tree written before it was reworded resumes,
    and the record takes the current words); every other parameter is.
    """
    path = out / GENERATION_FILE
    if not path.exists():
        return {"materials": {}}
    record = json.loads(path.read_text(encoding="utf-8"))
    params = record.get("preset", {}).get("params")
    if isinstance(params, dict):  # its description may be worded otherwise: not compared
        params = {k: v for k, v in params.items() if k != "description"}
    theirs = (record.get("element"), record.get("edge"), params)
    if theirs != (element, edge, preset.settings()):
        raise ValueError(
            f"{out} was generated for {theirs[0]} {theirs[1]} with preset "
            f"{record.get('preset', {}).get('name')!r}; use another --out to change settings"
        )
    made_with = record.get("code") or {}
    if made_with != code:
        differ = ", ".join(
            f"{k} {made_with.get(k, 'unrecorded')} (now {code.get(k, 'absent')})"
            for k in sorted(made_with.keys() | code.keys())
            if made_with.get(k) != code.get(k)
        )
        raise ValueError(
            f"{out} was generated with other code: {differ}; resume it with the versions it "
            "was made with, or use another --out"
        )
    return record


def resume_refusal(
    out: str | Path, element: str, preset: str = DEFAULT_PRESET, edge: str = "K",
    runner: Runner | None = None,
) -> str | None:  # fmt: skip
    """Why :func:`generate` would refuse to go on with the tree at ``out`` (made with other
    settings or code versions, or an unreadable record), or None: no tree yet, or one it
    resumes. Reads only; for callers that pick another tree instead of failing (the bench)."""
    norm = element.strip().capitalize(), edge.strip().upper()
    try:
        _load_record(Path(out), get_preset(preset), *norm, code_versions(runner))
    except ValueError as exc:  # json's decode error is one too
        return str(exc)
    return None


def plan_sites(
    structures: list[InputStructure], element: str, edge: str, out: Path, record: dict[str, Any]
) -> tuple[list[SiteTask], int, list[Failure]]:
    """Write each POSCAR, list the unique sites in ``record`` and return the sites to run.

    Returns the tasks, the number of sites already complete, and failures: a POSCAR that
    differs from the one already in the tree (its sites' indices would not match), or a
    structure spglib would crash this process on (``bad_structure``: NaN lattice or
    coordinates, no volume), which is left out before its POSCAR is written.
    """
    from pymatgen.core import Structure

    from xasflow.training.label_jobs import unusable_structure

    tasks: list[SiteTask] = []
    done = 0
    failures: list[Failure] = []
    for item in structures:
        poscar_path = out / item.material_id / "POSCAR"
        if poscar_path.exists() and poscar_path.read_text(encoding="utf-8") != item.poscar:
            detail = f"{item.source} differs from {poscar_path}; remove that material to redo it"
            failures.append(Failure(item.material_id, "structure_changed", detail))
            continue
        structure = Structure.from_str(item.poscar, fmt="poscar")
        why = unusable_structure(structure)
        if why:  # spglib (unique_sites) does not raise on these: it kills the process
            failures.append(Failure(item.material_id, "bad_structure", f"{item.source}: {why}"))
            continue
        _write_text(poscar_path, item.poscar)
        sites, symprec = unique_sites(structure, element)
        before = record["materials"].get(item.material_id, {}).get("sites", {})
        record["materials"][item.material_id] = {
            "source": item.source,
            "symprec": symprec,
            "n_absorbers": sum(s.multiplicity for s in sites),
            "sites": {
                f"{s.index:03d}": {
                    **before.get(f"{s.index:03d}", {}),  # timings of an earlier run
                    "multiplicity": s.multiplicity,
                    "equivalent": list(s.equivalent),
                }
                for s in sites
            },
        }
        for s in sites:
            task = SiteTask(item.material_id, s.index, element, edge, item.poscar)
            if site_complete(out / task.site_dir):
                done += 1
            else:
                tasks.append(task)
    return tasks, done, failures


def _save_record(out: Path, record: dict[str, Any], report: GenerationReport) -> None:
    for key, seconds in report.site_seconds.items():
        mid, site = key.split("/")
        entry = record["materials"][mid]["sites"][site]
        entry["seconds"] = round(seconds, 1)
        entry["cpu_seconds"] = round(report.site_cpu_seconds.get(key, 0.0), 1)
    _write_text(out / GENERATION_FILE, json.dumps(record, indent=1) + "\n")
    failures = {
        "counts": report.failure_counts(),
        "failures": [f.__dict__ for f in report.failures],
    }
    _write_text(out / FAILURES_FILE, json.dumps(failures, indent=1) + "\n")


def generate(
    structures: str | Path,
    element: str,
    out: str | Path,
    preset: str = DEFAULT_PRESET,
    edge: str = "K",
    scheduler: str | None = None,
    workers: int = 2,
    runner: Runner | None = None,
    progress: bool = True,
    limit: int | None = None,
    client: Any = None,
) -> GenerationReport:
    """Compute the spectra of every unique ``element`` site of ``structures`` into ``out``.

    Runs one dask task per site on ``client``, or on :func:`~xasflow.training.cluster.dask_client`
    (``scheduler`` address, else a LocalCluster of ``workers``). Completed sites are skipped (a
    tree made with another preset or other code versions is refused); failures are counted,
    kept in ``failures.json`` and returned; ``runner`` replaces FEFF10.
    """
    from tqdm import tqdm

    from xasflow.training.cluster import dask_client

    t0 = time.perf_counter()
    params = get_preset(preset)
    element, edge, out = element.strip().capitalize(), edge.strip().upper(), Path(out)
    code = code_versions(runner)
    record = _load_record(out, params, element, edge, code)
    record.update(
        schema=SCHEMA,
        element=element,
        edge=edge,
        preset={"name": params.name, "params": params.to_dict()},
        code=code,
    )
    inputs, failures, without = read_structures(structures, element=element, limit=limit)
    report = GenerationReport(out=out, preset=params.name, failures=failures, not_absorbing=without)
    tasks, report.skipped_complete, planned = plan_sites(inputs, element, edge, out, record)
    report.failures += planned
    report.n_materials = len(inputs) - len(planned)
    report.n_sites = report.skipped_complete + len(tasks)
    _save_record(out, record, report)
    if tasks:
        from distributed import as_completed

        bar = tqdm(
            total=report.n_sites, initial=report.skipped_complete, desc="FEFF sites", unit="site",
            disable=not progress,
        )  # fmt: skip
        with dask_client(scheduler, workers) if client is None else nullcontext(client) as cl:
            futures = [
                cl.submit(
                    run_site, t, params, runner, pure=False, key=task_key(t, params, out, code)
                )
                for t in tasks
            ]
            by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
            try:
                for future in as_completed(futures):
                    task = by_key[future.key]
                    try:
                        outcome = future.result()
                    except Exception as exc:  # the worker died (KilledWorker) or was lost
                        outcome = SiteOutcome(task, 0.0, reason="worker_lost", detail=repr(exc))
                    _record_outcome(out, outcome, report)
                    bar.update(1)
                    bar.set_postfix(failed=len(report.failures))
            finally:
                bar.close()
                _save_record(out, record, report)
    report.wall_seconds = time.perf_counter() - t0
    _save_record(out, record, report)
    return report


def task_key(task: SiteTask, preset: FeffPreset, out: Path, code: dict[str, str]) -> str:
    """The dask key of ``task``: its site directory and a hash of everything it computes from.

    A scheduler hands a submit of a key it already holds the result of that key, so on one
    shared scheduler (``$XASFLOW_SCHEDULER``) two runs must not share a key unless they compute
    the same thing into the same place: the hash covers the structure, absorber, edge, preset
    parameters, the code that runs FEFF and the absolute output directory.
    """
    what = {
        "task": asdict(task),
        "preset": preset.settings(),
        "code": code,
        "out": str(out.resolve()),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return f"feff-{task.site_dir}-{digest}"


def _record_outcome(out: Path, outcome: SiteOutcome, report: GenerationReport) -> None:
    key = f"{outcome.task.material_id}/{outcome.task.site_index:03d}"
    report.site_seconds[key] = outcome.seconds
    report.site_cpu_seconds[key] = outcome.cpu_seconds
    if outcome.reason:
        item = f"{outcome.task.material_id}/{outcome.task.site_index:03d}_{outcome.task.element}"
        report.failures.append(Failure(item, outcome.reason, outcome.detail))
    else:
        report.computed += 1
    write_outcome(out, outcome)


def code_versions(runner: Runner | None) -> dict[str, str]:
    """Versions of the code that computes the spectra (for the generation record)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"runner": "feff10" if runner is None else getattr(runner, "__name__", str(runner))}
    for package in ("feff10-rs", "pymatgen"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
