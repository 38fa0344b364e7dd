"""Triangulation embedding and democratic aggregation (Jégou & Zisserman, CVPR 2014), pure numpy.

Embedding of a descriptor x against the K centroids c_j of a codebook: the unit directions
r_j(x) = (x - c_j) / ||x - c_j||, concatenated (K·D), then φ(x) = P (R(x) - R0): centred by the mean R0 of
the embedded sample and whitened by P, learnt on the embedded sample (its leading components optionally
dropped). An image is the aggregate ψ = Σ_i λ_i φ(x_i): ``sum`` (λ = 1) or ``democratic`` (λ such that
every descriptor contributes equally to the image's self-similarity ψᵀψ: λ_i Σ_j λ_j k(x_i, x_j) = 1,
k the positive part of φ(x_i)ᵀφ(x_j), found by damped Sinkhorn-like iterations), then power law (0.5) and
L2. No descriptor: the zero vector.

Costs per image of n descriptors: the embedding n·(K·D)² (the whitening), democratic weights n²·(K·D).
"""

from __future__ import annotations

import numpy as np

DEMOCRATIC_ITERATIONS = 10
DEMOCRATIC_GAMMA = 0.3  # damping: λ ← λ / σ^γ (γ = 0.5 would jump to the fixed point of a diagonal kernel)
CHUNK = 4096  # descriptors per block when summing the moments of an embedded sample


def triangulate(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """R(x): the unit directions from each centroid to each descriptor (0 where they coincide).
    x: (n, D), centroids: (K, D) -> (n, K·D) float64."""
    diff = np.asarray(x, np.float64)[:, None, :] - np.asarray(centroids, np.float64)[None]
    norms = np.linalg.norm(diff, axis=2, keepdims=True)
    return (diff / np.where(norms > 0, norms, 1.0)).reshape(len(diff), -1)


def embedded_moments(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Column sums (K·D,) and Gram matrix RᵀR (K·D, K·D) of the triangulated sample x (n, D), in blocks,
    and n: what the PCA-whitening of the embedding is learnt from."""
    dim = centroids.size
    total, gram = np.zeros(dim), np.zeros((dim, dim))
    for start in range(0, len(x), CHUNK):
        r = triangulate(x[start : start + CHUNK], centroids)
        total += r.sum(axis=0)
        gram += r.T @ r
    return total, gram, len(x)


def embed(x: np.ndarray, centroids: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """φ(x) = P (R(x) - R0). x: (n, D); mean: (K·D,); proj: (D', K·D) -> (n, D') float64."""
    return (triangulate(x, centroids) - np.asarray(mean, np.float64)) @ np.asarray(proj, np.float64).T


def democratic_weights(
    y: np.ndarray, iterations: int = DEMOCRATIC_ITERATIONS, gamma: float = DEMOCRATIC_GAMMA
) -> np.ndarray:
    """λ (n,) with λ_i Σ_j λ_j K_ij ≈ 1 for every i, K = max(Y Yᵀ, 0) (y: (n, D') embedded descriptors).

    From λ = 1: σ = λ ∘ (K λ), λ ← λ / σ^γ, ``iterations`` times; then λ is scaled so that mean σ = 1.
    A descriptor whose embedding is zero (σ = 0) keeps its weight: it contributes nothing either way."""
    kernel = np.maximum(y @ y.T, 0.0)
    lam = np.ones(len(y))
    for _ in range(iterations):
        sigma = lam * (kernel @ lam)
        lam = lam / np.where(sigma > 0, sigma, 1.0) ** gamma
    sigma = lam * (kernel @ lam)
    scale = float(sigma.mean())
    return lam / np.sqrt(scale) if scale > 0 else lam


def temb_vector(
    x: np.ndarray,
    centroids: np.ndarray,
    mean: np.ndarray,
    proj: np.ndarray,
    aggregate: str = "democratic",
    power: float = 0.5,
) -> np.ndarray:
    """T-emb of one image: embed, aggregate (``sum`` or ``democratic``), signed power law, L2.
    x: (n, D) -> (D',) float32."""
    if len(x) == 0:
        return np.zeros(len(proj), np.float32)
    y = embed(x, centroids, mean, proj)
    lam = democratic_weights(y) if aggregate == "democratic" else np.ones(len(y))
    v = lam @ y
    v = np.sign(v) * np.abs(v) ** power
    total = np.linalg.norm(v)
    return (v / (total if total > 0 else 1.0)).astype(np.float32)
