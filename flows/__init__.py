"""The top: Prefect flows over plain stage functions, the CLI, config loading and presets, deployments, and
the benchmarks.
"""
