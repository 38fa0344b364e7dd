"""``embedpipe bench decode``: our DCT-domain JPEG downscale + resize vs a full decode + resize to the same
size, on the same in-memory files, with the cosine between the descriptors the two paths give; and
libjpeg-turbo through simplejpeg as a candidate decoder, at our DCT scale and at its finer ones."""

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
import simplejpeg
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


def simplejpeg_decode(data: bytes, max_side: int, fine: bool = False) -> np.ndarray:
    """The candidate: a JPEG (no EXIF turn) decoded by libjpeg-turbo through simplejpeg, then one bicubic
    resize to our output size. At the DCT scale ``Image.draft`` picks (1/8, 1/4, 1/2 or 1, accurate IDCT
    and smooth upsampling as Pillow's decoder), or with ``fine`` at the smallest of libjpeg-turbo's
    scales in eighths that keeps both sides at least the output size."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    size = target_size(width, height, max_side)
    if fine:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1])
    else:
        ratio = min(width // size[0], height // size[1])
        scale = next(s for s in (8, 4, 2, 1) if ratio >= s)
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_width=-(-width // scale),
            min_height=-(-height // scale),
            min_factor=scale,
        )
    img = Image.fromarray(pixels, "RGB")
    return np.asarray(img.resize(size, Image.Resampling.BICUBIC) if img.size != size else img)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _time_decodes(blobs: list[bytes], fn, max_side: int) -> float:
    start = time.perf_counter()
    for data in blobs:
        fn(data, max_side)
    return time.perf_counter() - start


def bench_decode(files: list[Path], cfg: Config, repeats: int = 3, n_cosine: int = 16) -> dict[str, Any]:
    """Our DCT-domain JPEG downscale + resize vs a full decode + resize to the same size, on the same
    in-memory files, alternating the two ``repeats`` times (best time of each); then the cosine between
    the descriptors the two paths give (first descriptor of ``cfg.extract``), so the speed can be weighed
    against the change it makes. The simplejpeg candidate (``simplejpeg_decode``) is timed in the same
    rounds on the JPEGs: at our scale it must give our very pixels (``same_pixels``), at its finer scales
    the cosine of its descriptors to ours says whether it stays within 0.9999."""
    from embedpipe.workers.extract.embed import Embedder

    max_side = cfg.extract.max_side
    blobs = [p.read_bytes() for p in files]
    jpegs = [d for d in blobs if d[:2] == b"\xff\xd8"]
    ours_s, base_s, same_s, fine_s, ours_jpeg_s = [], [], [], [], []
    for _ in range(repeats):
        ours_s.append(_time_decodes(blobs, lambda d, m: decode_image(d, m, cfg.ingest.max_pixels), max_side))
        base_s.append(_time_decodes(blobs, naive_decode, max_side))
        ours_jpeg_s.append(
            _time_decodes(jpegs, lambda d, m: decode_image(d, m, cfg.ingest.max_pixels), max_side)
        )
        same_s.append(_time_decodes(jpegs, simplejpeg_decode, max_side))
        fine_s.append(_time_decodes(jpegs, lambda d, m: simplejpeg_decode(d, m, fine=True), max_side))
    embedder = Embedder(cfg.extract, threads=os.cpu_count() or 1)
    name = cfg.extract.descriptors[0]
    cosines, fine_cosines = [], []
    for data in blobs[:n_cosine]:
        a = embedder(decode_image(data, max_side)[0])[name]
        cosines.append(_cosine(a, embedder(naive_decode(data, max_side))[name]))
        if data in jpegs:
            fine_cosines.append(_cosine(a, embedder(simplejpeg_decode(data, max_side, fine=True))[name]))
    same_pixels = all(
        np.array_equal(decode_image(d, max_side)[0], simplejpeg_decode(d, max_side)) for d in jpegs
    )
    megapixels = []
    for data in blobs:
        with Image.open(io.BytesIO(data)) as img:
            megapixels.append(img.width * img.height / 1e6)
    with Image.open(io.BytesIO(blobs[0])) as img:
        source = img.size
    ours, base, ours_jpeg = min(ours_s), min(base_s), min(ours_jpeg_s) if jpegs else 0.0
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
        "simplejpeg": {
            "n": len(jpegs),
            "ours_time_s": round(ours_jpeg, 6),
            "same_scale": {
                "time_s": round(min(same_s), 6) if jpegs else None,
                "ratio": round(ours_jpeg / min(same_s), 4) if jpegs else None,
                "same_pixels": same_pixels,
            },
            "fine_scale": {
                "time_s": round(min(fine_s), 6) if jpegs else None,
                "ratio": round(ours_jpeg / min(fine_s), 4) if jpegs else None,
                "cosine": {
                    "mean": round(float(np.mean(fine_cosines)), 6) if fine_cosines else None,
                    "min": round(float(np.min(fine_cosines)), 6) if fine_cosines else None,
                    "n": len(fine_cosines),
                },
            },
            "note": "ratio = our time / the candidate's on the JPEGs; used only if faster and, at other "
            "scales than ours, with a descriptor cosine of at least 0.9999 to ours",
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
