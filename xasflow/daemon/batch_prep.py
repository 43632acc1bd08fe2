"""A batch's spectra from the scan to the model input: the pipeline's steps 1-5.

Per spectrum (:func:`start_work`): element and edge, the bundle, mu from the channels
(steps 1-3 of :mod:`xasflow.daemon.pipeline`). Then alignment and preparation (steps 4-5),
the fast path: spectra of one batch that share an energy axis, element, edge and bundle
(a fly-scan page, a burst of fly events of one run) are stacked: the reference-foil shift,
its edge check and the bundle's preparation run once over the stack
(:mod:`xasflow.spectra.batch`). Everything else, and any group of one, takes the
single-spectrum path (:func:`finish_one`); so does a group whose batched code raises (a
bug), so a batch never loses its spectra. The per-spectrum outcome is the same either way:
flags, shift, prepared spectrum or rejection reason (the parity tests of
:mod:`xasflow.spectra.batch`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from xasflow.daemon.outputs import ScanSpectrum
from xasflow.models.predictor import Prediction, Predictor
from xasflow.spectra import (
    Prepared,
    Spectrum,
    SpectrumError,
    alignment_shift,
    edge_energy,
    infer_edge,
    mu_from_channels,
)
from xasflow.spectra import align as shift_spectrum
from xasflow.spectra.batch import alignment_shift_batch, has_edge_batch, prepare_batch
from xasflow.spectra.quality import has_edge

if TYPE_CHECKING:
    from xasflow.daemon.registry import ModelRegistry

__all__ = ["Work", "finish_one", "prepare_works", "start_work"]

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


def start_work(scan: ScanSpectrum, registry: ModelRegistry, herfd: Any) -> Work:
    """Steps 1-3 for one spectrum (alignment and preparation follow, batched); a failure sets
    ``reason``. ``herfd``: the run's HERFD declaration (False, True or a FWHM in eV)."""
    work = Work(scan, flags=list(scan.flags))
    try:
        _start_into(work, registry, herfd)
    except SpectrumError as exc:
        work.fail(exc.reason, exc.message)
    except Exception as exc:  # a bug: record the spectrum as rejected, keep serving
        logger.exception("pipeline bug on spectrum %s/%s", scan.raw_uid, scan.index)
        work.fail("internal_error", f"{type(exc).__name__}: {exc}")
    return work


def _start_into(work: Work, registry: ModelRegistry, herfd: Any) -> None:
    scan = work.scan
    energy = np.asarray(scan.energy, dtype=np.float64)
    if energy.ndim != 1 or energy.size == 0:
        raise SpectrumError("bad_channel", f"energy has shape {energy.shape}")
    element, edge = scan.element, scan.edge
    if element is None:
        finite = energy[np.isfinite(energy)]
        guess = infer_edge(float(finite.min()), float(finite.max())) if finite.size else None
        if guess is None:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0, 0)
            raise SpectrumError(
                "unknown_element",
                f"no element in the start document and no tabulated edge inside "
                f"{lo:.0f}-{hi:.0f} eV",
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
    works: Sequence[Work], *, align: bool, max_shift: float, align_search: float
) -> None:
    """Align and prepare every pending work (``spectrum`` set, no ``reason``), batched by axis;
    groups of one, and a group whose batched code fails, take :func:`finish_one`."""
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
    for group in groups.values():
        for same in _split_by_axis(group):
            if len(same) == 1:
                single(same[0])
                continue
            try:
                _prepare_group(same, align, max_shift, align_search)
            except Exception:  # a bug in the batched path: the rows go the slow way instead
                logger.exception("batched preparation failed; preparing %d one by one", len(same))
                for w in same:
                    w.flags = [f for f in w.flags if not f.startswith(("align_", "no_reference"))]
                    w.shift, w.prepared, w.reason, w.detail = None, None, None, ""
                    single(w)


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


def _reference_rows(group: list[Work], energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln(It/Ir) of every row that has a usable foil (else the row's flag says why)."""
    has = np.array(
        [
            "ir" in w.channels
            and "it" in w.channels
            and np.shape(w.channels["it"]) == energy.shape
            and np.shape(w.channels["ir"]) == energy.shape
            for w in group
        ]
    )
    ref = np.ones((len(group), energy.size))
    usable = np.zeros(len(group), dtype=bool)
    for w in group:
        if not ("ir" in w.channels and "it" in w.channels):
            w.flags.append("no_reference")
    rows = np.flatnonzero(has)
    if rows.size:
        it = np.array([np.asarray(group[r].channels["it"], dtype=np.float64) for r in rows])
        ir = np.array([np.asarray(group[r].channels["ir"], dtype=np.float64) for r in rows])
        with np.errstate(invalid="ignore", divide="ignore"):
            good = (np.isfinite(it) & np.isfinite(ir) & (it > 0) & (ir > 0)).all(axis=1)
            ref[rows[good]] = np.log(it[good] / ir[good])
        usable[rows[good]] = True
    for r, w in enumerate(group):
        if "ir" in w.channels and "it" in w.channels and not usable[r]:
            w.flags.append("align_failed")  # as mu_from_channels / Spectrum would have raised
    return ref, usable


def _prepare_group(group: list[Work], align: bool, max_shift: float, search: float) -> None:
    """One group sharing axis, element, edge and bundle: aligned and prepared as a stack."""
    first = group[0]
    assert first.spectrum is not None and first.predictor is not None
    energy = first.spectrum.energy
    element, edge = first.spectrum.element, first.spectrum.edge
    shifts = np.zeros(len(group))
    if align:
        ref, usable = _reference_rows(group, energy)
        rows = np.flatnonzero(usable)
        if rows.size:
            assert element is not None
            try:
                tab = edge_energy(element, edge)
            except KeyError:
                tab = None
            if tab is None:
                for r in rows.tolist():
                    group[r].flags.append("align_failed")
            else:
                found, errors = alignment_shift_batch(energy, ref[rows], element, edge, search)
                clear = has_edge_batch(energy, ref[rows], tab - np.nan_to_num(found))
                for k, r in enumerate(rows.tolist()):
                    w = group[r]
                    if errors[k] is not None or not clear[k]:
                        w.flags.append("align_failed")
                    elif abs(found[k]) > max_shift:
                        w.flags.append("align_out_of_range")
                    else:
                        w.shift = float(found[k])
                        shifts[r] = w.shift
    metas = []
    for w in group:
        assert w.spectrum is not None
        meta = dict(w.spectrum.meta)
        if w.shift is not None:
            meta["energy_shift"] = meta.get("energy_shift", 0.0) + w.shift
        metas.append(meta)
    mu = np.array([w.spectrum.mu for w in group if w.spectrum is not None])
    prep = first.predictor.manifest.prep
    results = prepare_batch(energy, mu, prep, element, edge, shifts=shifts, metas=metas)
    for w, res in zip(group, results, strict=True):
        if isinstance(res, SpectrumError):
            w.fail(res.reason, res.message)
        else:
            w.prepared = res
