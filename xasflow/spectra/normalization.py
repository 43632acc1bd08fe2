"""One spectrum's normalisation: its mu divided by its edge step, under a bundle's settings.

:func:`normalize` is the normalisation step of :func:`~xasflow.spectra.process.prepare`:
Larch ``pre_edge``'s conventions (the fit itself in :mod:`~xasflow.spectra.norm`) or the
legacy fixed windows of older bundles, or the maximum in the model window; a spectrum whose
step it cannot determine is refused with its reason (``no_post_edge``, ``no_pre_edge``,
``edge_step``, ``no_edge``), a glitch in the window raised for ``prepare`` to repair.
:func:`is_calculated` tells a calculation (no pre-edge) from a measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import core_hole_width
from xasflow.spectra.glitches import WindowGlitch, glitch_message, window_spikes
from xasflow.spectra.norm import EdgeFit, bulk_of, edge_fit
from xasflow.spectra.scan_start import measured_start_why, tabulated_edge

if TYPE_CHECKING:
    from xasflow.spectra.process import PrepParams


def _fit_line(x: np.ndarray, y: np.ndarray, degree: int) -> Callable[[Any], Any]:
    """Least-squares polynomial of ``degree`` through (x, y), returned as a function of x.

    Solved on centred, scaled x by the normal equations (degree <= 3 here, so they are well
    conditioned): the same fit as ``np.polyfit`` at a fraction of its overhead.
    """
    centre = float(x.mean())
    scale = float(np.abs(x - centre).max()) or 1.0
    t = (x - centre) / scale
    powers = np.vander(t, degree + 1, increasing=True)
    coef = np.linalg.solve(powers.T @ powers, powers.T @ y)

    def evaluate(at: Any) -> Any:
        u = (np.asarray(at, dtype=np.float64) - centre) / scale
        out = np.full_like(u, coef[degree])
        for c in coef[-2::-1]:  # Horner
            out = out * u + c
        return out

    return evaluate


def _uniform(rel: np.ndarray, mu: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The masked stretch of data resampled on a 1 eV grid, so a fit weighs energy, not points.

    Without this the edge step depended on the scan's sampling: FEFF's k-spaced grid, a step
    scan and a 1000-point fly scan of the same spectrum gave steps up to 18 % apart.
    """
    lo, hi = float(rel[mask][0]), float(rel[mask][-1])
    x = np.linspace(lo, hi, max(round(hi - lo) + 1, 3))
    return x, np.interp(x, rel, mu)


def is_calculated(
    spectrum: Spectrum, e0: float, params: PrepParams, bulk: slice | None = None
) -> bool:
    """Whether a spectrum is a calculation (no pre-edge, no background): ``meta['calculated']``
    if set, else whether it starts above E0 + ``calc_start`` from a near-zero first value.

    The 4,831 shared Cu FEFF spectra start 3.4-24.6 eV below E0 with a first value of
    1-6 % of their maximum; measured scans that close to the edge mostly sit on a background.
    ``bulk``: the scan's bulk (:func:`~xasflow.spectra.norm.bulk_of`), None: found here.
    """
    declared = spectrum.meta.get("calculated")
    if declared is not None:
        return bool(declared)
    bulk = bulk_of(spectrum.energy) if bulk is None else bulk  # not its stray points
    s, end = bulk.indices(spectrum.energy.size)[:2]
    first, top = float(spectrum.mu[s]), float(spectrum.mu[s:end].max())
    starts_late = spectrum.energy[s] - e0 > params.calc_start
    return bool(starts_late and 0.0 <= first <= params.calc_floor * top)


def normalize(
    spectrum: Spectrum, e0: float, params: PrepParams, bulk: slice | None = None
) -> tuple[np.ndarray, float]:
    """Return (normalised mu on the spectrum's own energies, edge step).

    ``edge_step``: the pre-edge background is subtracted and the result divided by the
    post-edge polynomial at E0 (Larch ``pre_edge`` conventions, or the legacy fixed windows;
    see :class:`PrepParams`). ``max``: divided by the maximum within the model window
    (Zheng et al.). SpectrumError ``edge_step`` when the step is not positive or the
    normalised spectrum leaves +-``max_norm`` in the window (an undetermined step).
    ``bulk``: the scan's bulk (:func:`~xasflow.spectra.norm.bulk_of`), None: found here.
    """
    if params.method == "larch" and params.normalization == "edge_step":
        bulk = bulk_of(spectrum.energy) if bulk is None else bulk
        return _normalize_larch(spectrum, e0, params, bulk)
    return _normalize_legacy(spectrum, e0, params)


def _normalize_larch(
    spectrum: Spectrum, e0: float, params: PrepParams, bulk: slice
) -> tuple[np.ndarray, float]:
    lead, last = bulk.indices(spectrum.energy.size)[:2]  # past the bulk: strays
    end = float(spectrum.energy[last - 1] - e0)
    if end < params.min_post_edge:
        raise SpectrumError(
            "no_post_edge",
            f"data end at E0{end:+.1f} eV, below E0{params.min_post_edge:+g} eV: "
            "cannot find the edge step",
        )
    calculated = is_calculated(spectrum, e0, params, bulk)
    if spectrum.meta.get("calculated") is False:  # (its data's start: the one rel it reads)
        tab = tabulated_edge(spectrum.element, spectrum.edge)
        (why,) = measured_start_why(
            (spectrum.energy[lead : lead + 1] - e0)[None, :],
            0,
            None if tab is None else np.array([tab - e0]),
        )
        if why is not None:
            raise SpectrumError("no_pre_edge", why)
    sub, fit = edge_fit(
        spectrum.energy,
        spectrum.mu,
        e0,
        pre1=params.pre1,
        pre2=params.pre2,
        norm1=params.norm1,
        norm2=params.norm2,
        nnorm=params.nnorm,
        calculated=calculated,
        weighting=params.weighting,
        tail_width=core_hole_width(spectrum.element, spectrum.edge) if params.edge_tail else None,
        bulk=bulk,
    )
    if not fit.step > 0:
        raise SpectrumError(
            "edge_step", f"edge step {fit.step:.3g} is not positive ({_where(fit)})"
        )
    y = sub / fit.step
    lo = int(spectrum.energy.searchsorted(e0 + params.window_start))
    hi = min(int(spectrum.energy.searchsorted(e0 + params.window_stop, side="right")), last)
    # the window's points and the first past each end (which feeds the grid's end)
    a, b = max(lo - 1, lead + 1), min(hi + 1, last - 1)
    found = window_spikes(spectrum.energy, y, a, b, e0, last=hi >= last - 1)
    if found:  # before max_norm: a glitch is no undetermined step (prepare repairs it)
        glitch = WindowGlitch("edge_step", glitch_message(spectrum.energy, found))
        glitch.found = tuple(found)
        raise glitch
    worst = float(np.abs(y[lo:hi]).max()) if hi > lo else 0.0
    if worst > params.max_norm:
        raise SpectrumError("edge_step", undetermined_step(worst, fit.step, params, _where(fit)))
    return y, fit.step


def _where(fit: EdgeFit) -> str:
    """The post-edge fit a refused step came from, for its message."""
    return f"post-edge E0{fit.norm1:+g}..{fit.norm2:+g} eV, degree {fit.nnorm}"


def _normalize_legacy(
    spectrum: Spectrum, e0: float, params: PrepParams
) -> tuple[np.ndarray, float]:
    energy, mu = spectrum.energy, spectrum.mu
    rel = energy - e0
    pre = (rel >= params.pre_edge[0]) & (rel <= params.pre_edge[1])
    if np.count_nonzero(pre) >= 3:
        line = _fit_line(*_uniform(rel, mu, pre), 1)
        mu = mu - line(rel)
    if params.normalization == "max":
        win = (rel >= params.window_start) & (rel <= params.window_stop)
        peak = float(mu[win].max()) if np.any(win) else float(mu.max())
        if not peak > 0:
            raise SpectrumError("no_edge", "spectrum has no positive maximum in the window")
        return mu / peak, peak
    post = (rel >= params.post_edge[0]) & (rel <= params.post_edge[1])
    n_post = int(np.count_nonzero(post))
    if n_post < params.post_edge_degree + 3:
        raise SpectrumError(
            "no_post_edge",
            f"only {n_post} points between E0{params.post_edge[0]:+g} and "
            f"E0{params.post_edge[1]:+g} eV; cannot find the edge step",
        )
    # a quadratic through strong post-edge oscillations can dive below zero at E0 (20 of the
    # 4,830 shared FEFF spectra do); lower degrees extrapolate more tamely, so fall back to them
    x_post, y_post = _uniform(rel, mu, post)
    for degree in range(params.post_edge_degree, -1, -1):
        step = float(_fit_line(x_post, y_post, degree)(0.0))
        if step > 0:
            y = mu / step
            win = (rel >= params.window_start) & (rel <= params.window_stop)
            worst = float(np.abs(y[win]).max()) if win.any() else 0.0
            if worst > params.max_norm:  # as the Larch-convention path refuses it
                raise SpectrumError("edge_step", undetermined_step(worst, step, params))
            return y, step
    raise SpectrumError("no_edge", f"edge step {step:.3g} is not positive")


def undetermined_step(worst: float, step: float, params: PrepParams, where: str = "") -> str:
    """Why a spectrum whose normalised mu reaches ``worst`` in the model window is refused:
    its edge ``step`` is not determined (near zero, from a post-edge fit gone wrong)."""
    source = f" from the {where}" if where else ""
    return (
        f"normalised mu reaches {worst:.3g} in the model window (limit {params.max_norm:g}):"
        f" edge step {step:.3g}{source} is not determined"
    )
