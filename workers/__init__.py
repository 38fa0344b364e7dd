"""Computation: descriptors (pure), decode, engines (Ray, Dask), FAISS, metrics, report."""
