"""Spectra: the value type, E0, normalisation, gridding, features and augmentation.

This package is the single preprocessing path shared by training and the daemon, and it
imports nothing from ``xasflow.training``, ``xasflow.daemon`` or ``xasflow.adapters``.
"""

from xasflow.spectra.augment import AugmentParams, augment_grid
from xasflow.spectra.channels import align, alignment_shift, mu_from_channels
from xasflow.spectra.core import Spectrum, SpectrumError
from xasflow.spectra.edges import edge_energy, infer_edge
from xasflow.spectra.features import (
    FeatureSpec,
    feature_energies,
    feature_names,
    featurize,
    linear_matrix,
    model_input,
)
from xasflow.spectra.process import Prepared, PrepParams, find_e0, normalize, prepare, resample

__all__ = [
    "AugmentParams",
    "FeatureSpec",
    "PrepParams",
    "Prepared",
    "Spectrum",
    "SpectrumError",
    "align",
    "alignment_shift",
    "augment_grid",
    "edge_energy",
    "feature_energies",
    "feature_names",
    "featurize",
    "find_e0",
    "infer_edge",
    "linear_matrix",
    "model_input",
    "mu_from_channels",
    "normalize",
    "prepare",
    "resample",
]
