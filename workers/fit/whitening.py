"""PCA-whitening maths (pure numpy): learn from first and second moments, apply to vectors."""

from __future__ import annotations

import numpy as np


def pca_whitening_from_moments(
    total: np.ndarray, gram: np.ndarray, n: int, dim: int, shrinkage: float
) -> dict[str, np.ndarray]:
    """PCA-whitening from the column sums ``total`` (D,) and Gram matrix ``gram`` = XᵀX (D, D) of n rows.

    Keeps the ``dim`` leading components (0: all that n rows support, i.e. min(D, n - 1)). Eigenvalues are
    regularised by ``shrinkage`` times their mean before the inverse square root, which keeps tiny
    components from amplifying noise when n is small. Eigenvector signs are fixed (largest-magnitude
    entry positive) so the result is reproducible.

    Returns mean (D,), proj (dim, D) and eigvals (dim,): whitened y = proj @ (x - mean)."""
    total = np.asarray(total, np.float64)
    gram = np.asarray(gram, np.float64)
    if n < 2:
        raise ValueError("PCA-whitening needs at least 2 vectors")
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    cov = (cov + cov.T) / 2.0
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
    limit = min(cov.shape[0], n - 1)
    dim = limit if dim <= 0 else min(dim, limit)
    eigvals, eigvecs = eigvals[:dim], eigvecs[:, :dim]
    signs = np.sign(eigvecs[np.abs(eigvecs).argmax(axis=0), np.arange(dim)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    reg = eigvals + shrinkage * eigvals.mean() + 1e-12
    proj = (eigvecs / np.sqrt(reg)).T
    return {
        "mean": mean.astype(np.float32),
        "proj": proj.astype(np.float32),
        "eigvals": eigvals.astype(np.float32),
    }


def apply_whitening(x: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Project and L2-normalise. x: (n, D) -> (n, dim) float32."""
    y = (np.asarray(x, np.float32) - mean) @ proj.T
    return (y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def captured_energy(x: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> float:
    """Share of the centred energy of x (n, D) inside the model's principal subspace (the rows of
    ``proj`` (d, D), normalised back to an orthonormal basis)."""
    basis = proj / (np.linalg.norm(proj, axis=1, keepdims=True) + 1e-12)
    xc = np.asarray(x, np.float64) - mean
    total = float((xc**2).sum())
    return float(((xc @ basis.T) ** 2).sum()) / total if total > 0 else 1.0


def subspace_drift(old: np.ndarray, new: np.ndarray, dim: int) -> float:
    """How much worse ``new`` rows are described by the principal subspace of the ``old`` ones than
    unseen old rows are: a PCA of ``dim`` components is fitted on the first half of ``old`` (rows in
    random order), then 1 - captured(new) / captured(second half), at least 0. Both shares are out of
    sample, so the measure does not grow merely because the fit had few rows; 0 when ``old`` has fewer
    than 4 rows or ``new`` none."""
    half = len(old) // 2
    if not len(new) or half < 2:
        return 0.0
    fit = np.asarray(old[:half], np.float64)
    mean = fit.mean(axis=0)
    basis = principal_basis(fit - mean, dim)
    held = captured_energy(old[half:], mean, basis)
    return max(0.0, 1.0 - captured_energy(new, mean, basis) / held) if held > 0 else 0.0


def principal_basis(xc: np.ndarray, dim: int) -> np.ndarray:
    """Orthonormal basis (d, D) of the ``dim`` leading principal directions of centred rows xc (n, D),
    d = min(dim, n - 1, D): from the thin SVD of xc when n <= D (O(n²D), what a reindex of a collection
    smaller than the descriptor dimension meets), else from the eigenvectors of xcᵀxc (O(nD² + D³))."""
    n, d_in = xc.shape
    dim = max(1, min(dim, n - 1, d_in))
    if n <= d_in:
        return np.linalg.svd(xc, full_matrices=False)[2][:dim]
    eigvals, eigvecs = np.linalg.eigh(xc.T @ xc)
    return eigvecs[:, np.argsort(eigvals)[::-1][:dim]].T


def learned_whitening_file(descriptor: str, base: bool = False) -> str:
    """Where a fine-tuned folder keeps the learned whitening of ``descriptor``: fitted on the fine-tuned
    model's vectors, or (``base``) on the off-the-shelf model's it started from."""
    return f"whitening-{descriptor}{'-base' if base else ''}.npz"


def learned_whitening(
    x: np.ndarray, qidx: np.ndarray, pidx: np.ndarray, dim: int, shrinkage: float
) -> dict[str, np.ndarray]:
    """Learned whitening Lw from matching pairs (Radenović et al., ECCV 2016; ``whitenlearn`` of
    cnnimageretrieval-pytorch): whiten by the inverse square root (Cholesky) of the covariance of the
    pair differences x[q] - x[p], then rotate by the PCA of all whitened vectors.

    x: (n, D); qidx, pidx: (m,) row indices of the pairs. The difference covariance is regularised by
    ``shrinkage`` times its mean eigenvalue (with fewer pairs than dimensions it is singular otherwise).
    Keeps ``dim`` leading components (0: all). Returns mean (D,), proj (dim, D), eigvals (dim,) in the
    format of ``pca_whitening_from_moments``: whitened y = proj @ (x - mean)."""
    x = np.asarray(x, np.float64)
    qidx, pidx = np.asarray(qidx), np.asarray(pidx)
    if qidx.size == 0:
        raise ValueError("learned whitening needs at least one matching pair")
    mean = x[qidx].mean(axis=0)  # (D,)
    diff = x[qidx] - x[pidx]  # (m, D)
    cov = diff.T @ diff / diff.shape[0]  # (D, D)
    cov = cov + (shrinkage * np.trace(cov) / cov.shape[0] + 1e-12) * np.eye(cov.shape[0])
    chol = np.linalg.cholesky(cov)  # cov = L Lᵀ
    p = np.linalg.inv(chol)  # (D, D): whitens the differences
    white = (x - mean) @ p.T  # (n, D)
    eigvals, eigvecs = np.linalg.eigh(white.T @ white)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
    dim = eigvecs.shape[1] if dim <= 0 else min(dim, eigvecs.shape[1])
    eigvals, eigvecs = eigvals[:dim], eigvecs[:, :dim]
    signs = np.sign(eigvecs[np.abs(eigvecs).argmax(axis=0), np.arange(dim)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    proj = eigvecs.T @ p  # (dim, D)
    return {
        "mean": mean.astype(np.float32),
        "proj": proj.astype(np.float32),
        "eigvals": eigvals.astype(np.float32),
    }
