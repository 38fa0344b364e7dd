"""FAISS indices: build, save, search. Vectors are L2-normalised, so inner product = cosine."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np


def build_index(vectors: np.ndarray, factory: str = "Flat") -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def bytes_per_vector(index: faiss.Index) -> int:
    """Storage of one database vector in the index (codes only)."""
    if isinstance(index, faiss.IndexFlatCodes):
        return int(index.code_size)
    return int(index.sa_code_size())


def write_index(index: faiss.Index, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, database rows) per query, best first."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
