"""The GPU extraction path (workers/extract/gpu.py) checked on the CPU, where it runs the same code: batched
JPEG decode against Pillow, the fixed-size batch, pooled descriptors against the one-image path; and
``bench gpu`` without a CUDA device is one error line."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from embedpipe.flows.benchmarks.gpu import bench_jpegs
from embedpipe.workers.descriptors.backbones import IMAGENET_MEAN, IMAGENET_STD
from embedpipe.workers.extract.gpu import BatchEmbedder, decode_jpegs, square_batch

from .helpers import embedpipe


def test_batched_decode_matches_pillow_and_bench_jpegs_are_real_crops():
    blobs = bench_jpegs(6, seed=3)
    assert blobs == bench_jpegs(6, seed=3) and len(set(blobs)) == 6
    images = decode_jpegs(blobs, "cpu")
    for data, image in zip(blobs, images, strict=True):
        with Image.open(io.BytesIO(data)) as img:
            ref = np.asarray(img.convert("RGB"))
            assert min(img.size) >= 300  # crops (320 px, or a whole side below it) of photos, not upscaled
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *ref.shape[:2])
        # libjpeg-turbo both ways here; nvJPEG may round differently by a level or two
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max() <= 2


def test_batch_descriptors_equal_one_image_at_a_time():
    import torchvision

    from embedpipe.workers.descriptors.backbones import torchvision_trunk

    torch.manual_seed(0)
    trunk = torchvision_trunk(torchvision.models.get_model("resnet18", weights=None))
    embed = BatchEmbedder(trunk, "cpu", "fp32", ("gem", "mac"))
    images = decode_jpegs(bench_jpegs(4, seed=1), "cpu")
    x = square_batch(images, 64, IMAGENET_MEAN, IMAGENET_STD)
    assert tuple(x.shape) == (4, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    together = embed(x)
    for i in range(4):
        alone = embed(square_batch(images[i : i + 1], 64, IMAGENET_MEAN, IMAGENET_STD))
        for name in ("gem", "mac"):
            assert torch.allclose(together[name][i], alone[name][0], atol=1e-5)
    assert torch.allclose(together["gem"].norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_without_cuda_is_one_error_line(tmp_path):
    out = embedpipe("bench", "gpu", "--n", 8, "--batch", 4, "--json", tmp_path / "gpu.json")
    assert out.returncode == 2 and not (tmp_path / "gpu.json").exists()
    assert (
        out.stderr.strip().splitlines()[-1]
        == "embedpipe: error: bench gpu needs a CUDA device (none is visible)"
    )
