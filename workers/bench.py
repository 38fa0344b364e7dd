"""Side-by-side benchmarks: our engine path vs a plain baseline on the same inputs, in one run."""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.storage.errors import DecodeError
from embedpipe.workers.decode import decode_image
from embedpipe.workers.embed import Embedder
from embedpipe.workers.progress import Progress
from embedpipe.workers.ray_stages import cluster_cpus, pool_size, ray_session, stream_descriptors

if TYPE_CHECKING:
    from embedpipe.flows.config import Config

log = logging.getLogger("embedpipe.bench")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plain_loop(paths: list[str], cfg: Config) -> dict[str, Any]:
    """Baseline: one process, read + decode + forward + pool each image in turn, torch on every core."""
    start = time.perf_counter()
    embedder = Embedder(cfg.extract, threads=os.cpu_count() or 1)
    load_s = time.perf_counter() - start
    progress = Progress("bench baseline", len(paths), log)
    failed = 0
    for path in paths:
        try:
            image, _ = decode_image(Path(path).read_bytes(), cfg.extract.max_side)
            embedder(image)
        except DecodeError:
            failed += 1
        progress.update(1)
    progress.finish()
    total = time.perf_counter() - start
    return {
        "time_s": round(total, 3),
        "model_load_s": round(load_s, 3),
        "images_per_s": round(len(paths) / total, 3),
        "failed": failed,
        "threads": os.cpu_count() or 1,
    }


def ray_pipeline(paths: list[str], cfg: Config) -> dict[str, Any]:
    """Ours: the extraction stage exactly as the pipeline runs it (Ray start-up timed apart)."""
    start = time.perf_counter()
    with ray_session(cfg.ray):
        startup = time.perf_counter() - start
        actors, threads, _ = pool_size(cfg.extract, cluster_cpus())
        t0 = time.perf_counter()
        progress = Progress("bench ours", len(paths), log)
        failed, first_s, first_n = 0, None, 0
        for batch in stream_descriptors(paths, cfg.extract, cfg.ray):
            failed += int((batch["error"] != "").sum())
            progress.update(len(batch["pos"]))
            if first_s is None:  # actor start-up and model load end with the first batch
                first_s, first_n = time.perf_counter() - t0, progress.done
        progress.finish()
        run = time.perf_counter() - t0
        steady = (len(paths) - first_n) / (run - first_s) if first_s is not None and run > first_s else 0.0
    return {
        "time_s": round(run, 3),
        "startup_s": round(startup, 3),
        "first_batch_s": round(first_s or 0.0, 3),
        "steady_images_per_s": round(steady, 3),
        "images_per_s": round(len(paths) / run, 3),
        "failed": failed,
        "actors": actors,
        "threads_per_actor": threads,
    }


def bench_extract(paths: list[str], cfg: Config) -> dict[str, Any]:
    for path in paths:  # same page-cache state for both sides
        Path(path).read_bytes()
    baseline = plain_loop(paths, cfg)
    ours = ray_pipeline(paths, cfg)
    return {
        "name": "extract",
        "n_images": len(paths),
        "backbone": cfg.extract.backbone,
        "max_side": cfg.extract.max_side,
        "descriptors": list(cfg.extract.descriptors),
        "cpus": os.cpu_count(),
        "ours": ours,
        "baseline": baseline,
        "ratio": round(baseline["time_s"] / ours["time_s"], 4),
        "ratio_note": "baseline_time / ours_time; ours excludes Ray start-up (ours.startup_s)",
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1),
    }
