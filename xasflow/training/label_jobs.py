"""Structure labels of many materials as ``dask.distributed`` tasks (one task per material).

Used by :mod:`xasflow.training.dataset` (which caches the results on disk); the same code runs
on a LocalCluster or on any scheduler (see :mod:`xasflow.training.cluster`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from xasflow.training import label_average as LA
from xasflow.training import labels as L

if TYPE_CHECKING:
    from pymatgen.core import Structure


def unusable_structure(structure: Structure) -> str:
    """Why a parsed structure cannot be labelled ("" when it can): a lattice or coordinate
    that is not finite (VASP writes NaN when a relaxation blows up; pymatgen parses it) or a
    cell of no volume. spglib, under BVAnalyzer and the multiplicities, does not raise on
    these: it crashes the process (SIGSEGV), or with dask loses the worker."""
    if not np.isfinite(structure.lattice.matrix).all():
        return "the lattice is not finite"
    if not np.isfinite(structure.frac_coords).all():
        return "a site's coordinates are not finite"
    if not structure.volume > 1e-6:
        return f"the cell has no volume ({structure.volume:.3g} A^3)"
    return ""


def _material_job(
    job: tuple[str, str, tuple[int, ...]],
) -> tuple[str, tuple[int, ...], list[L.LabelResult], dict[int, int]]:
    """Labels and multiplicities of one material's computed sites (runs in a worker)."""
    material_id, poscar, sites = job
    warnings.filterwarnings("ignore")
    from pymatgen.core import Structure

    try:
        structure = Structure.from_str(poscar, fmt="poscar")
        detail = unusable_structure(structure)
    except Exception as exc:  # pymatgen raises many kinds here
        detail = f"{type(exc).__name__}: {exc}"
    if detail:
        return (
            material_id,
            sites,
            [L.LabelFailure(material_id, i, "bad_structure", detail) for i in sites],
            {},
        )
    try:
        results = L.label_sites(structure, sites, material_id)
    except MemoryError:  # the worker's trouble: the job counts the sites worker_lost (uncached)
        raise
    except Exception as exc:
        results = [L.LabelFailure(material_id, i, "label_error", str(exc)) for i in sites]
    return material_id, sites, results, LA.site_multiplicities(structure, sites)


def compute_labels(
    jobs: list[tuple[str, str, tuple[int, ...]]],
    n_jobs: int = 2,
    progress: bool = True,
    scheduler: str | None = None,
) -> tuple[dict[tuple[str, int], L.LabelResult], dict[tuple[str, int], int]]:
    """Labels and multiplicities for ``(material_id, poscar, sites)`` jobs, one dask task each.

    Tasks run on ``scheduler`` (or ``$XASFLOW_SCHEDULER``), else on a LocalCluster of
    ``n_jobs`` workers; with ``n_jobs=1`` and no scheduler they run inline. A task whose
    worker dies, or runs out of memory, gives ``worker_lost`` failures for its sites (never
    cached: labelled again at the next build) instead of stopping the job.
    """
    from xasflow.training.cluster import dask_client, scheduler_address

    labels: dict[tuple[str, int], L.LabelResult] = {}
    mult: dict[tuple[str, int], int] = {}

    def keep(mid: str, sites: tuple[int, ...], res: list[L.LabelResult], m: dict) -> None:
        for site, item in zip(sites, res, strict=True):
            labels[(mid, site)] = item
            mult[(mid, site)] = m.get(site, 1)

    def lose(mid: str, sites: tuple[int, ...], exc: BaseException) -> None:
        """The material's sites as ``worker_lost`` (never cached)."""
        lost = L.LabelFailure(mid, 0, "worker_lost", repr(exc)[:500])
        keep(mid, sites, [replace(lost, site_index=s) for s in sites], {})

    bar = tqdm(total=len(jobs), desc="labels", unit="material", disable=not progress)
    try:
        if scheduler_address(scheduler) is None and (n_jobs <= 1 or len(jobs) <= 1):
            for job in jobs:
                try:
                    keep(*_material_job(job))
                except MemoryError as exc:  # as a worker lost to it: labelled again next time
                    lose(job[0], job[2], exc)
                bar.update(1)
            return labels, mult
        from distributed import as_completed

        with dask_client(scheduler, n_jobs) as client:
            # big cells first, so a slow BVAnalyzer run does not end up alone at the tail
            futures = {
                client.submit(_material_job, job, pure=False, priority=len(job[1])): job
                for job in jobs
            }
            for future in as_completed(futures):
                mid, _, sites = futures[future]
                try:
                    keep(*future.result())
                except Exception as exc:  # the worker died (KilledWorker) or was lost
                    lose(mid, sites, exc)
                bar.update(1)
    finally:
        bar.close()
    return labels, mult
