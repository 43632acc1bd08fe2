"""What the assembler hands to the pipeline: runs opened and closed, spectra, rejections.

Plain frozen dataclasses, shared by :mod:`xasflow.daemon.assembly` (which makes them) and
:mod:`xasflow.daemon.pipeline` (which turns them into analysis documents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "ExitStatus",
    "Kind",
    "Output",
    "Rejected",
    "RunClosed",
    "RunOpened",
    "ScanSpectrum",
    "SpectrumReady",
]

Kind = Literal["step", "fly", "unknown"]
ExitStatus = Literal["success", "abort", "fail", "timeout"]


@dataclass(frozen=True)
class ScanSpectrum:
    """One raw spectrum from a run: energy (eV) and detector channels, before any science.

    ``channels`` holds the present ones of "i0", "it", "ir", "if"; ``mode`` says which
    pair the spectrum is measured in. ``received`` is the assembler's clock (the processor's
    live time) when the last contributing document arrived; ``event_time`` the latest event
    time (epoch s).
    """

    raw_uid: str
    index: int
    energy: np.ndarray
    channels: dict[str, np.ndarray]
    element: str | None
    edge: str | None
    mode: str
    seq_nums: tuple[int, ...]
    event_time: float
    received: float
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunOpened:
    """A run whose documents are being assembled; ``start`` is its start document."""

    raw_uid: str
    start: dict[str, Any]
    kind: Kind


@dataclass(frozen=True)
class SpectrumReady:
    """A spectrum ready for preprocessing and prediction."""

    spectrum: ScanSpectrum


@dataclass(frozen=True)
class Rejected:
    """Something that will not become a spectrum; ``reason`` is one of ``REASONS``."""

    raw_uid: str | None
    index: int | None
    reason: str
    detail: str


@dataclass(frozen=True)
class RunClosed:
    """A run is finished here: by its stop, by ``check_timeouts`` or by ``flush_all``."""

    raw_uid: str
    exit_status: ExitStatus
    reason: str
    n_spectra: int
    n_rejected: int
    seq_gaps: int
    missing_events: int = 0
    #: of ``missing_events``, those the daemon's input queue dropped (lost as ``overflow``)
    dropped_events: int = 0


Output = RunOpened | SpectrumReady | Rejected | RunClosed
