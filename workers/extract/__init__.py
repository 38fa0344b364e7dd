"""Extraction: the per-shard stage and the engine-free embedding of one image (backbone forward +
poolings)."""
