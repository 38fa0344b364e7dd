"""Ingest: listing every input form, reading inputs (local, tar members, HTTP, fsspec), decoding, the shard
plan's inputs, benchmark datasets and the demo dataset.
"""
