"""``embedpipe bench decode``: our DCT-domain JPEG downscale + resize vs a full decode + resize to the same
size, on the same in-memory files, with the cosine between the descriptors the two paths give."""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from embedpipe.flows.benchmarks.common import (
    add_images_argument,
    add_json_argument,
    add_n_argument,
    write_result,
)
from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.ingest.decode import decode_image, target_size

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.bench")


def naive_decode(data: bytes, max_side: int) -> np.ndarray:
    """The baseline decode: full-resolution decode, then one bicubic resize to the same output size."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        size = target_size(img.width, img.height, max_side)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(img)


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
    from embedpipe.workers.extract.embed import Embedder

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
    megapixels = []
    for data in blobs:
        with Image.open(io.BytesIO(data)) as img:
            megapixels.append(img.width * img.height / 1e6)
    with Image.open(io.BytesIO(blobs[0])) as img:
        source = img.size
    ours, base = min(ours_s), min(base_s)
    return {
        "name": "decode",
        "n_images": len(blobs),
        "max_side": max_side,
        "source_size_first": list(source),
        "source_megapixels": {"mean": round(float(np.mean(megapixels)), 3), "min": round(min(megapixels), 3)},
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    add_images_argument(parser)
    add_n_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Local image files of --images (default: up to 64 mosaics of bundled real photographs at their stored
    resolution, 1.5 megapixels or more, never upscaled)."""
    from embedpipe.flows.config import config_from_args

    cfg = config_from_args(args)
    if cfg.images is None:
        from embedpipe.workers.ingest.demo_data import native_mosaics

        files = native_mosaics(Path(tempfile.gettempdir()) / "embedpipe-bench-decode", min(args.n, 64))
    else:
        from embedpipe.workers.ingest.sources import list_inputs

        files = [Path(r.uri) for r in list_inputs(cfg.images).refs if r.offset < 0 and "://" not in r.uri]
        files = files[: args.n]
    if not files:
        raise InputError("bench decode needs local image files")
    result = bench_decode(files, cfg)
    write_result(result, args.json)
    log.info(
        "bench decode: ours %.1f img/s, baseline %.1f img/s, ratio %.2f, descriptor cosine mean %.4f",
        result["ours"]["images_per_s"],
        result["baseline"]["images_per_s"],
        result["ratio"],
        result["cosine"]["mean"],
    )
    return 0
