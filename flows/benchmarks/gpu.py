"""``embedpipe bench gpu``: how many images per second one GPU extracts, and what limits it.

On the same in-memory JPEGs (real photographs that ship with scikit-image and scikit-learn, seeded crops
at their stored resolution, never upscaled), batch by batch with the GPU synchronised before each clock
read: (1) nvJPEG decode on the GPU plus resize and normalisation there, (2) the model alone (a
channels-last conv trunk under fp16/bf16 autocast, GeM pooled) on those ready batches, (3) both in turn,
as an actor doing its own decoding would run them, with the GPU's busy share sampled from NVML meanwhile,
and (4) our CPU decode (libjpeg's DCT-domain downscale, ``workers.ingest.decode``) on one core, to say
how many cores would have to decode to keep up with the GPU. Descriptors of the GPU path are compared with
the same path in fp32 on the CPU. Throughput does not depend on the weights' values: the trunk is built with
random weights (``torchvision`` architecture), which the JSON says. Runs without the CLI too:
``python -m embedpipe.flows.benchmarks.gpu --json OUT`` (no engine, no config needed)."""

from __future__ import annotations

import argparse
import io
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from embedpipe.flows.benchmarks.common import add_json_argument, write_result
from embedpipe.storage.contracts.errors import InputError

log = logging.getLogger("embedpipe.bench")

TARGET = 2000  # images/s for ResNet-50 at 224 px in fp16 on one H100-class GPU


def bench_jpegs(n: int, seed: int = 0, min_side: int = 320) -> list[bytes]:
    """``n`` distinct JPEGs (quality 90): seeded random crops, at least ``min_side`` on each side, of the
    bundled colour photographs at their stored resolution, mirrored at random."""
    from PIL import Image

    from embedpipe.workers.ingest.demo_data import NATIVE_PHOTOS, _photo_path

    photos = []
    for package, name in NATIVE_PHOTOS:
        with Image.open(_photo_path(package, name)) as img:
            photos.append(img.convert("RGB"))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        w = int(rng.integers(min(min_side, photo.width), photo.width + 1))
        h = int(rng.integers(min(min_side, photo.height), photo.height + 1))
        x, y = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
        crop = photo.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _busy_sampler(stop: threading.Event, samples: list[int]) -> None:
    """GPU utilisation (%) from NVML every 20 ms until ``stop``; nothing when NVML is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - no NVML: the share is reported as null
        return
    while not stop.wait(0.02):
        samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def bench_gpu(n: int, batch: int, side: int, precision: str, arch: str, seed: int = 0) -> dict[str, Any]:
    """The four measurements of the module doc on ``n`` JPEGs in batches of ``batch`` (the first batch of
    each a warm-up, not timed). Raises ``InputError`` without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise InputError("bench gpu needs a CUDA device (none is visible)")
    import torchvision

    from embedpipe.workers.descriptors.backbones import IMAGENET_MEAN, IMAGENET_STD, torchvision_trunk
    from embedpipe.workers.extract.gpu import BatchEmbedder, decode_jpegs, square_batch
    from embedpipe.workers.ingest.decode import decode_image

    blobs = bench_jpegs(n + batch, seed)
    warm, blobs = blobs[:batch], blobs[batch:]
    batches = [blobs[i : i + batch] for i in range(0, n, batch)]
    torch.manual_seed(seed)
    trunk = torchvision_trunk(torchvision.models.get_model(arch, weights=None))
    gpu = BatchEmbedder(trunk, "cuda", precision, ("gem",))
    sync = torch.cuda.synchronize

    def prepare(chunk: list[bytes]) -> torch.Tensor:
        return square_batch(decode_jpegs(chunk, "cuda"), side, IMAGENET_MEAN, IMAGENET_STD)

    gpu(prepare(warm))  # warm-up: nvJPEG handles, cuDNN algorithm choice, autocast caches
    sync()
    t0 = time.perf_counter()
    ready = [prepare(chunk) for chunk in batches]
    sync()
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in ready:
        gpu(x)
    sync()
    model_s = time.perf_counter() - t0
    del ready
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_busy_sampler, args=(stop, samples), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    for chunk in batches:
        gpu(prepare(chunk))
    sync()
    both_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    cpu_n = min(len(blobs), 200)
    t0 = time.perf_counter()
    for data in blobs[:cpu_n]:
        decode_image(data, side)
    cpu_s = time.perf_counter() - t0
    # the GPU path in fp16/bf16 against the same path in fp32 on the CPU, on a few images
    probe = blobs[:8]
    ours = gpu(prepare(probe))["gem"].float().cpu()
    cpu = BatchEmbedder(trunk, "cpu", "fp32", ("gem",))
    ref = cpu(square_batch(decode_jpegs(probe, "cpu"), side, IMAGENET_MEAN, IMAGENET_STD))["gem"]
    cosine = torch.nn.functional.cosine_similarity(ours, ref.float(), dim=1)
    decode_ips, model_ips = _rate(n, decode_s), _rate(n, model_s)
    per_core = _rate(cpu_n, cpu_s)
    both = _rate(n, both_s)
    return {
        "name": "gpu",
        "device": torch.cuda.get_device_name(0),
        "backbone": f"torchvision:{arch}",
        "weights": "random (throughput does not depend on the weights' values)",
        "precision": precision,
        "side": side,
        "batch": batch,
        "n_images": n,
        "source_megapixels_mean": round(float(np.mean([_pixels(b) for b in blobs])) / 1e6, 3),
        "decode_gpu": {"images_per_s": decode_ips, "way": "nvJPEG batch decode + resize + normalise"},
        "model": {"images_per_s": model_ips, "way": f"{arch} channels-last, {precision} autocast, GeM"},
        "end_to_end": {
            "images_per_s": both,
            "gpu_busy_pct": round(float(np.mean(samples)), 1) if samples else None,
            "way": "decode then model, batch after batch, on one CUDA stream",
        },
        "cpu_decode": {
            "images_per_s_per_core": per_core,
            "cores_to_feed_the_gpu": round(min(decode_ips, model_ips) / per_core, 1),
            "cores_here": os.cpu_count(),
            "way": "workers.ingest.decode (libjpeg DCT-domain downscale) on one core",
        },
        "limit": "decode" if decode_ips < model_ips else "model",
        "target_images_per_s": TARGET,
        "cosine_min": round(float(cosine.min()), 6),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def _pixels(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.width * img.height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    parser.add_argument("--n", type=int, default=4096, help="images timed (default 4096)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--side", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument(
        "--precision", choices=("fp16", "bf16", "fp32"), default="fp16", help="autocast (default fp16)"
    )
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture (default resnet50)")


def run(args: argparse.Namespace) -> int:
    """nvJPEG decode and the model on one GPU, apart and together (see the module doc)."""
    if args.n < 1 or args.batch < 1 or args.side < 32:
        raise InputError("--n and --batch must be at least 1, --side at least 32")
    result = bench_gpu(args.n, args.batch, args.side, args.precision, args.arch)
    write_result(result, args.json)
    log.info(
        "bench gpu: decode %.0f img/s, model %.0f img/s, both %.0f img/s (limit: %s)",
        result["decode_gpu"]["images_per_s"],
        result["model"]["images_per_s"],
        result["end_to_end"]["images_per_s"],
        result["limit"],
    )
    return 0


if __name__ == "__main__":  # on a GPU machine without the CLI's dependencies
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m embedpipe.flows.benchmarks.gpu")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
