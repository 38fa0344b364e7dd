"""Computation, grouped by stage in data-flow order: ingest, extract, classical, fit, index, evaluate,
report, train; descriptors/ (pure maths) and engines/ (Ray, Dask).
"""
