"""Spectra for the simulated beamline: reference foils (measured, else synthetic), the
samples it measures (FEFF demo compounds, measured library spectra).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xasflow import paths
from xasflow.spectra.channels import align, alignment_shift
from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import edge_energy

logger = logging.getLogger(__name__)

#: Measured foils in the XAS Data Library, by element (K edge).
_LIBRARY_FOIL = "{element}_Foil_rt_2016Foils.xdi"
#: A foil/own-reference whose E0 lies further than this from the tabulated edge is not used.
_MAX_CALIBRATION_SHIFT = 20.0


# --------------------------------------------------------------------------- reference spectra


def synthetic_foil(element: str = "Cu", edge: str = "K") -> Spectrum:
    """A plausible metal-foil edge (arctan step, near-edge peak, damped EXAFS), calibrated.

    Built on a 0.1 eV grid from 400 eV below to 1000 eV above the tabulated edge, with a
    Victoreen-like E^-3 pre-edge and E^-2 post-edge fall-off; then shifted so that
    :func:`~xasflow.spectra.find_e0` puts its E0 exactly on the tabulated edge energy.
    """
    e0 = edge_energy(element, edge)
    energy = np.arange(e0 - 400.0, e0 + 1000.0, 0.1)
    x = energy - e0
    step = 0.5 + np.arctan(x / 1.5) / np.pi
    peak = 0.12 * np.exp(-0.5 * ((x - 14.0) / 4.0) ** 2)
    k = np.sqrt(0.2625 * np.clip(x, 0.0, None))  # photoelectron wavenumber, 1/Angstrom
    exafs = (1.0 - np.exp(-np.clip(x, 0.0, None) / 15.0)) * (
        0.3 * np.sin(2.0 * k * 2.55 - 0.8) * np.exp(-2.0 * 0.008 * k**2) / (1.0 + k)
    )
    mu = 0.25 * (energy / e0) ** -3 + 1.6 * (step + peak + exafs * step) * (energy / e0) ** -2
    foil = Spectrum(
        energy=energy,
        mu=mu,
        element=element,
        edge=edge,
        meta={"name": f"synthetic {element} foil", "source": "synthetic"},
    )
    return _calibrate_to_table(foil, element, edge)


def _calibrate_to_table(foil: Spectrum, element: str, edge: str) -> Spectrum:
    """Shift a foil so its E0 sits on the tabulated edge (records ``calibration_shift``)."""
    shift = alignment_shift(foil, element, edge)
    out = align(foil, shift)
    meta = dict(out.meta)
    meta["calibration_shift"] = shift
    return out.with_(meta=meta, e0=edge_energy(element, edge))


def _extend_pre_edge(foil: Spectrum, down_to: float, fit_width: float = 60.0) -> Spectrum:
    """Extend a measured foil below its first point with its pre-edge line (5 eV steps)."""
    first = float(foil.energy[0])
    if first <= down_to:
        return foil
    e_tab = foil.e0 if foil.e0 is not None else first + 100.0
    sel = (foil.energy <= first + fit_width) & (foil.energy <= e_tab - 15.0)
    if np.count_nonzero(sel) < 3:
        sel = np.arange(foil.energy.size) < 3
    coef = np.polyfit(foil.energy[sel], foil.mu[sel], 1)
    new_e = np.arange(down_to, first - 2.5, 5.0)
    meta = dict(foil.meta)
    meta["extrapolated_below"] = first
    return foil.with_(
        energy=np.concatenate((new_e, foil.energy)),
        mu=np.concatenate((np.polyval(coef, new_e), foil.mu)),
        meta=meta,
    )


@functools.lru_cache(maxsize=16)
def _cached_reference(element: str, edge: str, library: str) -> Spectrum:
    path = Path(library) / element / _LIBRARY_FOIL.format(element=element)
    if edge == "K" and path.is_file():
        try:
            from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum

            foil = xdi_to_spectrum(read_xdi(path)).with_(element=element, edge=edge)
            foil = _calibrate_to_table(foil, element, edge)
            if abs(foil.meta["calibration_shift"]) <= _MAX_CALIBRATION_SHIFT:
                return _extend_pre_edge(foil, edge_energy(element, edge) - 250.0)
            logger.warning(
                "%s: E0 is %.1f eV off the tabulated edge; using a synthetic foil",
                path,
                -foil.meta["calibration_shift"],
            )
        except (ValueError, OSError) as exc:  # XdiError and SpectrumError are ValueErrors
            logger.warning("cannot use %s as reference foil (%s); using a synthetic one", path, exc)
    return synthetic_foil(element, edge)


def default_reference(element: str = "Cu", edge: str = "K") -> Spectrum:
    """The reference foil used when none is given: measured if the library has one, else synthetic.

    The measured foil (``<El>_Foil_rt_2016Foils.xdi`` in the shared XAS Data Library) is
    shifted so its E0 is the tabulated edge, and its pre-edge line is extended down to 250 eV
    below the edge (``meta['extrapolated_below']``) so the default 8800-9500 eV Cu grid is
    covered; otherwise :func:`synthetic_foil`. Cached per element and edge.
    """
    sym = element.strip().capitalize()
    return _cached_reference(sym, edge.strip().upper(), str(paths.xas_data_library()))


def _own_reference(sample: Spectrum, element: str, edge: str) -> Spectrum | None:
    """The reference channel measured with the sample (XDI ``irefer``), if it is a usable foil."""
    ref_mu = sample.meta.get("reference_mu")
    if ref_mu is None or np.shape(ref_mu) != sample.energy.shape:
        return None
    try:
        ref = Spectrum(
            energy=sample.energy,
            mu=np.asarray(ref_mu, dtype=np.float64),
            element=element,
            edge=edge,
            meta={"name": f"{sample.label} reference channel", "source": "sample reference"},
        )
        if abs(alignment_shift(ref, element, edge)) > _MAX_CALIBRATION_SHIFT:
            return None
    except (SpectrumError, KeyError):
        return None
    return ref


# --------------------------------------------------------------------------- library replay


def library_spectra(
    element: str = "Cu", edge: str | None = None, *, calibrate: bool = True
) -> list[Spectrum]:
    """Measured spectra of ``element`` from the shared XAS Data Library, for replay.

    Files that cannot be turned into mu, or whose range misses their edge, are skipped. With
    ``calibrate`` a spectrum with a usable reference channel is shifted so that reference's E0
    is the tabulated edge (``meta['calibration_shift']``), putting it on absolute eV.
    """
    from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum

    sym = element.strip().capitalize()
    folder = paths.xas_data_library() / sym
    out: list[Spectrum] = []
    for path in sorted(folder.glob("*.xdi")):
        try:
            spec = xdi_to_spectrum(read_xdi(path))
        except (ValueError, OSError) as exc:  # XdiError, SpectrumError, units
            logger.debug("skipping %s: %s", path, exc)
            continue
        if spec.element not in (None, sym) or (edge and spec.edge != edge.strip().upper()):
            continue
        spec = spec.with_(element=sym)
        try:
            tab = edge_energy(sym, spec.edge)
        except KeyError:
            tab = None
        if tab is not None and not (spec.energy[0] + 10 <= tab <= spec.energy[-1] - 10):
            logger.debug("skipping %s: %s edge %.1f eV outside its range", path, spec.edge, tab)
            continue
        if calibrate:
            ref = _own_reference(spec, sym, spec.edge)
            if ref is not None:
                with contextlib.suppress(SpectrumError, KeyError):
                    shift = alignment_shift(ref, sym, spec.edge)
                    spec = align(spec, shift)
                    spec = spec.with_(meta={**spec.meta, "calibration_shift": shift})
        out.append(spec)
    return out


# --------------------------------------------------------------------------- sample spectra

#: Default extension of the demo spectra: down to this many eV below the tabulated edge.
DEMO_PRE_EDGE = 200.0
#: Width (eV) of the 1/dE tail that continues a FEFF spectrum below its first point.
_TAIL_WIDTH = 4.0


def _extend_feff_below(spectrum: Spectrum, down_to: float) -> Spectrum:
    """Continue a FEFF spectrum below its first point with the tail of its broadened edge.

    FEFF's XANES grid starts about 4 eV below the Fermi level (k = -1/Å), where mu is already
    a few per cent of the edge step. Below that, mu falls as the Lorentzian tail of the
    core-hole-broadened edge, ``mu_first * w / (w + E_first - E)`` with ``w`` = 4 eV
    (continuous at the first point), on a 5 eV grid; FEFF computes no other background.
    """
    first = float(spectrum.energy[0])
    if first <= down_to:
        return spectrum
    new_e = np.arange(down_to, first - 2.5, 5.0)
    tail = float(spectrum.mu[0]) * _TAIL_WIDTH / (_TAIL_WIDTH + first - new_e)
    return spectrum.with_(
        energy=np.concatenate((new_e, spectrum.energy)),
        mu=np.concatenate((tail, spectrum.mu)),
        meta={**spectrum.meta, "extended_below": first},
    )


def demo_spectra(
    names: Sequence[str] | None = None, *, pre_edge: float | None = DEMO_PRE_EDGE
) -> list[Spectrum]:
    """The packaged FEFF10 demo spectra of Cu reference compounds, as sample spectra.

    Read from ``xasflow/data/demo`` (no FEFF, no shared data), in ``names`` order (default:
    all, by name; an unknown name raises KeyError). ``meta`` carries ``name``, ``source``
    (``"feff_demo"``), ``formula`` and the ``expected`` labels. FEFF's grid starts at the
    edge, so by default each is continued down to ``pre_edge`` eV below the tabulated edge
    (:func:`_extend_feff_below`, ``meta['extended_below']``): step scans then get a pre-edge
    and the default grids keep their low end. ``pre_edge=None`` keeps FEFF's own range.
    """
    from xasflow.sim.feff_demo import load_demo_spectra

    demos = {d.name: d for d in load_demo_spectra()}
    chosen = list(demos) if names is None else list(names)
    missing = [n for n in chosen if n not in demos]
    if missing:
        raise KeyError(f"no packaged demo spectrum {missing}; have {sorted(demos)}")
    out = []
    for name in chosen:
        spec = demos[name].to_spectrum()
        if pre_edge is not None:
            element, edge = spec.element or "Cu", spec.edge or "K"  # demo spectra name both
            spec = _extend_feff_below(spec, edge_energy(element, edge) - pre_edge)
        out.append(spec)
    return out


def sample_spectra(
    element: str = "Cu", edge: str | None = None, *, library: bool = True
) -> list[Spectrum]:
    """Sample spectra for simulated scans: the demo compounds, then measured library spectra.

    The packaged demo spectra (:func:`demo_spectra`, Cu K) come first and are always there
    for Cu; with ``library`` the shared XAS Data Library's spectra of ``element``
    (:func:`library_spectra`) follow when the library is present (nothing is added, and
    nothing fails, when it is not).
    """
    sym = element.strip().capitalize()
    want = edge.strip().upper() if edge else None
    out = [s for s in demo_spectra() if s.element == sym and want in (None, s.edge)]
    if library and paths.xas_data_library().is_dir():
        out += library_spectra(sym, want)
    return out
