"""The human report of a run."""
