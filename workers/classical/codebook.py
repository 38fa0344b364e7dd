"""Visual-word codebooks: seeded faiss k-means, and the FAISS index that assigns descriptors to words.

Small codebooks assign exactly (Flat L2). Large ones (k above ``assign_flat_max``) assign through an
IVF index over the centroids, so assignment costs a few hundred distances per descriptor instead of k.
IVF is used rather than HNSW because its construction is deterministic: same codebook, same index.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from embedpipe.storage.contracts.errors import RunFailed


def train_kmeans(sample: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Seeded faiss k-means. sample: (n, D) float32 -> centroids (k, D) float32."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if len(x) < k:
        raise RunFailed(
            f"{len(x)} sampled descriptors cannot make {k} visual words: "
            "lower bow.k or raise bow.sample_per_image"
        )
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, verbose=False, spherical=False)
    km.cp.max_points_per_centroid = max(256, -(-len(x) // k))  # train on the whole sample
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assignment_index(centroids: np.ndarray, flat_max: int, seed: int) -> faiss.Index:
    """Exact Flat L2 index over the centroids, or IVF (nlist ≈ 4√k, nprobe 16) when k > flat_max."""
    k, d = centroids.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if k <= flat_max:
        index = faiss.IndexFlatL2(d)
    else:
        nlist = max(1, int(4 * math.sqrt(k)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        index.cp.seed = seed
        index.train(c)
        index.nprobe = min(16, nlist)
    index.add(c)
    return index


def serialize(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def deserialize(blob: np.ndarray) -> faiss.Index:
    index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
    return index


def assign(index: faiss.Index, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` nearest words of each descriptor: (squared distances, words), both (n, m), nearest first."""
    if len(x) == 0:
        return np.zeros((0, m), np.float32), np.zeros((0, m), np.int64)
    d2, words = index.search(np.ascontiguousarray(x, dtype=np.float32), m)
    return d2, words
