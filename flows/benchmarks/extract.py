"""Side-by-side benchmarks: our engine path vs a plain baseline on the same inputs, in one run."""

from __future__ import annotations

import io
import logging
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from embedpipe.storage.contracts.errors import DecodeError
from embedpipe.workers.engines.ray_stages import (
    cluster_cpus,
    cluster_gpus,
    pool_size,
    ray_session,
    stream_descriptors,
)
from embedpipe.workers.extract.embed import Embedder, shape_buckets
from embedpipe.workers.ingest.decode import decode_image, target_size
from embedpipe.workers.ingest.sources import InputRef, read_input
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.bench")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plain_loop(paths: list[InputRef], embedder: Embedder, cfg: Config, label: str) -> tuple[float, int, int]:
    """Baseline: one process, torch on every core; per batch of ``extract.batch_size``, read + decode
    each image, then forward + pool them as ours does (same-shape images stacked up to
    ``forward_batch``). Returns (seconds, failed inputs, forward passes)."""
    start = time.perf_counter()
    progress = Progress(label, len(paths), log)
    failed = forwards = 0
    size = cfg.extract.batch_size
    for k in range(0, len(paths), size):
        images = []
        for ref in paths[k : k + size]:
            try:
                data = read_input(ref.uri, ref.offset, ref.length, cfg.ingest.timeout_s, cfg.ingest.retries)
                images.append(decode_image(data, cfg.extract.max_side, cfg.ingest.max_pixels)[0])
            except DecodeError:
                failed += 1
        embedder.embed_many(images)
        forwards += len(shape_buckets([im.shape for im in images], embedder.forward_batch))
        progress.update(len(paths[k : k + size]))
    progress.finish()
    return time.perf_counter() - start, failed, forwards


def _timed_stream(paths: list[InputRef], cfg: Config, label: str) -> dict[str, Any]:
    """One pass of the extraction stage inside a running Ray session."""
    pool = pool_size(cfg.extract, cluster_cpus(), cluster_gpus())
    t0 = time.perf_counter()
    progress = Progress(label, len(paths), log)
    failed, first_s, first_n = 0, None, 0
    for batch in stream_descriptors(paths, cfg):
        failed += int((batch["error"] != "").sum())
        progress.update(len(batch["pos"]))
        if first_s is None:  # actor start-up and model load end with the first batch
            first_s, first_n = time.perf_counter() - t0, progress.done
    progress.finish()
    run = time.perf_counter() - t0
    steady = (len(paths) - first_n) / (run - first_s) if first_s is not None and run > first_s else 0.0
    return {
        "time_s": round(run, 3),
        "first_batch_s": round(first_s or 0.0, 3),
        "steady_images_per_s": round(steady, 3),
        "images_per_s": round(len(paths) / run, 3),
        "failed": failed,
        "actors": pool.actors,
        "threads_per_actor": pool.threads,
        "gpus_per_actor": pool.actor_gpus,
    }


def bench_extract(paths: list[InputRef], cfg: Config, sweep: list[int] | None = None) -> dict[str, Any]:
    """Plain loop vs the Ray pipeline on the same images in one run; then, optionally, the pipeline again
    for each actor count of ``sweep``. ``ratio`` = baseline time / ours, Ray start-up excluded (reported),
    the baseline's model load included as ours includes its actors' start."""
    for ref in {r.uri: r for r in paths}.values():  # same page-cache state for both sides
        if "://" not in ref.uri:
            Path(ref.uri).read_bytes()
    # The baseline runs half its images before ours and half after, so a machine whose speed drifts
    # during the run (shared hosts do) biases neither side.
    t0 = time.perf_counter()
    embedder = Embedder(cfg.extract, threads=os.cpu_count() or 1)
    load_s = time.perf_counter() - t0
    half = len(paths) // 2
    half -= half % cfg.extract.batch_size  # both halves batched as ours is
    first_s, failed_1, forwards_1 = plain_loop(paths[:half], embedder, cfg, "bench baseline (1st half)")
    start = time.perf_counter()
    with ray_session(cfg.ray):
        startup = time.perf_counter() - start
        ours = {**_timed_stream(paths, cfg, "bench ours"), "startup_s": round(startup, 3)}
        runs = []
        for actors in sweep or []:
            swept = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"actors": actors})})
            runs.append(_timed_stream(paths, swept, f"bench sweep actors={actors}"))
    second_s, failed_2, forwards_2 = plain_loop(paths[half:], embedder, cfg, "bench baseline (2nd half)")
    total = load_s + first_s + second_s
    baseline = {
        "time_s": round(total, 3),
        "model_load_s": round(load_s, 3),
        "images_per_s": round(len(paths) / total, 3),
        "halves_images_per_s": [
            round(half / first_s, 3) if half else None,
            round((len(paths) - half) / second_s, 3),
        ],
        "failed": failed_1 + failed_2,
        "threads": os.cpu_count() or 1,
    }
    return {
        "name": "extract",
        "n_images": len(paths),
        "backbone": cfg.extract.backbone,
        "max_side": cfg.extract.max_side,
        "descriptors": list(cfg.extract.descriptors),
        "cpus": os.cpu_count(),
        "device": embedder.device,
        "forward_batch": embedder.forward_batch,
        "images_per_forward": round((len(paths) - failed_1 - failed_2) / max(1, forwards_1 + forwards_2), 3),
        "ours": ours,
        "baseline": baseline,
        "ratio": round(baseline["time_s"] / ours["time_s"], 4),
        "ratio_steady": round(ours["steady_images_per_s"] / baseline["images_per_s"], 4),
        "ratio_note": "baseline_time / ours_time with Ray start-up excluded (ours.startup_s); ratio_steady "
        "compares rates after the first batch (actor start and model load)",
        "sweep": runs,
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def naive_decode(data: bytes, max_side: int) -> np.ndarray:
    """The baseline decode: full-resolution decode, then one bicubic resize to the same output size."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        size = target_size(img.width, img.height, max_side)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(img)


def large_photos(root: Path, n: int, side: int = 3000) -> list[Path]:
    """JPEGs with a longer side of ``side`` made from the demo dataset's real photos (upscaled, quality
    92), for a decode benchmark whose outputs are several times smaller than its inputs."""
    from embedpipe.workers.ingest.demo_data import generate_demo

    info = generate_demo(root / "demo")
    sources = sorted(info.root.glob("*.jpg"))[:n]
    out = []
    for i, src in enumerate(sources):
        path = root / f"large-{i:04d}.jpg"
        if not path.exists():
            with Image.open(src) as img:
                scale = side / max(img.width, img.height)
                big = img.convert("RGB").resize(
                    (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
                )
                big.save(path, format="JPEG", quality=92)
        out.append(path)
    return out


def _time_decodes(blobs: list[bytes], fn, max_side: int) -> float:
    start = time.perf_counter()
    for data in blobs:
        fn(data, max_side)
    return time.perf_counter() - start


def bench_decode(files: list[Path], cfg: Config, repeats: int = 3, n_cosine: int = 16) -> dict[str, Any]:
    """Our DCT-domain JPEG downscale + resize vs a full decode + resize to the same size, on the same
    in-memory files, alternating the two ``repeats`` times (best time of each); then the cosine between
    the descriptors the two paths give (first descriptor of ``cfg.extract``), so the speed can be weighed
    against the change it makes."""
    max_side = cfg.extract.max_side
    blobs = [p.read_bytes() for p in files]
    ours_s, base_s = [], []
    for _ in range(repeats):
        ours_s.append(_time_decodes(blobs, lambda d, m: decode_image(d, m, cfg.ingest.max_pixels), max_side))
        base_s.append(_time_decodes(blobs, naive_decode, max_side))
    embedder = Embedder(cfg.extract, threads=os.cpu_count() or 1)
    name = cfg.extract.descriptors[0]
    cosines = []
    for data in blobs[:n_cosine]:
        a = embedder(decode_image(data, max_side)[0])[name]
        b = embedder(naive_decode(data, max_side))[name]
        cosines.append(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    with Image.open(io.BytesIO(blobs[0])) as img:
        source = img.size
    ours, base = min(ours_s), min(base_s)
    return {
        "name": "decode",
        "n_images": len(blobs),
        "max_side": max_side,
        "source_size_first": list(source),
        "ours": {
            "time_s": round(ours, 6),
            "images_per_s": round(len(blobs) / ours, 3),
            "method": "draft+bicubic",
        },
        "baseline": {
            "time_s": round(base, 6),
            "images_per_s": round(len(blobs) / base, 3),
            "method": "full decode+bicubic",
        },
        "ratio": round(base / ours, 4),
        "descriptor": name,
        "cosine": {
            "mean": round(float(np.mean(cosines)), 6),
            "min": round(float(np.min(cosines)), 6),
            "n": len(cosines),
        },
    }


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each sample to its nearest centroid (exact, FAISS Flat)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    d2, _ = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return float(d2.mean())


def bench_codebook(cfg: Config, feature: str = "rootsift") -> dict[str, Any]:
    """faiss k-means (ours) vs scikit-learn MiniBatchKMeans on the same Dask-sampled descriptors, same k,
    same iterations, same seed, random initialisation on both sides, in one run. Local features of
    ``cfg.images`` are extracted first (Ray) into ``cfg.out``; only the two k-means fits are timed."""
    from sklearn.cluster import MiniBatchKMeans

    from embedpipe.storage.contracts.layout import RunLayout
    from embedpipe.storage.dataset import plan_shards
    from embedpipe.workers.classical.codebook import train_kmeans
    from embedpipe.workers.descriptors.local import STORED_FEATURE, local_store
    from embedpipe.workers.engines.dask_jobs import sample_local
    from embedpipe.workers.extract.stage import extract_all

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
            "method": "faiss.Kmeans",
            "time_s": round(ours_s, 4),
            "inertia": inertia(sample, ours_c),
            "threads": faiss_threads(),
        },
        "baseline": {
            "method": "sklearn MiniBatchKMeans (batch 4096, random init)",
            "time_s": round(base_s, 4),
            "inertia": inertia(sample, mbk.cluster_centers_),
            "epochs_run": int(mbk.n_iter_),
        },
        "ratio": round(base_s / max(ours_s, 1e-9), 4),
        "ratio_note": "baseline_time / ours_time for the k-means fit alone, same sample, k and iterations; "
        "inertia = mean squared distance to the nearest centroid on the sample (lower is better)",
    }


def faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())
