"""Spectra: the value type, E0, normalisation, gridding, features and augmentation.

This package is the single preprocessing path shared by training and the daemon, and it
imports nothing from ``xasflow.training``, ``xasflow.daemon`` or ``xasflow.adapters``.
"""

from xasflow.spectra.augment import AugmentParams, augment_grid
from xasflow.spectra.channels import align, alignment_shift, mu_from_channels
from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import edge_energy, infer_edge, infer_edge_from_data
from xasflow.spectra.features import (
    FeatureSpec,
    feature_energies,
    feature_names,
    featurize,
    linear_matrix,
    model_input,
)
from xasflow.spectra.herfd import broaden, herfd_fwhm, herfd_width
from xasflow.spectra.norm import EdgeFit, edge_fit
from xasflow.spectra.normalization import is_calculated, normalize
from xasflow.spectra.process import Prepared, PrepParams, find_e0, prepare, resample
from xasflow.spectra.resolution import match_broadening

__all__ = [
    "AugmentParams",
    "EdgeFit",
    "FeatureSpec",
    "PrepParams",
    "Prepared",
    "Spectrum",
    "SpectrumError",
    "align",
    "alignment_shift",
    "augment_grid",
    "broaden",
    "edge_energy",
    "edge_fit",
    "feature_energies",
    "feature_names",
    "featurize",
    "find_e0",
    "herfd_fwhm",
    "herfd_width",
    "infer_edge",
    "infer_edge_from_data",
    "is_calculated",
    "linear_matrix",
    "match_broadening",
    "model_input",
    "mu_from_channels",
    "normalize",
    "prepare",
    "resample",
]
