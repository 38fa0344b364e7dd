"""Codebooks and encodings of the local-feature store: the fit stage of the bow-*, vlad-*, fv-* and temb-*
descriptors.

fit: a Dask job samples descriptors uniformly per image (seeded by run seed and image id) from the
local-feature store, faiss k-means makes the codebook (``models/codebook-<feature>-k<k>.npz``, with the
fingerprint of what made it, and its assignment index ``.faiss``), or the GMM of the Fisher vectors /
the triangulation embedding's codebook and whitening (``workers/classical/models.py``); then a Dask job
encodes every part of the local store into the descriptor's own store, one task per part, so memory stays
flat:

- ``features/vlad-<feature>``, ``fv-<feature>``, ``temb-<feature>``: dense vectors in the global store
  layout, so PCA-whitening, FAISS search, re-ranking and the report treat them like CNN descriptors;
- ``features/bow-<feature>``: visual words and weights per keypoint (storage/local_features.py), scored
  through the tf-idf inverted file at evaluation (workers/evaluate/bow.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedpipe.storage.artifacts import load_npz
from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import feature_schema, read_part, read_store_manifest, write_part_table
from embedpipe.storage.local_features import bow_schema, bow_table, list_values
from embedpipe.workers.classical import codebook as cb
from embedpipe.workers.descriptors.bow import image_seed, sample_rows, soft_weights, vlad, word_sums
from embedpipe.workers.descriptors.fisher import Gmm, fisher_vector
from embedpipe.workers.descriptors.local import (
    STORED_DIM,
    STORED_FEATURE,
    descriptor_vectors,
    encoding_of,
    local_store,
)
from embedpipe.workers.descriptors.temb import temb_vector

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import BowConfig, Config

log = logging.getLogger("embedpipe.fit")


def sample_part(path: str, feature: str, per_image: int, seed: int) -> np.ndarray:
    """Up to ``per_image`` descriptors of each image of one part file -> (n, D) float32 vectors."""
    table = read_part(Path(path), ["id", "descriptors"])
    if table.num_rows == 0:
        return np.zeros((0, 0), np.float32)
    offsets, desc = list_values(table, "descriptors")
    chosen = [
        offsets[i] + sample_rows(int(offsets[i + 1] - offsets[i]), per_image, image_seed(seed, image_id))
        for i, image_id in enumerate(table.column("id").to_pylist())
    ]
    return descriptor_vectors(desc[np.concatenate(chosen)], feature)


def cap_sample(blocks: list[np.ndarray], max_sample: int, seed: int) -> np.ndarray:
    """The part samples in store order, subsampled (seeded) to at most ``max_sample`` rows."""
    blocks = [b for b in blocks if b.size]
    if not blocks:
        raise RunFailed("the local-feature store has no descriptors to build a codebook from")
    x = np.concatenate(blocks)
    if len(x) > max_sample:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_sample, replace=False))]
    return np.ascontiguousarray(x, dtype=np.float32)


def _part_vectors(table: pa.Table, feature: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A local-store part's descriptors as vectors (n, D) float32 and each image's (start, end) rows."""
    if not table.num_rows:
        return descriptor_vectors(np.zeros((0, STORED_DIM[STORED_FEATURE[feature]]), np.uint8), feature), []
    offsets, desc = list_values(table, "descriptors")
    spans = [(int(offsets[i]), int(offsets[i + 1])) for i in range(table.num_rows)]
    return descriptor_vectors(desc, feature), spans


def dense_dim(kind: str, centroids: np.ndarray | None, model: dict[str, np.ndarray] | None) -> int:
    """Dimension of a dense encoding: k·D (vlad), 2·K·D (fv), the kept whitened components (temb)."""
    if kind == "vlad":
        return int(centroids.size)
    return 2 * int(model["means"].size) if kind == "fv" else len(model["proj"])


def _dense_vectors(
    kind: str,
    x: np.ndarray,
    spans: list[tuple[int, int]],
    words: np.ndarray | None,
    centroids: np.ndarray | None,
    model: dict[str, np.ndarray] | None,
    bcfg: BowConfig,
) -> np.ndarray | None:
    """One dense vector per image of the part (vlad, fv or temb) -> (images, dim) float32, None if none."""
    if not spans:
        return None
    if kind == "vlad":
        return np.stack([vlad(x[a:b], centroids, words[a:b, 0]) for a, b in spans])
    if kind == "fv":
        gmm = Gmm(model["weights"], model["means"], model["variances"])
        return np.stack([fisher_vector(x[a:b], gmm) for a, b in spans])
    c, mean, proj = model["centroids"], model["mean"], model["proj"]
    return np.stack([temb_vector(x[a:b], c, mean, proj, bcfg.temb_aggregate) for a, b in spans])


def encode_part(
    kind: str,
    feature: str,
    path: str,
    out_dir: str,
    shard: int,
    n_shards: int,
    blob: np.ndarray | None,
    centroids: np.ndarray | None,
    bcfg: BowConfig,
    meta: dict[str, Any],
    model: dict[str, np.ndarray] | None = None,
) -> int:
    """Encode one local-store part into the part ``shard`` of ``out_dir``. ``kind`` bow or vlad: through
    the codebook's assignment index ``blob``, VLAD's residuals taken to ``centroids`` (the adapted ones
    with ``bow.vlad_adapt``); fv or temb: through ``model`` (``load_encoding``). Returns the rows written."""
    table = read_part(Path(path))
    x, spans = _part_vectors(table, feature)
    words = None
    if kind in ("bow", "vlad"):
        index = cb.deserialize(blob)
        m = bcfg.soft_neighbours if kind == "bow" and bcfg.assign == "soft" else 1
        d2, words = cb.assign(index, x, m)
        missing = words < 0  # IVF assignment may find fewer than m words
        words = np.where(missing, words[:, :1], words)
    head = table.select(["id", "path", "width", "height"])
    metadata = {"embedpipe": json.dumps(meta, sort_keys=True)}
    if kind == "bow":
        w = soft_weights(np.where(missing, np.inf, d2), bcfg.soft_sigma) if m > 1 else np.ones_like(d2)
        w = np.where(missing, 0.0, w)
        out = bow_table(
            bow_schema(metadata),
            head,
            [words[a:b].reshape(-1) for a, b in spans],
            [w[a:b].reshape(-1) for a, b in spans],
        )
    else:
        dim = dense_dim(kind, centroids, model)
        vectors = _dense_vectors(kind, x, spans, words, centroids, model, bcfg)
        flat = pa.array(vectors.reshape(-1) if vectors is not None else np.zeros(0, np.float32), pa.float32())
        out = pa.table(
            {
                **{c: head.column(c) for c in head.column_names},
                "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        ).cast(feature_schema(dim, metadata))
    write_part_table(Path(out_dir), shard, n_shards, out)
    return out.num_rows


def word_sums_part(path: str, feature: str, blob: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Vocabulary adaptation of one local-store part: per-word sums (k, D) and counts (k,) of its
    descriptors, each assigned to its nearest word by the codebook's index ``blob``, and how many."""
    x, _ = _part_vectors(read_part(Path(path), ["descriptors"]), feature)
    _, words = cb.assign(cb.deserialize(blob), x, 1)
    return word_sums(x, words[:, 0], k)


# bow settings of what is fitted beside or on top of a k-means codebook, not of the codebook itself: left
# out of a codebook's meta
NOT_CODEBOOK = ("vlad_adapt", "fv_k", "fv_iterations", "temb_k", "temb_drop", "temb_aggregate")


def codebook_fingerprint(cfg: Config, feature: str, k: int, source: Path) -> str:
    """What a codebook depends on: the sampled store (its manifest), the sampling and k-means settings."""
    b = cfg.bow
    data = {
        "store": read_store_manifest(source),
        "feature": feature,
        "k": k,
        "iterations": b.iterations,
        "sample_per_image": b.sample_per_image,
        "max_sample": b.max_sample,
        "assign_flat_max": b.assign_flat_max,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def codebook_source(layout: RunLayout, cfg: Config, feature: str) -> Path:
    """The local-feature store codebooks are trained on: this run's, or ``bow.codebook_from``'s."""
    root = RunLayout(Path(cfg.bow.codebook_from)) if cfg.bow.codebook_from else layout
    source = root.feature_dir(local_store(STORED_FEATURE[feature]))
    if not (source / "_manifest.json").exists():
        raise InputError(f"no local-feature store '{source}' to train the {feature} codebook on")
    return source


def descriptor_info(descriptor: str, cfg: Config) -> tuple[str, str, int]:
    """(kind, feature, codebook size) of a bow-/vlad-/fv-/temb- descriptor (fv: GMM components)."""
    kind, feature = encoding_of(descriptor)
    b = cfg.bow
    return kind, feature, {"bow": b.k, "vlad": b.vlad_k, "fv": b.fv_k, "temb": b.temb_k}[kind]


def codebook_name(feature: str, k: int) -> str:
    return f"codebook-{feature}-k{k}"


def adapted_name(feature: str, k: int) -> str:
    """The codebook adapted to the indexed collection (``bow.vlad_adapt``)."""
    return f"{codebook_name(feature, k)}-adapted"


def model_name(descriptor: str, cfg: Config) -> str:
    """The model a descriptor is encoded with: codebook (bow, vlad), adapted codebook (vlad with
    ``bow.vlad_adapt``), ``gmm-<f>-k<k>`` (fv) or ``temb-<f>-k<k>`` (temb)."""
    kind, feature, k = descriptor_info(descriptor, cfg)
    if kind in ("fv", "temb"):
        return f"{'gmm' if kind == 'fv' else 'temb'}-{feature}-k{k}"
    return adapted_name(feature, k) if kind == "vlad" and cfg.bow.vlad_adapt else codebook_name(feature, k)


# how a dense encoding's descriptors meet the words (bow: bow.assign)
ASSIGN = {"vlad": "hard", "fv": "posterior", "temb": "all"}


def store_meta(descriptor: str, cfg: Config, n_kp_dim: int) -> dict[str, Any]:
    kind, feature, k = descriptor_info(descriptor, cfg)
    extra: dict[str, Any] = {}
    if kind == "vlad" and cfg.bow.vlad_adapt:
        extra = {"adapted": True}
    elif kind == "temb":
        extra = {"aggregate": cfg.bow.temb_aggregate, "drop": cfg.bow.temb_drop}
    return {
        "descriptor": descriptor,
        "kind": kind,
        "backbone": f"opencv-{feature}",
        "codebook": model_name(descriptor, cfg),
        "k": k,
        "assign": cfg.bow.assign if kind == "bow" else ASSIGN[kind],
        "neighbours": cfg.bow.soft_neighbours if kind == "bow" and cfg.bow.assign == "soft" else 1,
        "local_dim": n_kp_dim,
        **extra,
    }


def load_codebook(layout: RunLayout, feature: str, k: int) -> tuple[np.ndarray, bytes, dict[str, Any]]:
    arrays, meta = load_npz(layout.model(codebook_name(feature, k)))
    blob = np.fromfile(layout.model(codebook_name(feature, k), ".faiss"), dtype=np.uint8)
    return arrays["centroids"], blob, meta


def load_encoding(
    layout: RunLayout, cfg: Config, descriptor: str
) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, np.ndarray] | None]:
    """What ``encode_part`` needs for ``descriptor``: (assignment index, centroids, None) for bow and vlad
    (the adapted centroids with ``bow.vlad_adapt``, assigned through the original words), (None, None,
    model arrays) for fv and temb."""
    kind, feature, k = descriptor_info(descriptor, cfg)
    if kind in ("fv", "temb"):
        return None, None, load_npz(layout.model(model_name(descriptor, cfg)))[0]
    centroids, blob, _ = load_codebook(layout, feature, k)
    if kind == "vlad" and cfg.bow.vlad_adapt:
        centroids = load_npz(layout.model(adapted_name(feature, k)))[0]["centroids"]
    return blob, centroids, None
