"""Benches of the fitting and indexing engines, side by side in one run.

``bench pca``: Dask out-of-core moments + eigh vs reading the store into numpy + covariance + eigh vs
scikit-learn PCA on that array. Each way runs in a fresh subprocess that reports its own time and peak
RSS, so the memory numbers are not inflated by the other ways.

``bench index``: one trained IVF-PQ index filled (a) in one process on all cores, (b) in one process on
one core, (c) as W one-CPU Ray tasks (one per part file) then merged; QPS at recall@10 >= 0.9 and the
growth of build time and size with the number of vectors.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedpipe.storage.features import FeatureWriter, read_features
from embedpipe.workers.fit.whitening import pca_whitening_from_moments
from embedpipe.workers.index import ann

log = logging.getLogger("embedpipe.bench")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_store(directory: Path, rows: int, dim: int, parts: int, seed: int = 0) -> Path:
    """A feature store of ``rows`` clustered, L2-normalised float32 vectors in ``parts`` part files,
    written part by part (memory stays at one part)."""
    if (directory / "_manifest.json").is_file():
        return directory
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    scales = np.linspace(2.0, 0.2, dim, dtype=np.float32)
    writer = FeatureWriter(directory, dim, parts, {"descriptor": "synthetic"})
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    for part in range(parts):
        n = int(bounds[part + 1] - bounds[part])
        x = centres[rng.integers(0, 256, n)] + rng.standard_normal((n, dim), dtype=np.float32) * scales
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"{i:012d}" for i in range(bounds[part], bounds[part + 1])]
        zeros = np.zeros(n, np.int32)
        writer.write(part, ids, ids, zeros, zeros, x)
    writer.close()
    return directory


# ---- bench pca: the three ways, each run in a subprocess by ``_run_way``


def pca_way(way: str, directory: Path, dim: int) -> dict[str, Any]:
    """Fit PCA(-whitening) to ``dim`` components one way; time includes reading the store."""
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if way == "dask":
        from embedpipe.storage.contracts.config import FitConfig
        from embedpipe.workers.engines.dask_jobs import fit_pca_whitening

        model, n = fit_pca_whitening(directory, FitConfig(dim=dim, shrinkage=0.0, scheduler="threads"))
        eigvals = model["eigvals"]
    elif way == "numpy":
        _, x = read_features(directory)
        x64 = x.astype(np.float64)
        model = pca_whitening_from_moments(x64.sum(0), x64.T @ x64, len(x64), dim, 0.0)
        eigvals, n = model["eigvals"], len(x)
    elif way == "sklearn":
        from sklearn.decomposition import PCA

        _, x = read_features(directory)
        pca = PCA(n_components=dim, whiten=True, random_state=0).fit(x)
        eigvals, n = pca.explained_variance_.astype(np.float32), len(x)
        extra = {"svd_solver": str(getattr(pca, "_fit_svd_solver", pca.svd_solver))}
    else:
        raise ValueError(f"unknown way '{way}'")
    return {
        "time_s": round(time.perf_counter() - start, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "n": int(n),
        "eigvals_head": [float(v) for v in eigvals[:4]],
        **extra,
    }


def _run_way(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "embedpipe.flows.benchmarks.ann", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench way {args[0]} {args[1]} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pca(directory: Path, rows: int, dim: int, parts: int, components: int) -> dict[str, Any]:
    synthetic_store(directory, rows, dim, parts)
    data_mb = rows * dim * 4 / 2**20
    ways = {w: _run_way("pca", w, str(directory), str(components)) for w in ("dask", "numpy", "sklearn")}
    ours, in_memory, baseline = ways["dask"], ways["numpy"], ways["sklearn"]
    agree = float(np.max(np.abs(np.subtract(ours["eigvals_head"], in_memory["eigvals_head"]))))
    return {
        "name": "pca",
        "rows": rows,
        "dim": dim,
        "parts": parts,
        "components": components,
        "data_mb": round(data_mb, 1),
        "ours": {**ours, "way": "dask out-of-core sums + Gram (threads scheduler), eigh in numpy"},
        "in_memory": {**in_memory, "way": "read all into numpy, covariance + eigh"},
        "baseline": {**baseline, "way": "read all into numpy, scikit-learn PCA(whiten=True)"},
        "ratio": round(baseline["time_s"] / ours["time_s"], 4),
        "ratio_in_memory": round(in_memory["time_s"] / ours["time_s"], 4),
        "ours_peak_rss_vs_data": round(ours["peak_rss_mb"] / data_mb, 3),
        "eigvals_max_abs_diff": agree,
        "ratio_note": "ratio = scikit-learn time / ours; ratio_in_memory = numpy in-memory time / ours; "
        "reading the store counted in every way; peak RSS of each way's own process",
    }


# ---- bench index


def recall_at(found: np.ndarray, nearest: np.ndarray, k: int) -> float:
    """1-recall@k (FAISS benchmarks' R@k): fraction of queries whose exact nearest neighbour is among
    the k returned."""
    return float(np.mean([nearest[i] in found[i, :k] for i in range(len(nearest))]))


def qps_at_recall(index: faiss.Index, x: np.ndarray, n_queries: int, k: int, target: float) -> dict[str, Any]:
    """Sweep nprobe (powers of two); the first setting whose recall@k against exact search reaches
    ``target``. Queries are held-out perturbations of database vectors (seeded)."""
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
    from embedpipe.storage.contracts.config import RayConfig
    from embedpipe.workers.engines.ray_stages import cluster_cpus, ray_session
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
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1),
    }


if __name__ == "__main__":
    if sys.argv[1] == "pca":
        sys.stdout.write(json.dumps(pca_way(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))) + "\n")
    else:
        raise SystemExit(f"unknown bench way {sys.argv[1]}")
