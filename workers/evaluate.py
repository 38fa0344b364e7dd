"""Index and evaluate one descriptor: raw and PCA-whitened variants, exact search, protocol mAP."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.storage.artifacts import load_npz
from embedpipe.storage.features import read_features, read_store_manifest
from embedpipe.storage.layout import RunLayout
from embedpipe.workers.ann import build_index, bytes_per_vector, search, write_index
from embedpipe.workers.metrics import compute_map
from embedpipe.workers.protocols import ground_truth
from embedpipe.workers.whitening import apply_whitening

if TYPE_CHECKING:
    from embedpipe.flows.config import Config

log = logging.getLogger("embedpipe.evaluate")
KAPPAS = (1, 5, 10)


def whitening_name(descriptor: str) -> str:
    return f"pcaw-{descriptor}"


def variants(
    layout: RunLayout, cfg: Config, descriptor: str, vectors: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """(post-processing name, vectors) pairs: the raw L2-normalised descriptor, then PCA-whitened."""
    out = [("l2", vectors)]
    if cfg.fit.whiten:
        arrays, _ = load_npz(layout.model(whitening_name(descriptor)))
        out.append(
            (f"pcaw{arrays['proj'].shape[0]}", apply_whitening(vectors, arrays["mean"], arrays["proj"]))
        )
    return out


def index_and_evaluate(layout: RunLayout, cfg: Config, descriptor: str) -> tuple[list[dict[str, Any]], int]:
    """Build and save one index per variant, search every query, compute the protocol's metrics.

    Returns the result rows (metrics.json contract) and the number of queries."""
    meta, vectors = read_features(layout.feature_dir(descriptor))
    store = read_store_manifest(layout.feature_dir(descriptor))
    paths = meta.column("path").to_pylist()
    gt = ground_truth(cfg.protocol, paths)
    rows = []
    for post, x in variants(layout, cfg, descriptor, vectors):
        name = f"{descriptor}-{post}"
        start = time.perf_counter()
        index = build_index(x, cfg.index.factory)
        write_index(index, layout.index_dir(name) / "index.faiss")
        pq.write_table(
            pa.table(
                {
                    "row": np.arange(len(paths), dtype=np.int64),
                    "id": meta.column("id"),
                    "path": meta.column("path"),
                }
            ),
            layout.index_dir(name) / "ids.parquet",
        )
        row: dict[str, Any] = {
            "descriptor": descriptor,
            "post": post,
            "backbone": store["backbone"],
            "dim": int(x.shape[1]),
            "index": cfg.index.factory,
            "bytes_per_vector": bytes_per_vector(index),
        }
        if gt is not None:
            _, ranks = search(index, x[gt.queries], index.ntotal)
            layout.report_dir.mkdir(parents=True, exist_ok=True)
            np.save(layout.report_dir / f"ranks-{name}.npy", ranks)
            result = compute_map(ranks, gt.positives, gt.junk, KAPPAS)
            row.update({"map": result["map"], **{f"mp@{k}": result[f"mp@{k}"] for k in KAPPAS}})
            log.info("evaluate: %s mAP %.4f over %d queries", name, result["map"], result["n_queries"])
        row["time_s"] = round(time.perf_counter() - start, 4)
        rows.append(row)
    return rows, 0 if gt is None else int(gt.queries.size)
