"""Codebooks and encodings of the local-feature store: the fit stage of the bow-* and vlad-* descriptors.

fit: a Dask job samples descriptors uniformly per image (seeded by run seed and image id) from the
local-feature store, faiss k-means makes the codebook (``models/codebook-<feature>-k<k>.npz``, with the
fingerprint of what made it, and its assignment index ``.faiss``); then a Dask job encodes every part of
the local store into the descriptor's own store, one task per part, so memory stays flat:

- ``features/vlad-<feature>``: dense VLAD vectors in the global store layout, so PCA-whitening, FAISS
  search, re-ranking and the report treat them like CNN descriptors;
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
from embedpipe.workers.descriptors.bow import image_seed, sample_rows, soft_weights, vlad
from embedpipe.workers.descriptors.local import STORED_FEATURE, descriptor_vectors, encoding_of, local_store

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


def encode_part(
    kind: str,
    feature: str,
    path: str,
    out_dir: str,
    shard: int,
    n_shards: int,
    blob: np.ndarray,
    centroids: np.ndarray,
    bcfg: BowConfig,
    meta: dict[str, Any],
) -> int:
    """Encode one local-store part into the part ``shard`` of ``out_dir`` (``kind`` bow or vlad).
    Returns the number of rows written."""
    table = read_part(Path(path))
    offsets, desc = list_values(table, "descriptors") if table.num_rows else (np.zeros(1, np.int64), None)
    x = (
        descriptor_vectors(desc, feature)
        if desc is not None
        else np.zeros((0, centroids.shape[1]), np.float32)
    )
    index = cb.deserialize(blob)
    m = bcfg.soft_neighbours if kind == "bow" and bcfg.assign == "soft" else 1
    d2, words = cb.assign(index, x, m)
    missing = words < 0  # IVF assignment may find fewer than m words
    words = np.where(missing, words[:, :1], words)
    head = table.select(["id", "path", "width", "height"])
    metadata = {"embedpipe": json.dumps(meta, sort_keys=True)}
    spans = [(int(offsets[i]), int(offsets[i + 1])) for i in range(table.num_rows)]
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
        dim = centroids.size
        vectors = np.stack([vlad(x[a:b], centroids, words[a:b, 0]) for a, b in spans]) if spans else None
        flat = pa.array(vectors.reshape(-1) if vectors is not None else np.zeros(0, np.float32), pa.float32())
        out = pa.table(
            {
                **{c: head.column(c) for c in head.column_names},
                "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        ).cast(feature_schema(dim, metadata))
    write_part_table(Path(out_dir), shard, n_shards, out)
    return out.num_rows


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
    """(kind, feature, codebook size) of a bow-/vlad- descriptor."""
    kind, feature = encoding_of(descriptor)
    return kind, feature, cfg.bow.k if kind == "bow" else cfg.bow.vlad_k


def codebook_name(feature: str, k: int) -> str:
    return f"codebook-{feature}-k{k}"


def store_meta(descriptor: str, cfg: Config, n_kp_dim: int) -> dict[str, Any]:
    kind, feature, k = descriptor_info(descriptor, cfg)
    return {
        "descriptor": descriptor,
        "kind": kind,
        "backbone": f"opencv-{feature}",
        "codebook": codebook_name(feature, k),
        "k": k,
        "assign": cfg.bow.assign if kind == "bow" else "hard",
        "neighbours": cfg.bow.soft_neighbours if kind == "bow" and cfg.bow.assign == "soft" else 1,
        "local_dim": n_kp_dim,
    }


def load_codebook(layout: RunLayout, feature: str, k: int) -> tuple[np.ndarray, bytes, dict[str, Any]]:
    arrays, meta = load_npz(layout.model(codebook_name(feature, k)))
    blob = np.fromfile(layout.model(codebook_name(feature, k), ".faiss"), dtype=np.uint8)
    return arrays["centroids"], blob, meta
