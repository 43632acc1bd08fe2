"""One stack of spectra as plain data: what the batched alignment and preparation need, and
what they give back, so the same function runs in the processing thread or in the
preparation process (:mod:`xasflow.daemon.prep_worker`).

:func:`job_for` gathers a group of :class:`~xasflow.daemon.batch_prep.Work` sharing axis,
element, edge and bundle into a :class:`StackJob` (arrays, no objects with behaviour);
:func:`run_job` aligns on the reference foil, prepares every row
(:func:`~xasflow.spectra.batch.prepare_batch`) and, given the bundle's predictor, runs its
graphs on the prepared rows; :func:`apply_result` writes the outcome back into the works.
Flags, shifts and prepared spectra are those of the in-thread path to the last bit: it is
the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from xasflow.models.integrity import MAX_GRAPH_BYTES
from xasflow.spectra import Prepared, SpectrumError, edge_energy
from xasflow.spectra.batch import prepare_batch
from xasflow.spectra.e0_batch import alignment_shift_batch, has_edge_batch
from xasflow.spectra.process import PrepParams

if TYPE_CHECKING:
    from xasflow.daemon.batch_prep import Work
    from xasflow.models.predictor import Predictor

__all__ = ["StackJob", "StackResult", "apply_result", "job_for", "run_job"]

#: The ONNX outputs of a batch: graph file -> output name -> array (rows of ``ok_rows``).
Raw = dict[str, dict[str, np.ndarray]]


@dataclass
class StackJob:
    """The arrays of one stack: rows share ``energy``, element, edge and the bundle."""

    energy: np.ndarray  # (m,)
    mu: np.ndarray  # (n, m)
    it: np.ndarray | None  # (n, m) rows with a usable pair of foil channels, else None
    ir: np.ndarray | None
    has_keys: np.ndarray  # (n,) bool: the row has It and Ir channels ("no_reference" if not)
    has_pair: np.ndarray  # (n,) bool: ... both of the energy's length
    element: str | None
    edge: str
    prep: PrepParams
    metas: list[dict[str, Any]]
    align: bool
    max_shift: float
    search: float
    bundle_path: str = ""  # the bundle the rows were given to (for the graphs, if run there)
    manifest_digest: str = ""  # Predictor.manifest_digest of the bundle the registry serves
    max_graph_bytes: int = MAX_GRAPH_BYTES  # the limit the registry loaded the bundle under


@dataclass
class StackResult:
    """Per row: flags to add, the alignment shift (None: not applied) and the prepared
    spectrum or its error; with graphs run, their outputs for the ``ok_rows``."""

    flags: list[list[str]]
    shifts: list[float | None]
    prepared: list[Prepared | SpectrumError]
    raw: Raw | None = None
    ok_rows: list[int] = field(default_factory=list)


def job_for(
    group: list[Work], align: bool, max_shift: float, search: float, with_bundle: bool = False
) -> StackJob:
    """The stack of ``group`` (works with a spectrum on the very same energy axis)."""
    first = group[0]
    assert first.spectrum is not None and first.predictor is not None
    energy = first.spectrum.energy
    keys = [("it" in w.channels and "ir" in w.channels) for w in group]
    pair = [
        k
        and np.shape(w.channels["it"]) == energy.shape
        and np.shape(w.channels["ir"]) == energy.shape
        for k, w in zip(keys, group, strict=True)
    ]
    has_keys, has_pair = np.array(keys, dtype=np.bool_), np.array(pair, dtype=np.bool_)
    it = ir = None
    if align and has_pair.any():
        rows = np.flatnonzero(has_pair).tolist()
        it = np.array([np.asarray(group[r].channels["it"], dtype=np.float64) for r in rows])
        ir = np.array([np.asarray(group[r].channels["ir"], dtype=np.float64) for r in rows])
    predictor = first.predictor
    return StackJob(
        energy=energy,
        mu=np.array([w.spectrum.mu for w in group if w.spectrum is not None]),
        it=it,
        ir=ir,
        has_keys=has_keys,
        has_pair=has_pair,
        element=first.spectrum.element,
        edge=first.spectrum.edge,
        prep=predictor.prep,
        metas=[w.spectrum.meta for w in group if w.spectrum is not None],  # run_job copies
        align=align,
        max_shift=max_shift,
        search=search,
        bundle_path=str(predictor.path) if with_bundle else "",
        manifest_digest=predictor.manifest_digest if with_bundle else "",
        max_graph_bytes=predictor.max_graph_bytes,
    )


def _foil_rows(job: StackJob, flags: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """ln(It/Ir) of the rows with a usable foil, and which rows those are."""
    n = job.mu.shape[0]
    ref = np.ones((n, job.energy.size))
    usable = np.zeros(n, dtype=bool)
    rows = np.flatnonzero(job.has_pair)
    if rows.size and job.it is not None and job.ir is not None:
        it, ir = job.it, job.ir
        with np.errstate(invalid="ignore", divide="ignore"):
            good = (np.isfinite(it) & np.isfinite(ir) & (it > 0) & (ir > 0)).all(axis=1)
            ref[rows[good]] = np.log(it[good] / ir[good])
        usable[rows[good]] = True
    for r in range(n):
        if not job.has_keys[r]:
            flags[r].append("no_reference")
        elif not usable[r]:
            flags[r].append("align_failed")  # as mu_from_channels / Spectrum would have raised
    return ref, usable


def _align(job: StackJob, flags: list[list[str]], shifts: list[float | None]) -> None:
    ref, usable = _foil_rows(job, flags)
    rows = np.flatnonzero(usable)
    if not rows.size:
        return
    assert job.element is not None
    try:
        tab = edge_energy(job.element, job.edge)
    except KeyError:
        for r in rows.tolist():
            flags[r].append("align_failed")
        return
    found, errors = alignment_shift_batch(job.energy, ref[rows], job.element, job.edge, job.search)
    clear = has_edge_batch(job.energy, ref[rows], tab - np.nan_to_num(found))
    for k, r in enumerate(rows.tolist()):
        if errors[k] is not None or not clear[k]:
            flags[r].append("align_failed")
        elif abs(found[k]) > job.max_shift:
            flags[r].append("align_out_of_range")
        else:
            shifts[r] = float(found[k])


def run_job(job: StackJob, predictor: Predictor | None = None) -> StackResult:
    """Align (when asked), prepare every row and, given ``predictor``, run its graphs."""
    n = job.mu.shape[0]
    flags: list[list[str]] = [[] for _ in range(n)]
    shifts: list[float | None] = [None] * n
    if job.align:
        _align(job, flags, shifts)
    metas = []
    for meta, shift in zip(job.metas, shifts, strict=True):
        meta = dict(meta)
        if shift is not None:
            meta["energy_shift"] = meta.get("energy_shift", 0.0) + shift
        metas.append(meta)
    offsets = np.array([0.0 if s is None else s for s in shifts])
    prepared = prepare_batch(
        job.energy, job.mu, job.prep, job.element, job.edge, shifts=offsets, metas=metas
    )
    out = StackResult(flags, shifts, prepared)
    if predictor is not None:
        out.ok_rows = [i for i, p in enumerate(prepared) if isinstance(p, Prepared)]
        if out.ok_rows:
            chosen = [prepared[i] for i in out.ok_rows]
            out.raw = predictor.run(predictor.model_input(chosen))  # type: ignore[arg-type]
    return out


def apply_result(group: list[Work], result: StackResult) -> None:
    """The stack's outcome into its works (flags after the ones they carry, as in-thread)."""
    for w, add, shift, res in zip(group, result.flags, result.shifts, result.prepared, strict=True):
        w.flags.extend(add)
        w.shift = shift
        if isinstance(res, SpectrumError):
            w.fail(res.reason, res.message)
        else:
            w.prepared = res
