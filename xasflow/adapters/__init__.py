"""xasflow.adapters."""
