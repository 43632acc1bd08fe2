"""xasflow.spectra."""
