"""Fisher vectors (pure numpy/scipy): a diagonal-covariance Gaussian mixture fitted by EM, and the improved
Fisher vector of a set of local descriptors (Perronnin, Sánchez & Mensink, ECCV 2010).

GMM: means initialised by the seeded k-means of the codebooks, every variance by the sample's per-dimension
variance, uniform weights; then a fixed number of EM iterations in float64. Variances are floored at
``VAR_FLOOR`` times the sample's mean variance (binary ORB bits, or a dimension a component sees constant,
would otherwise collapse to 0); a component that loses all its mass keeps its mean and variances, and
weights are floored at ``MIN_MASS`` descriptors' worth so that none reaches 0. Posteriors are computed in
log space (logsumexp). Same sample and init: same bytes.

Fisher vector of descriptors x_1..x_T under (w_k, μ_k, σ_k²), with posteriors γ_t(k):

    G_μk = 1/(T √w_k)   Σ_t γ_t(k) (x_t - μ_k) / σ_k
    G_σk = 1/(T √(2w_k)) Σ_t γ_t(k) [(x_t - μ_k)² / σ_k² - 1]

(the gradients of the log-likelihood normalised by the diagonal Fisher information), laid out as
[G_μ1 .. G_μK, G_σ1 .. G_σK] (2·K·D), then signed square root and global L2. No descriptor: the zero vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

VAR_FLOOR = 1e-4  # variance floor, as a fraction of the sample's mean per-dimension variance
MIN_MASS = 1e-6  # a component with less posterior mass (in descriptors) keeps its parameters
CHUNK = 16384  # descriptors per block of the E-step (bounds memory to CHUNK x K)


@dataclass(frozen=True)
class Gmm:
    """Diagonal-covariance GMM: ``weights`` (K,), ``means`` (K, D), ``variances`` (K, D), float64."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray


def log_posteriors(x: np.ndarray, gmm: Gmm) -> np.ndarray:
    """log γ_t(k) of each descriptor under each component. x: (n, D) -> (n, K) float64."""
    x = np.asarray(x, np.float64)
    precision = 1.0 / gmm.variances
    quad = (
        (x * x) @ precision.T
        - 2.0 * x @ (gmm.means * precision).T
        + np.sum(gmm.means * gmm.means * precision, axis=1)
    )
    log_norm = -0.5 * (x.shape[1] * np.log(2.0 * np.pi) + np.sum(np.log(gmm.variances), axis=1))
    log_p = np.log(gmm.weights) + log_norm - 0.5 * quad
    return log_p - logsumexp(log_p, axis=1, keepdims=True)


def sufficient_statistics(x: np.ndarray, gmm: Gmm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σ_t γ_t(k), Σ_t γ_t(k) x_t and Σ_t γ_t(k) x_t², in blocks of CHUNK descriptors.
    x: (n, D) -> (K,), (K, D), (K, D) float64."""
    k, d = gmm.means.shape
    mass, s1, s2 = np.zeros(k), np.zeros((k, d)), np.zeros((k, d))
    for start in range(0, len(x), CHUNK):
        block = np.asarray(x[start : start + CHUNK], np.float64)
        g = np.exp(log_posteriors(block, gmm))
        mass += g.sum(axis=0)
        s1 += g.T @ block
        s2 += g.T @ (block * block)
    return mass, s1, s2


def fit_gmm(x: np.ndarray, init_means: np.ndarray, iterations: int) -> Gmm:
    """EM for a diagonal GMM on the sample x (n, D), from ``init_means`` (K, D) (the k-means centroids),
    every variance the sample's per-dimension variance, uniform weights; ``iterations`` E+M steps."""
    x = np.asarray(x, np.float64)
    n = len(x)
    k = len(init_means)
    spread = x.var(axis=0)
    floor = VAR_FLOOR * max(float(spread.mean()), 1e-12)
    gmm = Gmm(
        np.full(k, 1.0 / k),
        np.array(init_means, np.float64),
        np.tile(np.maximum(spread, floor), (k, 1)),
    )
    for _ in range(iterations):
        mass, s1, s2 = sufficient_statistics(x, gmm)
        alive = (mass > MIN_MASS)[:, None]
        safe = np.maximum(mass, MIN_MASS)[:, None]
        means = np.where(alive, s1 / safe, gmm.means)
        variances = np.where(alive, np.maximum(s2 / safe - means * means, floor), gmm.variances)
        weights = np.maximum(mass, MIN_MASS) / max(n, 1)
        gmm = Gmm(weights / weights.sum(), means, variances)
    return gmm


def fisher_vector(x: np.ndarray, gmm: Gmm, power: float = 0.5) -> np.ndarray:
    """Improved Fisher vector of one image (module docstring). x: (n, D) -> (2·K·D,) float32."""
    k, d = gmm.means.shape
    if len(x) == 0:
        return np.zeros(2 * k * d, np.float32)
    mass, s1, s2 = sufficient_statistics(x, gmm)
    mass, mu, var = mass[:, None], gmm.means, gmm.variances
    t = float(len(x))
    w = gmm.weights[:, None]
    # Σ γ (x - μ) = s1 - m μ ; Σ γ (x - μ)² = s2 - 2 μ s1 + m μ²
    g_mu = (s1 - mass * mu) / np.sqrt(var) / (t * np.sqrt(w))
    g_sigma = ((s2 - 2.0 * mu * s1 + mass * mu * mu) / var - mass) / (t * np.sqrt(2.0 * w))
    v = np.concatenate([g_mu.reshape(-1), g_sigma.reshape(-1)])
    v = np.sign(v) * np.abs(v) ** power
    total = np.linalg.norm(v)
    return (v / (total if total > 0 else 1.0)).astype(np.float32)
