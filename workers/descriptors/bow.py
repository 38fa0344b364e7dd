"""Bag of visual words and VLAD from assigned local descriptors (pure numpy/scipy).

BoW (Sivic & Zisserman, ICCV 2003): term frequencies per visual word, hard (nearest word) or soft
(m nearest words, Gaussian weights; Philbin et al., CVPR 2008), square-rooted against burstiness
(Jégou et al., CVPR 2009), tf-idf weighted and L2-normalised; searched exactly by cosine through an
inverted file (one postings list per word). VLAD (Jégou et al., CVPR 2010): per-word sums of residuals,
intra-normalised (Arandjelović & Zisserman, CVPR 2013), power-normalised and L2-normalised; with vocabulary
adaptation (same paper) the residuals are taken to each word's mean over the indexed collection.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp


def image_seed(seed: int, image_id: str) -> np.random.Generator:
    """A generator for one image, from the run seed and the image's content id: the sample of an image
    does not depend on how the store was split into parts."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_rows(n: int, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_image`` of ``n`` rows, uniformly without replacement, in increasing order."""
    if n <= per_image:
        return np.arange(n)
    return np.sort(rng.choice(n, per_image, replace=False))


def soft_weights(d2: np.ndarray, sigma_ratio: float) -> np.ndarray:
    """Soft-assignment weights from squared distances to the m nearest words.

    w_j ∝ exp(-(d_j² - d_1²) / (2 σ²)) with σ² = sigma_ratio · mean(d_1²) over the given keypoints,
    normalised to sum 1 per keypoint. d2: (n, m), ascending per row -> (n, m) float32."""
    if d2.size == 0:
        return np.zeros_like(d2, dtype=np.float32)
    sigma2 = max(sigma_ratio * float(np.mean(d2[:, 0])), 1e-12)
    w = np.exp(-(d2 - d2[:, :1]) / (2.0 * sigma2))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def term_frequencies(words: list[np.ndarray], weights: list[np.ndarray], k: int) -> sp.csr_matrix:
    """Per image, the summed weight of each visual word. words/weights: one flat array per image
    (n_i * m entries) -> (n_images, k) CSR float64, duplicates summed."""
    counts = np.array([len(w) for w in words], dtype=np.int64)
    rows = np.repeat(np.arange(len(words)), counts)
    cols = np.concatenate(words) if words else np.zeros(0, np.int64)
    vals = np.concatenate(weights).astype(np.float64) if weights else np.zeros(0)
    tf = sp.coo_matrix((vals, (rows, cols)), shape=(len(words), k)).tocsr()
    tf.sum_duplicates()
    tf.sort_indices()
    return tf


def inverse_document_frequency(tf: sp.csr_matrix) -> np.ndarray:
    """idf_w = log(N / df_w), 0 for words no image contains. tf: (N, k) -> (k,) float64."""
    df = np.bincount(tf.indices, minlength=tf.shape[1]).astype(np.float64)
    n = max(tf.shape[0], 1)
    return np.where(df > 0, np.log(n / np.maximum(df, 1.0)), 0.0)


def tfidf(tf: sp.csr_matrix, idf: np.ndarray, burstiness: bool) -> sp.csr_matrix:
    """sqrt(tf) (burstiness) or tf, times idf, rows L2-normalised. (N, k) CSR -> (N, k) CSR float32."""
    x = tf.copy().astype(np.float64)
    if burstiness:
        x.data = np.sqrt(x.data)
    x = x @ sp.diags(idf)
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    x = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x
    out = sp.csr_matrix(x, dtype=np.float32)
    out.sort_indices()
    return out


class InvertedFile:
    """Exact cosine search of L2-normalised sparse vectors: one postings list per visual word
    (the transposed database in CSR: row w lists the images containing w and their weights)."""

    def __init__(self, database: sp.csr_matrix):
        self.postings = sp.csr_matrix(database.T)  # (k, N)
        self.postings.sort_indices()
        self.ntotal = database.shape[0]

    def scores(self, queries: sp.csr_matrix) -> np.ndarray:
        """(nq, k) CSR -> (nq, N) float32: each query's non-zero words walk their postings lists."""
        return np.asarray((queries @ self.postings).todense(), dtype=np.float32)

    def search(self, queries: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, database rows) per query, best first, ties by row. -> (nq, k), (nq, k)."""
        s = self.scores(queries)
        order = np.argsort(-s, axis=1, kind="stable")[:, : min(k, self.ntotal)]
        return np.take_along_axis(s, order, axis=1), order

    def bytes_per_vector(self) -> float:
        """Mean bytes per database vector in the postings: a 4-byte image id and a 4-byte weight per entry."""
        return 8.0 * self.postings.nnz / max(self.ntotal, 1)


def vlad(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, power: float = 0.5) -> np.ndarray:
    """VLAD of one image: residuals summed per word, each word's block L2-normalised (intra-norm),
    signed power normalisation, global L2. x: (n, D); centroids: (k, D); assign: (n,) -> (k*D,) float32."""
    k, d = centroids.shape
    v = np.zeros((k, d), np.float64)
    if len(x):
        np.add.at(v, assign, x.astype(np.float64) - centroids[assign])
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1.0)
    v = np.sign(v) * np.abs(v) ** power
    total = np.linalg.norm(v)
    return (v.reshape(-1) / (total if total > 0 else 1.0)).astype(np.float32)


def word_sums(x: np.ndarray, words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-word sums and counts of the descriptors assigned to each word (words < 0: unassigned, left
    out), and the number counted. x: (n, D); words: (n,) -> (k, D) float64, (k,) float64, int."""
    keep = words >= 0
    x, words = np.asarray(x, np.float64)[keep], words[keep]
    sums = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(sums, words, x)
    return sums, np.bincount(words, minlength=k).astype(np.float64), int(keep.sum())


def adapt_centroids(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Vocabulary adaptation: each word's centroid becomes the mean of the descriptors assigned to it;
    a word with none keeps its centroid. (k, D), (k, D), (k,) -> (k, D) float32."""
    means = sums / np.maximum(counts, 1.0)[:, None]
    return np.where(counts[:, None] > 0, means, centroids).astype(np.float32)
