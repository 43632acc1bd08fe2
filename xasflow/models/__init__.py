"""xasflow.models."""
