"""Re-ranking by descriptor augmentation (pure numpy): αQE and DBA (Radenović et al., TPAMI 2018).

Both replace a vector by the similarity^α-weighted sum of itself and its k nearest database neighbours,
then L2-normalise. αQE does it for the queries, DBA for every database vector. The neighbours come
from the caller's search (``sims``, ``idx``: (n, k) best first), so the maths stays engine-free.
"""

from __future__ import annotations

import numpy as np


def weighted_expansion(
    x: np.ndarray, database: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float, include_self: bool
) -> np.ndarray:
    """x'_i = normalise(x_i·[include_self] + Σ_j max(sims_ij, 0)^α · database[idx_ij]).

    x: (n, D); database: (N, D); sims, idx: (n, k), idx -1 for missing neighbours -> (n, D) float32."""
    valid = idx >= 0
    weights = np.where(valid, np.clip(sims, 0.0, None), 0.0) ** alpha
    weights = np.where(valid, weights, 0.0)
    out = np.einsum("nk,nkd->nd", weights, database[np.where(valid, idx, 0)].astype(np.float64))
    if include_self:
        out += x
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def alpha_qe(
    queries: np.ndarray, database: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float
) -> np.ndarray:
    """αQE: each query plus its top-k database vectors weighted by similarity^α (query weight 1)."""
    return weighted_expansion(queries, database, sims, idx, alpha, include_self=True)


def dba(database: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float) -> np.ndarray:
    """DBA: each database vector replaced by the weighted sum over its k+1 nearest database vectors,
    which include itself (similarity 1); ``sims``/``idx`` come from searching the database with itself."""
    return weighted_expansion(database, database, sims, idx, alpha, include_self=False)


def drop_excluded(
    sims: np.ndarray, idx: np.ndarray, exclude: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, remove the neighbours listed in ``exclude[i]`` (e.g. the query itself when it is in the
    database) and keep the first k of the rest; rows short of k are padded with idx -1."""
    out_s = np.zeros((len(idx), k), dtype=np.float32)
    out_i = np.full((len(idx), k), -1, dtype=np.int64)
    for i in range(len(idx)):
        keep = ~np.isin(idx[i], exclude[i]) & (idx[i] >= 0)
        s, j = sims[i][keep][:k], idx[i][keep][:k]
        out_s[i, : len(j)], out_i[i, : len(j)] = s, j
    return out_s, out_i
