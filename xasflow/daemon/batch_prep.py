"""A batch's spectra from the scan to the model input: the pipeline's steps 1-5.

Per spectrum (:func:`start_work`): element and edge, the bundle, mu from the channels
(steps 1-3 of :mod:`xasflow.daemon.pipeline`). Then alignment and preparation (steps 4-5),
the fast path: spectra of one batch that share an energy axis, element, edge and bundle
(a fly-scan page, a burst of fly events of one run) are stacked: the reference-foil shift,
its edge check and the bundle's preparation run once over the stack
(:mod:`xasflow.spectra.batch`). Everything else, and any group of one, takes the
single-spectrum path (:func:`finish_one`); so does a group whose batched code raises (a
bug), every spectrum of a batch whose grouping raises, and the stacks whose results the
preparation process hands back but cannot be collected, so a batch never loses its spectra.
The per-spectrum outcome is the same either way: flags, shift, prepared spectrum or
rejection reason (the parity tests of :mod:`xasflow.spectra.batch`). The graphs of what was
prepared here run batched per predictor (:func:`predict_works`; one by one when the batched
path raises).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from xasflow.daemon.outputs import ScanSpectrum
from xasflow.daemon.stack_job import StackResult, apply_result, job_for, run_job
from xasflow.models.predictor import Prediction, Predictor
from xasflow.spectra import (
    Prepared,
    Spectrum,
    SpectrumError,
    alignment_shift,
    edge_energy,
    infer_edge,
    infer_edge_from_data,
    mu_from_channels,
)
from xasflow.spectra import align as shift_spectrum
from xasflow.spectra.quality import has_edge

if TYPE_CHECKING:
    from xasflow.daemon.prep_worker import PrepWorker, Ticket
    from xasflow.daemon.registry import ModelRegistry

__all__ = [
    "Pending",
    "Work",
    "finish_one",
    "predict_batch",
    "predict_works",
    "prepare_batch",
    "prepare_works",
    "refused_work",
    "start_work",
]

logger = logging.getLogger(__name__)


@dataclass
class Work:
    """One spectrum on its way through the pipeline."""

    scan: ScanSpectrum
    flags: list[str] = field(default_factory=list)
    channels: dict[str, np.ndarray] = field(default_factory=dict)  # in ascending energy order
    element: str | None = None
    edge: str | None = None
    predictor: Predictor | None = None
    spectrum: Spectrum | None = None  # mu(E), before alignment
    energy: np.ndarray | None = None  # the raw (ascending) energies the channels are on
    prepared: Prepared | None = None
    shift: float | None = None
    prediction: Prediction | None = None
    reason: str | None = None
    detail: str = ""

    def fail(self, reason: str, detail: str) -> None:
        """Record the rejection reason (the spectrum is kept as a rejected row)."""
        self.reason, self.detail = reason, detail


def refused_work(scan: ScanSpectrum, detail: str) -> Work:
    """A spectrum refused whole (``internal_error``: a bug before its steps, its run's start,
    its batch), with its scan's flags, so its row still says that events went missing."""
    work = Work(scan, flags=list(scan.flags))
    work.fail("internal_error", detail)
    return work


def start_work(
    scan: ScanSpectrum, registry: ModelRegistry, herfd: Any, calculated: Any = None
) -> Work:
    """Steps 1-3 for one spectrum (alignment and preparation follow, batched); a failure sets
    ``reason``. ``herfd``: the run's HERFD declaration (False, True or a FWHM in eV);
    ``calculated``: whether its spectra are calculations (None: guessed per spectrum)."""
    work = Work(scan, flags=list(scan.flags))
    try:
        _start_into(work, registry, herfd, calculated)
    except SpectrumError as exc:
        work.fail(exc.reason, exc.message)
    except Exception as exc:  # a bug: record the spectrum as rejected, keep serving
        logger.exception("pipeline bug on spectrum %s/%s", scan.raw_uid, scan.index)
        work.fail("internal_error", f"{type(exc).__name__}: {exc}")
    return work


def _guess_edge(energy: np.ndarray, scan: Any) -> tuple[str, str] | None:
    """The element and edge of a scan whose start names none: where mu jumps across a
    tabulated edge (:func:`infer_edge_from_data`), or, where mu cannot be had from its
    channels, from the energy range alone (:func:`infer_edge`)."""
    signal = {"transmission": "it", "fluorescence": "if"}.get(scan.mode)
    ch = scan.channels
    if signal is not None and "i0" in ch and signal in ch:
        with np.errstate(all="ignore"):
            try:
                return infer_edge_from_data(
                    energy, mu_from_channels(scan.mode, ch["i0"], ch[signal])
                )
            except (SpectrumError, ValueError):
                pass  # the checks after the guess say what is wrong with the channels
    finite = energy[np.isfinite(energy)]
    return infer_edge(float(finite.min()), float(finite.max()))


def _start_into(work: Work, registry: ModelRegistry, herfd: Any, calculated: Any) -> None:
    scan = work.scan
    energy = np.asarray(scan.energy, dtype=np.float64)
    if energy.ndim != 1 or energy.size == 0:
        raise SpectrumError("bad_channel", f"energy has shape {energy.shape}")
    element, edge = scan.element, scan.edge
    if element is None:
        finite = energy[np.isfinite(energy)]
        guess = _guess_edge(energy, scan) if finite.size else None
        if guess is None:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0, 0)
            kev = lo > 0 and infer_edge(lo * 1000, hi * 1000) is not None
            raise SpectrumError(
                "unknown_element",
                f"no element in the start document and no tabulated edge inside "
                f"{lo:.6g}-{hi:.6g} eV"
                + (" (energies in keV? an edge lies in their range times 1000)" if kev else ""),
            )
        element = guess[0]
        edge = edge or guess[1]
        work.flags.append("element_inferred")
    elif edge is None:
        finite = energy[np.isfinite(energy)]
        guess = infer_edge(float(finite.min()), float(finite.max())) if finite.size else None
        edge = guess[1] if guess is not None and guess[0] == element else "K"
    work.element, work.edge = element, edge
    predictor = registry.get(element, edge)
    if predictor is None:
        serving = ", ".join(f"{el} {ed}" for el, ed in registry.serving()) or "none"
        raise SpectrumError(
            "no_model", f"no model bundle for {element} {edge} (serving: {serving})"
        )
    work.predictor = predictor
    mode = scan.mode
    signal_name = {"transmission": "it", "fluorescence": "if"}.get(mode)
    if signal_name is None:
        raise SpectrumError("bad_channel", f"unknown measurement mode {mode!r}")
    ch = scan.channels
    if energy.size > 1 and energy[0] > energy[-1]:  # a down sweep: reverse once, not per copy
        energy = energy[::-1]
        ch = {name: np.asarray(a, dtype=np.float64)[::-1] for name, a in ch.items()}
    work.channels = ch
    if "i0" not in ch or signal_name not in ch:
        raise SpectrumError("bad_channel", f"{mode} needs i0 and {signal_name}")
    mu = mu_from_channels(mode, ch["i0"], ch[signal_name])  # type: ignore[arg-type]
    if mu.shape != energy.shape:
        raise SpectrumError("bad_channel", f"{energy.size} energies but {mu.size} channel values")
    meta: dict[str, Any] = {"raw_uid": scan.raw_uid, "index": scan.index}
    if herfd is not False:
        if not isinstance(herfd, bool | int | float):
            raise SpectrumError(
                "bad_broadening", f"herfd {herfd!r}: give true, false or the FWHM in eV"
            )
        meta["herfd"] = herfd
    if calculated is not None:
        if not isinstance(calculated, bool):
            raise SpectrumError(
                "bad_declaration", f"calculated {calculated!r}: give true, false or null"
            )
        meta["calculated"] = calculated
    work.spectrum = Spectrum(energy, mu, element, edge, meta=meta)
    work.energy = energy


def finish_one(work: Work, *, align: bool, max_shift: float, align_search: float) -> None:
    """Steps 4-5 for one spectrum: alignment and the bundle's preparation (the single path)."""
    assert work.spectrum is not None and work.predictor is not None
    try:
        spectrum = work.spectrum
        if align:
            assert work.energy is not None
            spectrum = _align_one(work, spectrum, work.energy, max_shift, align_search)
        work.prepared = work.predictor.prepare(spectrum)
    except SpectrumError as exc:
        work.fail(exc.reason, exc.message)
    except Exception as exc:  # a bug: record the spectrum as rejected, keep serving
        logger.exception("pipeline bug on spectrum %s/%s", work.scan.raw_uid, work.scan.index)
        work.fail("internal_error", f"{type(exc).__name__}: {exc}")


def _align_one(
    work: Work, spectrum: Spectrum, energy: np.ndarray, max_shift: float, search: float
) -> Spectrum:
    """Reference-foil alignment, best effort (flags say why it was not applied)."""
    ch = work.channels
    if "ir" not in ch or "it" not in ch:
        work.flags.append("no_reference")
        return spectrum
    assert work.element is not None and work.edge is not None
    try:
        tab = edge_energy(work.element, work.edge)
        ref = Spectrum(energy, mu_from_channels("reference", ch["it"], ch["ir"]))
        shift = alignment_shift(ref, work.element, work.edge, search=search)
    except (SpectrumError, KeyError):
        work.flags.append("align_failed")
        return spectrum
    if not has_edge(ref, tab - shift):
        work.flags.append("align_failed")
        return spectrum
    if abs(shift) > max_shift:
        work.flags.append("align_out_of_range")
        return spectrum
    work.shift = shift
    return shift_spectrum(spectrum, shift)


def prepare_works(
    works: Sequence[Work],
    *,
    align: bool,
    max_shift: float,
    align_search: float,
    worker: PrepWorker | None = None,
    on_bug: Callable[[], None] | None = None,
) -> Pending:
    """:func:`prepare_batch`, which never raises: a bug in the batch's path (grouping,
    stacking, the hand-over to the preparation process) prepares the works one by one here,
    so only a spectrum it fails on alone is refused (``internal_error``); ``on_bug`` is
    called for each such failure (the daemon counts it)."""
    kw: dict[str, Any] = {"align": align, "max_shift": max_shift, "align_search": align_search}
    try:
        return prepare_batch(works, **kw, worker=worker)
    except Exception:
        logger.exception("preparing a batch of %d spectra failed; one by one", len(works))
        _bug(on_bug)
    left = [w for w in works if w.prepared is None]
    _each_alone(left, lambda w: prepare_batch([w], **kw), "preparing", on_bug)
    return prepare_batch([], **kw)


def prepare_batch(
    works: Sequence[Work],
    *,
    align: bool,
    max_shift: float,
    align_search: float,
    worker: PrepWorker | None = None,
) -> Pending:
    """Align and prepare every pending work (``spectrum`` set, no ``reason``), batched by axis;
    groups of one take :func:`finish_one` at once. The stacks go to ``worker`` (the
    preparation process, which also runs their graphs) when it takes them, else they are
    prepared here: :meth:`Pending.finish` completes either way."""
    single = partial(finish_one, align=align, max_shift=max_shift, align_search=align_search)
    groups: dict[tuple[int, str, str, int], list[Work]] = {}
    for w in works:
        if w.reason is not None or w.spectrum is None:
            continue
        s = w.spectrum
        if w.energy is None or not (w.energy is s.energy or np.array_equal(w.energy, s.energy)):
            single(w)  # raw energies the Spectrum sorted or de-duplicated: channels differ
            continue
        key = (id(w.predictor), s.element or "", s.edge, s.energy.size)
        groups.setdefault(key, []).append(w)
    stacks: list[list[Work]] = []
    for group in groups.values():
        for same in _split_by_axis(group):
            if len(same) == 1:
                single(same[0])
            else:
                stacks.append(same)
    pending = Pending(stacks, single)
    if worker is not None and stacks:
        try:
            jobs = [job_for(g, align, max_shift, align_search, with_bundle=True) for g in stacks]
        except Exception:  # a bug gathering the arrays: the stacks are prepared here instead
            logger.exception("gathering %d stacks for the preparation process failed", len(stacks))
        else:
            pending.ticket = worker.submit(jobs)
    if pending.ticket is None:
        pending.finish(None)
    return pending


def predict_works(works: Sequence[Work], on_bug: Callable[[], None] | None = None) -> None:
    """Step 5's graphs for prepared works (:func:`predict_batch`), never raising: a bug in
    the batch's path predicts the works one by one here, so only a spectrum it fails on
    alone is refused (``internal_error``); ``on_bug`` is called for each such failure."""
    try:
        predict_batch(works)
        return
    except Exception:
        logger.exception("predicting a batch of %d spectra failed; one by one", len(works))
        _bug(on_bug)
    left = [w for w in works if w.prediction is None]
    _each_alone(left, lambda w: predict_batch([w]), "predicting", on_bug)


def _each_alone(
    works: Sequence[Work],
    step: Callable[[Work], object],
    what: str,
    on_bug: Callable[[], None] | None,
) -> None:
    """After a bug in a batch's step: ``step`` each work not refused yet on its own, so only
    one it fails on alone is refused (``internal_error``, ``on_bug`` called for it)."""
    for w in works:
        if w.reason is not None:
            continue
        try:
            step(w)
        except Exception as exc:
            logger.exception("%s spectrum %d of %s failed", what, w.scan.index, w.scan.raw_uid)
            _bug(on_bug)
            w.fail("internal_error", f"{type(exc).__name__}: {exc}")


def predict_batch(works: Sequence[Work]) -> None:
    """One ``predict_prepared`` call per predictor; a failing call is retried one by one, so
    a spectrum the graphs fail on is refused alone (``prediction_error``)."""
    groups: dict[int, list[Work]] = {}
    for w in works:
        groups.setdefault(id(w.predictor), []).append(w)
    for group in groups.values():
        predictor = group[0].predictor
        assert predictor is not None
        try:
            preds = predictor.predict_prepared([w.prepared for w in group])  # type: ignore[misc]
        except Exception:
            preds = None
        if preds is not None and len(preds) == len(group):
            for w, p in zip(group, preds, strict=True):
                w.prediction = p
            continue
        for w in group:
            try:
                w.prediction = predictor.predict_prepared([w.prepared])[0]  # type: ignore[list-item]
            except Exception as exc:
                w.fail("prediction_error", f"{predictor.bundle_id}: {type(exc).__name__}: {exc}")


def _bug(on_bug: Callable[[], None] | None) -> None:
    if on_bug is not None:
        on_bug()


class Pending:
    """Stacks on their way through the preparation (here, or in the preparation process)."""

    def __init__(self, stacks: list[list[Work]], single: partial[None]) -> None:
        self.stacks = stacks
        self.single = single  # finish_one with the batch's align, max_shift, align_search
        self.ticket: Ticket | None = None
        self.done = False

    def ready(self, worker: PrepWorker | None) -> bool:
        """Whether :meth:`finish` would not wait for the preparation process."""
        return self.done or self.ticket is None or worker is None or worker.ready(self.ticket)

    def finish(self, worker: PrepWorker | None, on_bug: Callable[[], None] | None = None) -> None:
        """Every stack prepared (and, from the preparation process, predicted); a stack it
        did not run is prepared here. Never raises for a bug of its own: results that cannot
        be collected (``on_bug`` called; the process is replaced, its answers may be out of
        step) are prepared here, and a spectrum whose preparation here fails alone is
        refused (``internal_error``, ``on_bug`` called)."""
        if self.done:
            return
        self.done = True
        results: list[Any] = [None] * len(self.stacks)
        if self.ticket is not None and worker is not None:
            try:
                results = list(worker.collect(self.ticket))
                if len(results) != len(self.stacks):
                    raise ValueError(f"{len(results)} results for {len(self.stacks)} stacks")
            except Exception as exc:
                logger.exception(
                    "collecting %d stacks failed; preparing them here", len(self.stacks)
                )
                _bug(on_bug)
                worker.abandon(self.ticket, f"collecting its results failed: {exc}")
                results = [None] * len(self.stacks)
        for group, result in zip(self.stacks, results, strict=True):
            if isinstance(result, StackResult) and _take_result(group, result):
                continue
            try:
                kw = self.single.keywords
                job = job_for(group, kw["align"], kw["max_shift"], kw["align_search"])
                apply_result(group, run_job(job))
            except Exception:  # a bug in the batched path: the rows go the slow way instead
                logger.exception("batched preparation failed; preparing %d one by one", len(group))
                for w in group:
                    try:
                        _reset(w)
                        self.single(w)
                    except Exception as exc:
                        logger.exception("preparing spectrum %d failed", w.scan.index)
                        _bug(on_bug)
                        w.fail("internal_error", f"{type(exc).__name__}: {exc}")


def _take_result(group: list[Work], result: StackResult) -> bool:
    """The preparation process's outcome into ``group``, predictions decoded here; False
    (the works untouched) if it cannot be used."""
    try:
        ok = [group[i] for i in result.ok_rows]
        preds = None
        if ok and result.raw is not None:
            predictor = ok[0].predictor
            assert predictor is not None
            chosen = [result.prepared[i] for i in result.ok_rows]
            preds = predictor.predictions(chosen, result.raw)  # type: ignore[arg-type]
        apply_result(group, result)
        if preds is not None:
            for w, p in zip(ok, preds, strict=True):
                w.prediction = p
    except Exception:
        logger.exception("a result of the preparation process could not be used")
        for w in group:
            _reset(w)
        return False
    return True


def _reset(w: Work) -> None:
    w.flags = [f for f in w.flags if not f.startswith(("align_", "no_reference"))]
    w.shift, w.prepared, w.prediction, w.reason, w.detail = None, None, None, None, ""


def _split_by_axis(group: list[Work]) -> list[list[Work]]:
    """Sub-groups whose spectra have the very same energy axis (and raw energies)."""
    out: list[list[Work]] = []
    for w in group:
        assert w.spectrum is not None
        for same in out:
            first = same[0].spectrum
            assert first is not None
            if w.spectrum.energy is first.energy or np.array_equal(w.spectrum.energy, first.energy):
                same.append(w)
                break
        else:
            out.append([w])
    return out
