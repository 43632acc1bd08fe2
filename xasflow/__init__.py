"""xasflow: streaming analysis of X-ray absorption spectra at synchrotron beamlines."""

__version__ = "0.1.0"
