"""Index and evaluate a bag-of-words descriptor: tf-idf inverted file (exact cosine), then spatial
verification of each query's shortlist. Rows follow the metrics.json contract of workers/evaluate/stage.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from embedpipe.storage.artifacts import save_npy
from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import read_parts, read_store_manifest
from embedpipe.storage.index_folder import save_ids
from embedpipe.storage.local_features import bow_schema, list_values
from embedpipe.workers.descriptors.bow import (
    InvertedFile,
    inverse_document_frequency,
    term_frequencies,
    tfidf,
)
from embedpipe.workers.descriptors.local import STORED_FEATURE, encoding_of, local_store
from embedpipe.workers.evaluate.database import run_ground_truth
from embedpipe.workers.evaluate.metrics import compute_map
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.evaluate.rerank import verified_inliers, verified_order, word_matches
from embedpipe.workers.evaluate.stage import provenance

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, VerifyConfig

log = logging.getLogger("embedpipe.evaluate")
KAPPAS = (1, 5, 10)


def _concat(directory: Path, columns: list[str] | None, schema: pa.Schema) -> pa.Table:
    table = read_parts(directory, columns)
    return table if table is not None else schema.empty_table().select(columns or schema.names)


def read_bow(directory: Path) -> tuple[pa.Table, list[np.ndarray], list[np.ndarray]]:
    """(id/path table, words per image, weights per image) of a BoW store, in store order."""
    table = _concat(directory, None, bow_schema())
    ow, words = list_values(table, "words")
    _, weights = list_values(table, "weights")
    spans = list(zip(ow[:-1], ow[1:], strict=True))
    return (
        table.select(["id", "path"]),
        [words[a:b].astype(np.int64) for a, b in spans],
        [weights[a:b] for a, b in spans],
    )


KEYPOINT_COLUMNS = ["x", "y", "size", "angle"]


def read_keypoints(directory: Path) -> list[np.ndarray]:
    """Keypoints per image of a local-feature store: (n_i, 4) float32 x, y, size, angle."""
    table = read_parts(directory, KEYPOINT_COLUMNS)
    if table is None:
        return []
    offsets, _ = list_values(table, "x")
    kp = np.stack([list_values(table, c)[1] for c in KEYPOINT_COLUMNS], axis=1).astype(np.float32)
    return [kp[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def bow_vectors(
    words: list[np.ndarray], weights: list[np.ndarray], k: int, cfg: Config
) -> tuple[sp.csr_matrix, np.ndarray]:
    """(tf-idf rows (N, k) L2-normalised, idf (k,))."""
    tf = term_frequencies(words, weights, k)
    idf = inverse_document_frequency(tf)
    return tfidf(tf, idf, cfg.bow.burstiness), idf


def spatial_verification(
    ranks: np.ndarray,
    queries: np.ndarray,
    words: list[np.ndarray],
    keypoints: list[np.ndarray],
    m: int,
    v: VerifyConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Verify each query's top ``verify.shortlist`` results: one-to-one inliers of fast spatial matching
    on the keypoints sharing their nearest word (``verified_inliers``), then the verified results first
    (``verified_order``). ranks: (nq, N); queries: (nq,) database rows of the queries; words: per image,
    m words per keypoint (the first is the nearest); keypoints: per image (n_i, 4) x, y, size, angle.
    -> (re-ranked (nq, N), inliers (nq, S) of the original shortlist)."""
    s = min(v.shortlist, ranks.shape[1])
    out = np.empty_like(ranks)
    inliers = np.zeros((len(queries), s), np.int32)
    tolerances = (v.scale_tolerance, v.angle_tolerance, v.hypotheses)
    for qi, q in enumerate(queries):
        wq, kq = words[q][::m], keypoints[q]
        for j, c in enumerate(ranks[qi, :s]):
            ia, ib = word_matches(wq, words[c][::m], v.max_word_matches)
            inliers[qi, j] = verified_inliers(kq, keypoints[c], ia, ib, v.model, v.threshold, *tolerances)
        out[qi] = verified_order(ranks[qi], inliers[qi], v.min_inliers)
    return out, inliers


def sv_summary(ranks: np.ndarray, inliers: np.ndarray, gt: GroundTruth, min_inliers: int) -> dict[str, float]:
    """Mean over queries of the best inlier count among results that are not the query's junk (for
    Holidays: not the query itself), and of the number of such results verified (>= min_inliers)."""
    best, verified = [], []
    for qi in range(len(inliers)):
        own = np.isin(ranks[qi, : inliers.shape[1]], gt.junk[qi])
        counts = inliers[qi][~own]
        best.append(int(counts.max(initial=0)))
        verified.append(int((counts >= min_inliers).sum()))
    return {"sv_inliers": float(np.mean(best)), "sv_verified": float(np.mean(verified))}


def evaluate_bow(layout: RunLayout, cfg: Config, descriptor: str) -> tuple[list[dict[str, Any]], int]:
    """Inverted file over tf-idf BoW vectors, ranks of every query, then spatial verification."""
    directory = layout.feature_dir(descriptor)
    store = read_store_manifest(directory)
    k, m = int(store["dim"]), int(store["neighbours"])
    meta, words, weights = read_bow(directory)
    gt = run_ground_truth(layout, cfg, meta.column("path"))
    if gt is not None and gt.query_keys:
        raise InputError(f"{descriptor}: box-cropped queries ({cfg.protocol}) are not supported for BoW yet")
    start = time.perf_counter()
    x, idf = bow_vectors(words, weights, k, cfg)
    ivf = InvertedFile(x)
    name = f"{descriptor}-tfidf"
    _save_index(layout, name, ivf, idf, meta)
    base = {
        "descriptor": descriptor,
        "post": "tfidf-sqrt" if cfg.bow.burstiness else "tfidf",
        "backbone": store["backbone"],
        "dim": k,
        "index": "inverted-file",
        "bytes_per_vector": int(round(ivf.bytes_per_vector())),
        **provenance(cfg, descriptor, "tfidf", "inverted-file", k),
    }
    if gt is None:
        return [{**base, "rerank": "none", "time_s": round(time.perf_counter() - start, 4)}], 0
    layout.report_dir.mkdir(parents=True, exist_ok=True)
    ranks = ivf.search(x[gt.queries], ivf.ntotal)[1]
    rows = [_row(layout, base, "none", ranks, gt, name, start)]
    if cfg.verify.enabled:
        start = time.perf_counter()
        _, feature = encoding_of(descriptor)
        keypoints = read_keypoints(layout.feature_dir(local_store(STORED_FEATURE[feature])))
        if len(keypoints) != len(words):
            raise ValueError(f"{descriptor}: {len(words)} BoW rows but {len(keypoints)} local-feature rows")
        sv_ranks, inliers = spatial_verification(ranks, gt.queries, words, keypoints, m, cfg.verify)
        save_npy(layout.report_dir / f"sv-inliers-{name}.npy", inliers)
        row = _row(layout, base, "sv", sv_ranks, gt, name, start)
        row.update(
            {"sv_shortlist": int(inliers.shape[1]), **sv_summary(ranks, inliers, gt, cfg.verify.min_inliers)}
        )
        rows.append(row)
    return rows, int(gt.queries.size)


def _row(
    layout: RunLayout,
    base: dict[str, Any],
    method: str,
    ranks: np.ndarray,
    gt: GroundTruth,
    name: str,
    start: float,
) -> dict[str, Any]:
    suffix = "" if method == "none" else f"-{method}"
    save_npy(layout.report_dir / f"ranks-{name}{suffix}.npy", ranks)
    result = compute_map(ranks, gt.positives, gt.junk, KAPPAS)
    log.info("evaluate: %s%s mAP %.4f over %d queries", name, suffix, result["map"], result["n_queries"])
    return {
        **base,
        "rerank": method,
        "map": result["map"],
        **{f"mp@{k}": result[f"mp@{k}"] for k in KAPPAS},
        "ranks_file": f"ranks-{name}{suffix}.npy",
        "time_s": round(time.perf_counter() - start, 4),
    }


def _save_index(layout: RunLayout, name: str, ivf: InvertedFile, idf: np.ndarray, meta: pa.Table) -> None:
    """index/<name>/inverted_file.npz (postings in CSR: indptr, indices, data; idf) and ids.parquet."""
    from embedpipe.storage.artifacts import save_npz

    folder = layout.index_dir(name)
    p = ivf.postings
    save_npz(
        folder / "inverted_file.npz",
        {"kind": "inverted-file", "n_images": ivf.ntotal, "k": int(p.shape[0])},
        indptr=p.indptr,
        indices=p.indices,
        data=p.data,
        idf=idf,
    )
    ids = pa.table(
        {
            "row": np.arange(meta.num_rows, dtype=np.int64),
            "id": meta.column("id"),
            "path": meta.column("path"),
        }
    )
    save_ids(folder, ids)
