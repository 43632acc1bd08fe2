"""The rejection reasons the analysis pipeline gives, and every (stage, reason) a rejection is
counted under (the metrics export each from 0): kept apart from :mod:`xasflow.daemon.pipeline`
so the pipeline module stays about the batch's flow."""

from __future__ import annotations

from xasflow.daemon.assembly import REASONS as ASSEMBLY_REASONS

__all__ = ["REASONS", "known_rejections"]

#: Rejection reasons the pipeline itself gives (plus any ``SpectrumError.reason``).
REASONS: frozenset[str] = frozenset(
    {
        "unknown_element",  # no element in the start and no tabulated edge in the energy range
        "no_model",  # no bundle for the element/edge
        "bad_channel",  # a needed channel is absent, non-positive or of another length
        "not_finite",  # NaN/inf in mu or energy
        "too_short",  # fewer than 3 distinct energies
        "no_edge",  # no absorption edge near the tabulated energy
        "weak_edge",  # an edge step under the bundle's min_edge_snr times the point noise
        "no_post_edge",  # too few points above the edge to normalise
        "no_pre_edge",  # a measured scan starting under 15 eV below E0 or 5 below its edge
        "window",  # data do not cover the model's energy window
        "prediction_error",  # the ONNX graphs failed on this spectrum
        "edge_step",  # the edge step is not positive / not determined
        "glitches",  # more glitches in the model window than prepare interpolates across (8)
        "herfd_width",  # HERFD declared, but no tabulated width for the element: give the FWHM
        "bad_broadening",  # a HERFD width that is no number of eV within 0.2..50
        "bad_declaration",  # a start's ``calculated`` that is neither true, false nor null
        "internal_error",  # a bug; the spectrum is recorded, the daemon goes on
    }
)


def known_rejections() -> list[tuple[str, str]]:
    """Every (stage, reason) a rejection is counted under: the assembler's reasons and the
    pipeline's (the metrics export each from 0)."""
    return [("assembly", r) for r in ASSEMBLY_REASONS] + [("analysis", r) for r in REASONS]
