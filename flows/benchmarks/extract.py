"""``embedpipe bench extract``: the extraction stage on Ray (decode tasks + model actors) vs a plain
single-process torch loop on the same images, in one run; optionally the stage again for a sweep of
model-actor counts."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.flows.benchmarks.common import (
    add_images_argument,
    add_json_argument,
    add_n_argument,
    peak_rss_mb,
    with_demo_images,
    write_result,
)
from embedpipe.storage.contracts.errors import DecodeError, InputError
from embedpipe.workers.ingest.decode import decode_image
from embedpipe.workers.ingest.sources import read_input
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.inputs import InputRef
    from embedpipe.workers.extract.embed import Embedder

log = logging.getLogger("embedpipe.bench")


def plain_loop(paths: list[InputRef], embedder: Embedder, cfg: Config, label: str) -> tuple[float, int, int]:
    """Baseline: one process, torch on every core; per batch of ``extract.batch_size``, read + decode
    each image, then forward + pool them as ours does (same-shape images stacked up to
    ``forward_batch``). Returns (seconds, failed inputs, forward passes)."""
    from embedpipe.workers.extract.embed import shape_buckets

    start = time.perf_counter()
    progress = Progress(label, len(paths), log)
    failed = forwards = 0
    size, ing = cfg.extract.batch_size, cfg.ingest
    for k in range(0, len(paths), size):
        images = []
        for ref in paths[k : k + size]:
            try:
                data = read_input(ref.uri, ref.offset, ref.length, ing.timeout_s, ing.retries, ing.max_bytes)
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
    from embedpipe.workers.engines.ray_stages import cluster_cpus, cluster_gpus, pool_size, stream_descriptors

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
    from embedpipe.workers.engines.ray_stages import ray_session
    from embedpipe.workers.extract.embed import Embedder

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
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    add_images_argument(parser)
    add_n_argument(parser)
    parser.add_argument(
        "--sweep", default="", metavar="N,N,...", help="also time the pipeline with these model-actor counts"
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """--n inputs of --images (default: the demo dataset), cycled."""
    from embedpipe.flows.config import config_from_args
    from embedpipe.workers.ingest.sources import list_inputs

    if args.n < 1:
        raise InputError("--n must be at least 1")
    try:
        sweep = [int(v) for v in args.sweep.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sweep expects comma-separated actor counts, got '{args.sweep}'") from None
    if any(v < 1 for v in sweep):
        raise InputError("--sweep actor counts must be at least 1")
    cfg = with_demo_images(config_from_args(args))
    refs = list_inputs(cfg.images).refs
    if not refs:
        raise InputError(f"no usable inputs at {cfg.images}")
    result = bench_extract([refs[i % len(refs)] for i in range(args.n)], cfg, sweep)
    write_result(result, args.json)
    log.info(
        "bench extract: ours %.1f img/s, baseline %.1f img/s, ratio %.3f",
        result["ours"]["images_per_s"],
        result["baseline"]["images_per_s"],
        result["ratio"],
    )
    return 0
