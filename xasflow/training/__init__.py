"""xasflow.training."""
