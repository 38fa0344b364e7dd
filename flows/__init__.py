"""Prefect flows, the CLI, the config object and presets."""
