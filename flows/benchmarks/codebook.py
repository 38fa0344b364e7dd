"""``embedpipe bench codebook``: faiss k-means (ours) vs scikit-learn's Lloyd ``KMeans`` on the same Dask
sample of local features, same k, iterations and initial centroids, in one run (and MiniBatchKMeans beside
them for reference)."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.flows.benchmarks.common import (
    add_images_argument,
    add_json_argument,
    with_demo_images,
    write_result,
)
from embedpipe.storage.contracts.errors import RunFailed

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.bench")


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each sample to its nearest centroid (exact, FAISS Flat)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    d2, _ = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return float(d2.mean())


def bench_codebook(cfg: Config, feature: str = "rootsift") -> dict[str, Any]:
    """faiss k-means (ours) vs scikit-learn KMeans (Lloyd, n_init=1) on the same Dask-sampled descriptors,
    same k, same iterations, from the same initial centroids, in one run; MiniBatchKMeans beside them.
    Local features of ``cfg.images`` are extracted first (Ray) into ``cfg.out``; only the k-means fits
    are timed."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from embedpipe.storage.contracts.layout import RunLayout
    from embedpipe.workers.classical.codebook import train_kmeans
    from embedpipe.workers.descriptors.local import STORED_FEATURE, local_store
    from embedpipe.workers.engines.dask_jobs import sample_local
    from embedpipe.workers.engines.ray_stages import ray_session
    from embedpipe.workers.extract.stage import extract_all
    from embedpipe.workers.ingest.plan import plan_shards

    b = cfg.bow
    cfg = cfg.model_copy(
        update={"extract": cfg.extract.model_copy(update={"descriptors": (f"bow-{feature}",)})}
    )
    layout = RunLayout(cfg.out)
    plan = plan_shards(cfg.images, cfg.extract.shard_size)
    with ray_session(cfg.ray):
        extracted = extract_all(plan, cfg, layout)
        t0 = time.perf_counter()
        sample = sample_local(layout.feature_dir(local_store(STORED_FEATURE[feature])), feature, cfg)
        sample_s = time.perf_counter() - t0
    start = time.perf_counter()
    ours_c = train_kmeans(sample, b.k, b.iterations, cfg.seed)
    ours_s = time.perf_counter() - start
    init = kmeans_init(sample, b.k, cfg.seed)
    start = time.perf_counter()
    lloyd = KMeans(
        n_clusters=b.k, init=init, n_init=1, max_iter=b.iterations, tol=0.0, algorithm="lloyd"
    ).fit(sample)
    lloyd_s = time.perf_counter() - start
    ours_inertia, lloyd_inertia = inertia(sample, ours_c), inertia(sample, lloyd.cluster_centers_)
    same = abs(lloyd_inertia - ours_inertia) / max(ours_inertia, 1e-30)
    if same > SAME_INERTIA_RTOL:
        raise RunFailed(
            f"bench codebook: Lloyd's k-means from faiss's own initialisation reached another inertia "
            f"({lloyd_inertia:.6g} vs {ours_inertia:.6g}): the two sides did not do the same work"
        )
    start = time.perf_counter()
    mbk = MiniBatchKMeans(
        n_clusters=b.k,
        max_iter=b.iterations,
        batch_size=4096,
        init="random",
        n_init=1,
        random_state=cfg.seed,
        tol=0.0,
        max_no_improvement=None,
    ).fit(sample)
    base_s = time.perf_counter() - start
    return {
        "name": "codebook",
        "feature": feature,
        "n_images": extracted.n_ok,
        "n_quarantined": len(extracted.quarantined),
        "n_sample": int(len(sample)),
        "dim": int(sample.shape[1]),
        "k": b.k,
        "iterations": b.iterations,
        "sample_s": round(sample_s, 3),
        "scheduler": cfg.fit.scheduler,
        "ours": {
            "method": "faiss.Kmeans (the pipeline's train_kmeans)",
            "time_s": round(ours_s, 4),
            "inertia": ours_inertia,
            "threads": faiss_threads(),
        },
        "baseline": {
            "method": "sklearn KMeans(algorithm='lloyd', n_init=1, tol=0) from faiss's initial centroids",
            "time_s": round(lloyd_s, 4),
            "inertia": lloyd_inertia,
            "iterations_run": int(lloyd.n_iter_),
        },
        "inertia_rel_diff": same,
        "minibatch": {
            "method": "sklearn MiniBatchKMeans (batch 4096, random init; another algorithm)",
            "time_s": round(base_s, 4),
            "inertia": inertia(sample, mbk.cluster_centers_),
            "epochs_run": int(mbk.n_iter_),
            "ratio": round(base_s / max(ours_s, 1e-9), 4),
        },
        "ratio": round(lloyd_s / max(ours_s, 1e-9), 4),
        "ratio_note": "baseline_time / ours_time for the k-means fit alone: the same algorithm (Lloyd), "
        "sample, k, iterations and initial centroids on both sides (their inertias must agree within "
        "1e-3); MiniBatchKMeans beside them for reference; inertia = mean squared distance to the nearest "
        "centroid on the sample (lower is better)",
    }


# Lloyd's iterations from the same initial centroids reach the same inertia up to float rounding
SAME_INERTIA_RTOL = 1e-3


def kmeans_init(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The initial centroids faiss k-means starts from with ``seed`` (its k-means with no iteration):
    the sample points it draws, given to the baseline so both sides run Lloyd's iterations from them."""
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=0, seed=seed, verbose=False)
    km.cp.max_points_per_centroid = max(256, -(-len(x) // k))  # as train_kmeans: the whole sample
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    add_images_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Local features of every image of --images (default: the demo dataset) into --out (default: a
    temporary folder), then faiss k-means vs MiniBatchKMeans on one Dask sample of them."""
    from embedpipe.flows.config import config_from_args

    cfg = with_demo_images(config_from_args(args))
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-codebook-") as tmp:
        if args.out is None:
            cfg = cfg.model_copy(update={"out": Path(tmp)})
        result = bench_codebook(cfg)
    write_result(result, args.json)
    log.info(
        "bench codebook: k=%d on %d descriptors: faiss %.2fs, scikit-learn KMeans %.2fs, ratio %.2f",
        result["k"],
        result["n_sample"],
        result["ours"]["time_s"],
        result["baseline"]["time_s"],
        result["ratio"],
    )
    return 0
