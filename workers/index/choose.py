"""Index choice under a budget: sweep candidate factories and their search parameters on a sample,
measure recall@k against exact search, QPS, bytes/vector, build time and (when ground truth exists) mAP,
and pick the best-mAP candidate that fits the memory budget and reaches the target recall."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import faiss
import numpy as np

from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.evaluate.metrics import compute_map
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.evaluate.study import pca_factories, pq_factory
from embedpipe.workers.index import ann

log = logging.getLogger("embedpipe.index")

SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def nlist_for(n: int) -> int:
    """Inverted lists: a power of two near sqrt(n), at least 4, with 39 training vectors per list."""
    nlist = 2 ** max(2, round(math.log2(max(n, 1)) / 2))
    while nlist > 4 and n < 39 * nlist:
        nlist //= 2
    return nlist


def auto_candidates(dim: int, n: int) -> list[str]:
    """Exact, PCA-reduced, IVF, PQ (flat and IVF), HNSW and LSH candidates that ``n`` vectors can train."""
    out = pca_factories(dim, n)
    nlist = nlist_for(n)
    if n >= nlist:
        out.append(f"IVF{nlist},Flat")
    for nbytes in (8, 16, 32, 64):
        pq = pq_factory(dim, n, nbytes)
        if pq is None:
            continue
        out.append(pq)
        head, _, tail = pq.rpartition(",")
        out.append(f"{head + ',' if head else ''}IVF{nlist},{tail}")
    out += ["HNSW32", "LSH"]
    return list(dict.fromkeys(out))


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: mean fraction of the exact top-k found in the returned top-k."""
    return float(np.mean([np.intersect1d(f[:k], t[:k]).size / k for f, t in zip(found, truth, strict=True)]))


def _param(index: faiss.Index) -> tuple[str | None, int]:
    ivf = ann._ivf(index)
    if ivf is not None:
        return "nprobe", ivf.nlist
    if isinstance(ann._base(index), faiss.IndexHNSW):
        return "efsearch", SWEEP[-1]
    return None, 1


def measure(
    x: np.ndarray, queries: np.ndarray, truth: np.ndarray, factory: str, k: int, target: float, seed: int
) -> dict[str, Any]:
    """Build one candidate on ``x``; sweep its search parameter (powers of two) until recall@k reaches
    ``target``; QPS of that setting."""
    start = time.perf_counter()
    index = ann.build_index(x, factory, seed)
    build_s = time.perf_counter() - start
    name, top = _param(index)
    row: dict[str, Any] = {"index": factory, "bytes_per_vector": ann.bytes_per_vector(index)}
    for value in [v for v in SWEEP if v <= top] if name else [0]:
        if name:
            ann.set_search_params(index, value, value)
        start = time.perf_counter()
        found = ann.search(index, queries, k)[1]
        seconds = max(time.perf_counter() - start, 1e-9)
        row.update(
            {
                "param": name,
                "value": value if name else None,
                "recall": round(recall_at_k(found, truth, k), 4),
                "qps": round(len(queries) / seconds, 1),
            }
        )
        if row["recall"] >= target:
            break
    row["build_s"] = round(build_s, 4)
    row["_index"] = index
    return row


def choose_index(
    x: np.ndarray,
    gt: GroundTruth | None,
    budget: int,
    target: float,
    k: int = 10,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every candidate's row and the pick: within ``budget`` bytes/vector, reaching ``target`` recall@k,
    best mAP (ground truth given) or else fewest bytes, then fastest. Without a candidate reaching the
    target, the best recall within budget."""
    x = np.ascontiguousarray(x, np.float32)
    queries = (
        x[gt.queries]
        if gt is not None
        else x[np.random.default_rng(seed).choice(len(x), min(100, len(x)), replace=False)]
    )
    exact = ann.build_index(x, "Flat")
    truth = ann.search(exact, queries, k)[1]
    rows = []
    for factory in auto_candidates(x.shape[1], len(x)):
        try:
            row = measure(x, queries, truth, factory, k, target, seed)
        except InputError as err:
            log.info("index auto: %s skipped (%s)", factory, err)
            continue
        index = row.pop("_index")
        if gt is not None:
            ranks = ann.search(index, queries, index.ntotal)[1]
            row["map"] = float(compute_map(ranks, gt.positives, gt.junk)["map"])
        rows.append(row)
    fits = [r for r in rows if r["bytes_per_vector"] <= budget]
    if not fits:
        raise InputError(f"no index candidate fits index.budget_bytes_per_vector={budget}")
    good = [r for r in fits if r["recall"] >= target]
    if good:
        pick = max(good, key=lambda r: (r.get("map", 0.0), -r["bytes_per_vector"], r["qps"]))
    else:
        pick = max(fits, key=lambda r: (r["recall"], r.get("map", 0.0)))
        log.warning(
            "index auto: no candidate within budget reaches recall %.2f; best is %.3f", target, pick["recall"]
        )
    for r in rows:
        r["picked"] = r is pick
    log.info(
        "index auto: picked %s (%d bytes/vector, recall@%d %.3f, mAP %s) among %d candidates",
        pick["index"],
        pick["bytes_per_vector"],
        k,
        pick["recall"],
        pick.get("map"),
        len(rows),
    )
    return pick, rows
