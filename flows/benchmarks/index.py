"""``embedpipe bench index``: one trained IVF-PQ index filled (a) in one process on all cores, (b) in one
process on one core, (c) as W one-CPU Ray tasks (one per part file) then merged; QPS at recall@10 >= 0.9
and the growth of build time and size with the number of vectors."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.flows.benchmarks.common import (
    add_json_argument,
    add_store_arguments,
    peak_rss_mb,
    write_result,
)
from embedpipe.flows.benchmarks.store import store_dir, synthetic_store
from embedpipe.storage.contracts.errors import InputError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger("embedpipe.bench")


def recall_at(found: np.ndarray, nearest: np.ndarray, k: int) -> float:
    """1-recall@k (FAISS benchmarks' R@k): fraction of queries whose exact nearest neighbour is among
    the k returned."""
    return float(np.mean([nearest[i] in found[i, :k] for i in range(len(nearest))]))


def qps_at_recall(index: faiss.Index, x: np.ndarray, n_queries: int, k: int, target: float) -> dict[str, Any]:
    """Sweep nprobe (powers of two); the first setting whose recall@k against exact search reaches
    ``target``. Queries are held-out perturbations of database vectors (seeded)."""
    import faiss

    rng = np.random.default_rng(1)
    queries = x[rng.choice(len(x), n_queries, replace=False)]
    queries = queries + 0.1 * rng.standard_normal(queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(queries, 1)[1][:, 0]
    ivf = faiss.extract_index_ivf(index)
    sweep = []
    nprobe = 1
    while nprobe <= ivf.nlist:
        ivf.nprobe = nprobe
        start = time.perf_counter()
        found = index.search(queries, k)[1]
        seconds = time.perf_counter() - start
        sweep.append(
            {
                "nprobe": nprobe,
                "recall": round(recall_at(found, truth, k), 4),
                "qps": round(n_queries / seconds, 1),
            }
        )
        if sweep[-1]["recall"] >= target:
            break
        nprobe *= 2
    hit = next((s for s in sweep if s["recall"] >= target), None)
    return {"k": k, "target_recall": target, "reached": hit, "sweep": sweep}


def _fill_all(trained: np.ndarray, directory: Path, threads: int) -> tuple[faiss.Index, float]:
    """One process: read every vector, add them all with ``threads`` FAISS threads."""
    import faiss

    from embedpipe.storage.features import read_features
    from embedpipe.workers.index import ann

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        start = time.perf_counter()
        _, x = read_features(directory)
        index = ann.deserialize(trained)
        index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
        return index, time.perf_counter() - start
    finally:
        faiss.omp_set_num_threads(before)


def bench_index(
    directory: Path, rows: int, dim: int, parts: int, factory: str, growth: list[int]
) -> dict[str, Any]:
    """(a) one process all cores, (b) one process one core, (c) one-CPU Ray tasks per part + merge."""
    import faiss

    from embedpipe.storage.contracts.config import RayConfig
    from embedpipe.storage.features import read_features
    from embedpipe.workers.engines.ray_stages import cluster_cpus, ray_session
    from embedpipe.workers.index import ann
    from embedpipe.workers.index.build import fill_from_store

    synthetic_store(directory, rows, dim, parts)
    _, x = read_features(directory)
    start = time.perf_counter()
    sample = x[np.random.default_rng(0).choice(len(x), min(len(x), 50_000), replace=False)]
    trained = ann.serialize(ann.train_index(factory, sample))
    train_s = time.perf_counter() - start
    cores = faiss.omp_get_max_threads()
    all_cores, a_s = _fill_all(trained, directory, cores)
    one_core, b_s = _fill_all(trained, directory, 1)
    with ray_session(RayConfig()):
        workers = cluster_cpus()
        start = time.perf_counter()
        sharded, _ = fill_from_store(directory, trained, "ray", label="bench (cold)")
        cold_s = time.perf_counter() - start  # includes Ray worker start-up and imports
        del sharded
        start = time.perf_counter()
        sharded, _ = fill_from_store(directory, trained, "ray", label="bench")
        c_s = time.perf_counter() - start
        grown = []
        for n in growth:
            sub = synthetic_store(directory.parent / f"growth-{n}", n, dim, parts)
            start = time.perf_counter()
            idx, _ = fill_from_store(sub, trained, "ray", label=f"bench {n}")
            grown.append(
                {
                    "vectors": n,
                    "fill_s": round(time.perf_counter() - start, 3),
                    "index_mb": round(faiss.serialize_index(idx).nbytes / 2**20, 2),
                }
            )
            del idx
    same = all(
        np.array_equal(u, v) for u, v in zip(ann.codes_of(sharded), ann.codes_of(all_cores), strict=True)
    )
    return {
        "name": "index",
        "rows": rows,
        "dim": dim,
        "parts": parts,
        "factory": factory,
        "train_s": round(train_s, 3),
        "bytes_per_vector": ann.bytes_per_vector(sharded),
        "ours": {
            "time_s": round(c_s, 3),
            "cold_s": round(cold_s, 3),
            "way": f"{workers} one-CPU Ray tasks, one per part, then merge",
        },
        "baseline": {"time_s": round(b_s, 3), "way": "one process, one FAISS thread"},
        "all_cores": {"time_s": round(a_s, 3), "way": f"one process, {cores} FAISS threads"},
        "workers": workers,
        "ratio": round(b_s / c_s, 4),
        "ratio_all_cores": round(a_s / c_s, 4),
        "ratio_note": "ratio = time(one core) / time(sharded); ratio_all_cores = time(all cores) / "
        "time(sharded); reading the store counted in every way, Ray start-up excluded",
        "sharded_equals_single": same,
        "search": qps_at_recall(sharded, x, min(1000, len(x)), 10, 0.9),
        "growth": grown,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    add_store_arguments(parser, dim=128)
    parser.add_argument("--factory", default="IVF1024,PQ32", help="factory (default IVF1024,PQ32)")
    parser.add_argument(
        "--growth", default="", metavar="N,N,...", help="also time the sharded fill at these sizes"
    )


def run(args: argparse.Namespace) -> int:
    from embedpipe.workers.index.ann import check_factory

    store = store_dir(args.store, "index", args.rows, args.dim, args.parts)
    try:
        growth = [int(v) for v in args.growth.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--growth expects comma-separated sizes, got '{args.growth}'") from None
    result = bench_index(store, args.rows, args.dim, args.parts, check_factory(args.factory), growth)
    write_result(result, args.json)
    log.info("bench index: ratio %.3f", result["ratio"])
    return 0
