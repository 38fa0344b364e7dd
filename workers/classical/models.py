"""The models fitted on top of a codebook sample: the GMM of the Fisher vectors (fv-*), the codebook and
whitening of the triangulation embedding (temb-*), and the vocabulary adaptation of VLAD (vlad-* with
``bow.vlad_adapt``). What each is trained from, its fingerprint and its arrays; the Dask jobs that draw
the sample and save them are in ``workers/engines/dask_jobs.py``.

- ``models/gmm-<f>-k<K>.npz``: weights (K,), means (K, D), variances (K, D), float64; EM from the seeded
  k-means of the same sample the codebooks use (``workers/descriptors/fisher.py``).
- ``models/temb-<f>-k<K>.npz``: centroids (K, D) (the seeded k-means), mean (K·D,) and proj (D', K·D) of
  the PCA-whitening learnt on the triangulated sample, its first ``bow.temb_drop`` components dropped.
- ``models/codebook-<f>-k<k>-adapted.npz``: each word's mean over the indexed collection (counts beside).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.storage.contracts.errors import RunFailed
from embedpipe.storage.features import read_store_manifest
from embedpipe.workers.classical.codebook import train_kmeans
from embedpipe.workers.classical.encode import codebook_fingerprint
from embedpipe.workers.descriptors.fisher import fit_gmm
from embedpipe.workers.descriptors.temb import embedded_moments
from embedpipe.workers.fit.whitening import pca_whitening_from_moments

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

TEMB_SHRINKAGE = 1e-3  # T-emb whitening: eigenvalues + 0.1% of their mean, against amplified noise


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def sampled_fingerprint(cfg: Config, kind: str, feature: str, k: int, source: Path) -> str:
    """What a GMM (``fv``) or T-emb model (``temb``) depends on: its k-means' (the sampled store, the
    sampling and k-means settings) and its own settings."""
    own = {"fv": {"fv_iterations": cfg.bow.fv_iterations}, "temb": {"temb_drop": cfg.bow.temb_drop}}[kind]
    return _digest({"codebook": codebook_fingerprint(cfg, feature, k, source), "model": kind, **own})


def adaptation_fingerprint(codebook_meta: dict[str, Any], indexed: Path) -> str:
    """What an adapted codebook depends on: the codebook and the indexed local-feature store."""
    return _digest({"codebook": codebook_meta.get("fingerprint"), "store": read_store_manifest(indexed)})


def train_gmm(sample: np.ndarray, k: int, cfg: Config) -> dict[str, np.ndarray]:
    """Seeded k-means (as the codebooks) then ``bow.fv_iterations`` EM steps -> the GMM's arrays."""
    gmm = fit_gmm(sample, train_kmeans(sample, k, cfg.bow.iterations, cfg.seed), cfg.bow.fv_iterations)
    return {"weights": gmm.weights, "means": gmm.means, "variances": gmm.variances}


def train_temb(sample: np.ndarray, k: int, cfg: Config) -> dict[str, np.ndarray]:
    """Seeded k-means (as the codebooks), then the PCA-whitening of the triangulated sample (all the
    components the sample supports, the first ``bow.temb_drop`` dropped) -> the T-emb model's arrays."""
    centroids = train_kmeans(sample, k, cfg.bow.iterations, cfg.seed)
    total, gram, n = embedded_moments(sample, centroids)
    if n < 2:
        raise RunFailed("the triangulation embedding needs at least 2 sampled descriptors")
    white = pca_whitening_from_moments(total, gram, n, 0, TEMB_SHRINKAGE)
    drop = cfg.bow.temb_drop
    if drop >= len(white["proj"]):
        raise RunFailed(
            f"bow.temb_drop={drop} leaves nothing of the {len(white['proj'])} whitened T-emb components"
        )
    return {
        "centroids": centroids,
        "mean": white["mean"],
        "proj": np.ascontiguousarray(white["proj"][drop:]),
        "eigvals": white["eigvals"][drop:],
    }


TRAIN = {"fv": train_gmm, "temb": train_temb}
