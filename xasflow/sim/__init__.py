"""xasflow.sim."""
