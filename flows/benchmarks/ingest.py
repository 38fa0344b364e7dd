"""``embedpipe bench ingest``: our ingest stage against img2dataset on the same URL list, in one run.

Photos: distinct JPEGs made deterministically from the demo dataset's real photos (a random crop, a mirror
flip for half of them, scaled to a longer side of 1200-2000 px, so that both tools downscale), served over
HTTP from 127.0.0.1 by a child process (``flows/benchmarks/http_serve.py``). img2dataset runs from a
virtual environment of its own (created once under the user's cache folder, or any Python given with
``--baseline-python``) as a subprocess with its WebDataset output, the same output size, shard size and
number of processes as our ingest has CPUs. The sides run baseline, ours, ours, baseline, each into a
fresh folder, so drift of a shared machine biases neither; then half of our shards are removed and our
ingest re-run, to show that only those are fetched again, to the same bytes. Last, each side ingests a
list of one photo: its fixed cost (process or Ray start-up and shut-down), which a larger ``--n``
amortises."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from embedpipe.flows.benchmarks.common import (
    add_images_argument,
    add_json_argument,
    add_n_argument,
    cache_dir,
    check_side_python,
    side_python,
    write_result,
)
from embedpipe.flows.benchmarks.http_serve import serve_folder
from embedpipe.storage.contracts.errors import InputError

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.bench")

PHOTOS_VERSION = 1
IMG2DATASET = "img2dataset==1.47.0"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
ORDER = ("baseline", "ours", "ours", "baseline")


# ------------------------------------------------------------------------------------------ the photos


def bench_photos(root: Path, n: int, seed: int = 0, sides: tuple[int, int] = (1200, 2000)) -> list[Path]:
    """``n`` distinct JPEGs (quality 90) in ``root``, made from the demo dataset's photos: photo
    ``i % 22``, a random crop of 60-100 % of each side, mirrored for half of them, resized (bicubic) to a
    random longer side in ``sides``. Deterministic in (``seed``, i); files already there are kept."""
    from embedpipe.workers.ingest.demo_data import DISTRACTOR_PHOTOS, QUERY_PHOTOS, load_photo

    root.mkdir(parents=True, exist_ok=True)
    names = QUERY_PHOTOS + DISTRACTOR_PHOTOS
    out = [root / f"photo-{i:05d}.jpg" for i in range(n)]
    todo = [i for i, path in enumerate(out) if not path.exists()]
    if not todo:
        return out
    photos = [load_photo(*name) for name in names]

    def make(i: int) -> None:
        tmp = out[i].with_name(f".{out[i].name}.tmp")
        rng = np.random.default_rng([seed, PHOTOS_VERSION, i])
        _variant(photos[i % len(names)], rng, sides).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, out[i])

    log.info("bench ingest: making %d photos in %s", len(todo), root)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL resizes and encodes outside the GIL
        list(pool.map(make, todo))
    return out


def _variant(photo: Image.Image, rng: np.random.Generator, sides: tuple[int, int]) -> Image.Image:
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(sides[0], sides[1] + 1))
    scale = side / max(cw, ch)
    return img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)


def write_url_list(path: Path, base: str, files: list[Path]) -> Path:
    """One URL a line (the ``txt`` input of both tools)."""
    path.write_text("".join(f"{base}/{f.name}\n" for f in files))
    return path


# ------------------------------------------------------------------------------------- the baseline env


def img2dataset_python(venv: Path | None = None, system_site_packages: bool = False) -> Path:
    """The Python of a virtual environment with img2dataset, created at ``venv`` (default: the user's
    cache folder) on first use and reused after; ``system_site_packages`` lets it reuse this
    environment's packages where they satisfy img2dataset's requirements (faster to create).
    Raises ``InputError`` with one line when it cannot be installed."""
    return side_python(
        IMG2DATASET, "img2dataset", venv or cache_dir() / "img2dataset-venv", system_site_packages
    )


def check_baseline_python(python: Path) -> Path:
    """``python`` must exist and import img2dataset (``InputError`` otherwise)."""
    return check_side_python(python, "img2dataset")


# ------------------------------------------------------------------------------------------- the sides


def run_img2dataset(
    python: Path, urls: Path, out: Path, max_side: int, processes: int, threads: int, per_shard: int
) -> dict[str, Any]:
    """img2dataset on ``urls`` into ``out`` (WebDataset, longer side ``max_side`` when larger, like
    ours); returns its wall time and counts from its own stats files."""
    args = {
        "url_list": urls,
        "input_format": "txt",
        "output_folder": out,
        "output_format": "webdataset",
        "image_size": max_side,
        "resize_mode": "keep_ratio_largest",
        "resize_only_if_bigger": True,
        "processes_count": processes,
        "thread_count": threads,
        "number_sample_per_shard": per_shard,
        "timeout": 30,
        "retries": 2,
        "enable_wandb": False,
    }
    cmd = [str(python), "-c", "import img2dataset; img2dataset.main()"]
    cmd += [f"--{k}={v}" for k, v in args.items()]
    env = {**os.environ, "WANDB_MODE": "disabled", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = [s for s in done.stderr.splitlines() if s.strip()][-1:] or [f"exit {done.returncode}"]
        raise InputError(f"img2dataset failed: {tail[0].strip()}")
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    return {
        "time_s": round(seconds, 3),
        "ok": sum(s.get("successes", 0) for s in stats),
        "failed": sum(s.get("failed_to_download", 0) + s.get("failed_to_resize", 0) for s in stats),
        **_tar_outputs(out, "url"),
    }


def run_ours(urls: Path, out: Path, cfg: Config, max_side: int) -> dict[str, Any]:
    """Our ingest stage (Ray start-up included, as a user's ``embedpipe ingest`` has it)."""
    from embedpipe.workers.ingest.stage import run_ingest

    start = time.perf_counter()
    result = run_ingest(str(urls), out, cfg, max_side)
    seconds = time.perf_counter() - start
    return {
        "time_s": round(seconds, 3),
        "ok": result.n_ok,
        "failed": result.n_quarantined,
        **_tar_outputs(out, "source"),
    }


def _tar_outputs(out: Path, url_field: str) -> dict[str, Any]:
    """Shard count, bytes, images and each image's (width, height) by URL, from the tar shards."""
    tars = sorted(out.glob("*.tar"))
    sizes: dict[str, tuple[int, int]] = {}
    for t in tars:
        with tarfile.open(t) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                stem, _, ext = m.name.partition(".")
                handle = tar.extractfile(m) if m.isfile() else None
                if handle is not None and (ext == "json" or "." + ext in IMAGE_EXTS):
                    samples.setdefault(stem, {})[ext] = handle.read()
            for sample in samples.values():
                image = next((v for k, v in sample.items() if "." + k in IMAGE_EXTS), None)
                if image is None or "json" not in sample:
                    continue
                with Image.open(io.BytesIO(image)) as img:
                    sizes[json.loads(sample["json"])[url_field]] = img.size
    return {
        "shards": len(tars),
        "images_in_shards": len(sizes),
        "output_bytes": sum(t.stat().st_size for t in tars),
        "sizes": sizes,
    }


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def resume_check(urls: Path, out: Path, cfg: Config, max_side: int) -> dict[str, Any]:
    """Remove the second half of the shards of a finished ingest in ``out`` (an ingest stopped mid-way),
    re-run it, and report what was redone and whether every shard came back byte-identical."""
    from embedpipe.workers.ingest.stage import run_ingest

    before = _digests(out)
    removed = sorted(before)[len(before) // 2 :]
    for name in removed:
        (out / name).unlink()
    start = time.perf_counter()
    result = run_ingest(str(urls), out, cfg, max_side)
    seconds = time.perf_counter() - start
    return {
        "shards": len(before),
        "removed": len(removed),
        "written": result.shards_written,
        "kept": result.shards_kept,
        "time_s": round(seconds, 3),
        "identical": _digests(out) == before,
    }


def _side_summary(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    mean = sum(r["time_s"] for r in runs) / len(runs)
    last = runs[-1]
    return {
        "time_s": round(mean, 3),
        "images_per_s": round(n / mean, 3),
        "runs_s": [r["time_s"] for r in runs],
        "ok": last["ok"],
        "failed": last["failed"],
        "images_in_shards": last["images_in_shards"],
        "shards": last["shards"],
        "output_bytes": last["output_bytes"],
    }


def bench_ingest(
    cfg: Config, n: int, max_side: int, work: Path, baseline_python: Path, photos: list[Path] | None = None
) -> dict[str, Any]:
    """The whole benchmark (see the module doc); ``work`` holds the outputs while it runs."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    per_shard = cfg.extract.shard_size
    threads = 16
    work.mkdir(parents=True, exist_ok=True)
    if photos is None:
        photos = bench_photos(work / "photos", n, cfg.seed)
    photos = photos[:n]
    ids = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photos}
    with Image.open(photos[0]) as img:
        first = img.size
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    kept = max(k for k, side in enumerate(ORDER) if side == "ours")  # its output serves the resume check
    with serve_folder(photos[0].parent) as base:
        urls = write_url_list(work / "urls.txt", base, photos)
        for k, side in enumerate(ORDER):
            out = work / f"out-{k}-{side}"
            shutil.rmtree(out, ignore_errors=True)
            log.info("bench ingest: run %d of %d, %s", k + 1, len(ORDER), side)
            if side == "ours":
                run = run_ours(urls, out, cfg, max_side)
            else:
                run = run_img2dataset(baseline_python, urls, out, max_side, cpus, threads, per_shard)
            runs[side].append(run)
            log.info("bench ingest: %s %.1f s (%d ok)", side, run["time_s"], run["ok"])
            if k != kept:
                shutil.rmtree(out, ignore_errors=True)
        resume = resume_check(urls, work / f"out-{kept}-ours", cfg, max_side)
        shutil.rmtree(work / f"out-{kept}-ours", ignore_errors=True)
        one = write_url_list(work / "one.txt", base, photos[:1])
        fixed = {
            "ours_s": run_ours(one, work / "fixed-ours", cfg, max_side)["time_s"],
            "baseline_s": run_img2dataset(
                baseline_python, one, work / "fixed-baseline", max_side, cpus, threads, per_shard
            )["time_s"],
            "note": "each side on a list of one photo: start-up and shut-down, next to nothing of the work",
        }
    ours_sizes, base_sizes = runs["ours"][-1]["sizes"], runs["baseline"][-1]["sizes"]
    common = set(ours_sizes) & set(base_sizes)
    ours, baseline = _side_summary(runs["ours"], n), _side_summary(runs["baseline"], n)
    return {
        "name": "ingest",
        "n_images": n,
        "distinct_inputs": len(ids),
        "first_input_size": list(first),
        "max_side": max_side,
        "cpus": cpus,
        "shard_size": per_shard,
        "order": list(ORDER),
        "ours": {
            **ours,
            "method": "embedpipe ingest (Ray Data tasks, libjpeg-turbo decode at the DCT scale, WebDataset "
            "shards + manifest)",
        },
        "baseline": {
            **baseline,
            "method": f"{IMG2DATASET} webdataset, keep_ratio_largest, resize_only_if_bigger",
            "processes": cpus,
            "threads": threads,
        },
        "ratio": round(baseline["time_s"] / ours["time_s"], 4),
        "ratio_note": "baseline_time / ours_time, each the mean of its two runs (order above), process or "
        "Ray start-up included on both sides",
        "same_images": ours["ok"] == baseline["ok"] == n
        and ours["images_in_shards"] == baseline["images_in_shards"] == n,
        "sizes_compared": len(common),
        "sizes_differing": sum(
            max(abs(a - b) for a, b in zip(ours_sizes[u], base_sizes[u], strict=True)) > 1 for u in common
        ),
        "resume": resume,
        "fixed": fixed,
    }


# ---------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    add_images_argument(parser)
    add_n_argument(parser)
    parser.add_argument(
        "--max-side", type=int, default=512, help="longer side of the output images (default 512)"
    )
    parser.add_argument(
        "--baseline-python",
        type=Path,
        metavar="PY",
        help="a Python with img2dataset installed (default: a virtual environment created once under "
        "~/.cache/embedpipe)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Our ingest vs img2dataset on the same photos served from 127.0.0.1 (see the module doc)."""
    from embedpipe.flows.config import engine_overrides, load_config

    if args.n < 1:
        raise InputError("--n must be at least 1")
    if args.max_side < 32:
        raise InputError("--max-side must be at least 32")
    overrides = {"images": args.images, "out": args.out, **engine_overrides(args)}
    cfg = load_config(preset=args.preset or "default", overrides=overrides, sets=args.sets)
    photos = None
    if cfg.images is not None:
        root = Path(cfg.images)
        if not root.is_dir():
            raise InputError(f"bench ingest: --images must be a folder of image files, got {cfg.images}")
        photos = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS)[: args.n]
        if len(photos) < args.n:
            raise InputError(f"bench ingest: {root} has {len(photos)} images, --n asks for {args.n}")
    if args.baseline_python is not None:
        python = check_baseline_python(args.baseline_python)
    else:
        python = img2dataset_python()
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-ingest-") as tmp:
        if photos is None:
            cache = Path(tempfile.gettempdir()) / f"embedpipe-bench-ingest-photos-v{PHOTOS_VERSION}"
            photos = bench_photos(cache / f"seed{cfg.seed}", args.n, cfg.seed)
        result = bench_ingest(cfg, args.n, args.max_side, Path(tmp), python, photos)
    write_result(result, args.json)
    log.info(
        "bench ingest: ours %.1f img/s, img2dataset %.1f img/s, ratio %.3f",
        result["ours"]["images_per_s"],
        result["baseline"]["images_per_s"],
        result["ratio"],
    )
    return 0
