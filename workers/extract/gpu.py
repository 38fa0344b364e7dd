"""Extraction on a GPU without the CPU decode: JPEG bytes decoded in batches by nvJPEG
(``torchvision.io.decode_jpeg`` on the device), resized and normalised there, embedded in one
channels-last forward per batch under autocast, pooled. Engine-free (torch and torchvision only); also
runs on the CPU, where it is the reference the GPU path is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - torch's usual name

from embedpipe.workers.descriptors.pooling import pool_all
from embedpipe.workers.extract.embed import precision_autocast


def decode_jpegs(blobs: Sequence[bytes], device: str) -> list[torch.Tensor]:
    """JPEG files -> (3, H, W) uint8 tensors on ``device``, decoded together (one nvJPEG batch on a GPU).
    Greyscale and CMYK files come out as RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def square_batch(images: Sequence[torch.Tensor], side: int, mean, std) -> torch.Tensor:
    """Images resized (bilinear, antialiased) to ``side`` x ``side`` and normalised: the fixed-size input
    of classification-style extraction (clip-retrieval's). -> (B, 3, side, side) float32, channels-last."""
    m = torch.tensor(mean, dtype=torch.float32, device=images[0].device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images[0].device).view(1, 3, 1, 1)
    out = torch.cat(
        [
            F.interpolate(im.unsqueeze(0).float(), size=(side, side), mode="bilinear", antialias=True)
            for im in images
        ]
    )
    return ((out / 255.0 - m) / s).contiguous(memory_format=torch.channels_last)


class BatchEmbedder:
    """A conv trunk on ``device`` (channels-last, eval) mapping a normalised batch to pooled, L2-normalised
    descriptors under ``precision`` autocast (fp16 / bf16 on a GPU; fp32 anywhere)."""

    def __init__(self, trunk: torch.nn.Module, device: str, precision: str, descriptors: tuple[str, ...]):
        self.device, self.precision, self.descriptors = device, precision, descriptors
        self.model = trunk.eval().to(device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with precision_autocast(self.device, self.precision):
            fmap = self.model(x)
        return pool_all(fmap, self.descriptors)
