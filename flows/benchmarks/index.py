"""``embedpipe bench index``: one trained IVF-PQ index filled (a) in one process with every FAISS thread
(the baseline), (b) in one process on one thread, (c) as W one-CPU Ray tasks (one per part file) then
merged (ours), each warmed alike and timed in alternation; QPS at recall@10 >= 0.9 on held-out queries
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
from embedpipe.flows.benchmarks.store import store_dir, synthetic_queries, synthetic_store
from embedpipe.storage.contracts.errors import InputError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger("embedpipe.bench")

REPEATS = 2  # timed passes of each side, after one untimed warm-up pass


def recall_at(found: np.ndarray, nearest: np.ndarray, k: int) -> float:
    """1-recall@k (FAISS benchmarks' R@k): fraction of queries whose exact nearest neighbour is among
    the k returned."""
    return float(np.mean([nearest[i] in found[i, :k] for i in range(len(nearest))]))


def qps_at_recall(
    index: faiss.Index, x: np.ndarray, queries: np.ndarray, k: int, target: float
) -> dict[str, Any]:
    """Sweep nprobe (powers of two); the first setting whose recall@k against exact search reaches
    ``target``. ``queries``: held out (drawn from the collection's distribution, not from its vectors)."""
    import faiss

    n_queries = len(queries)
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
    """(a) one process all threads, (b) one process one thread, (c) one-CPU Ray tasks per part + merge."""
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
    with ray_session(RayConfig()):
        workers = cluster_cpus()

        def ours() -> tuple[faiss.Index, float]:
            start = time.perf_counter()
            index, _ = fill_from_store(directory, trained, "ray", label="bench")
            return index, time.perf_counter() - start

        sides = {
            "ours": ours,
            "all_cores": lambda: _fill_all(trained, directory, cores),
            "one_core": lambda: _fill_all(trained, directory, 1),
        }
        # every side warmed alike by one untimed pass (the first Ray pass also starts Ray's workers), then
        # REPEATS timed passes alternated between the sides; each side's time is its mean
        cold = {name: round(fill()[1], 3) for name, fill in sides.items()}
        runs: dict[str, list[float]] = {name: [] for name in sides}
        built: dict[str, faiss.Index] = {}
        for _ in range(REPEATS):
            for name, fill in sides.items():
                built[name], seconds = fill()
                runs[name].append(round(seconds, 3))
        a_s, b_s, c_s = (float(np.mean(runs[name])) for name in ("all_cores", "one_core", "ours"))
        sharded, all_cores = built["ours"], built["all_cores"]
        del built
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
            "cold_s": cold["ours"],
            "runs_s": runs["ours"],
            "way": f"{workers} one-CPU Ray tasks, one per part, then merge",
        },
        "baseline": {
            "time_s": round(a_s, 3),
            "cold_s": cold["all_cores"],
            "runs_s": runs["all_cores"],
            "way": f"one process, every FAISS thread ({cores})",
        },
        "one_core": {
            "time_s": round(b_s, 3),
            "cold_s": cold["one_core"],
            "runs_s": runs["one_core"],
            "way": "one process, one FAISS thread",
        },
        "workers": workers,
        "ratio": round(a_s / c_s, 4),
        "ratio_one_core": round(b_s / c_s, 4),
        "ratio_note": "ratio = time(one process, every FAISS thread) / time(sharded on Ray); ratio_one_core "
        f"= time(one FAISS thread) / time(sharded); each side warmed by one untimed pass, then {REPEATS} "
        "passes alternated between the sides (mean); reading the store counted in every way, Ray "
        "start-up excluded",
        "sharded_equals_single": same,
        "search": qps_at_recall(sharded, x, synthetic_queries(min(1000, len(x)), dim), 10, 0.9),
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
    log.info("bench index: ratio %.3f against one process on every thread", result["ratio"])
    return 0
