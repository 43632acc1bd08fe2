"""xasflow.daemon."""
