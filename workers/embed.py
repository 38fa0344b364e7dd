"""One image in, one vector per descriptor out: backbone forward + poolings. Engine-free.

Used unchanged by the Ray model actor and by the plain-loop baseline of ``embedpipe bench extract``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from embedpipe.storage.errors import BackboneError
from embedpipe.workers.descriptors.backbones import load_backbone
from embedpipe.workers.descriptors.pooling import l2n, pool_all

if TYPE_CHECKING:
    from embedpipe.flows.config import ExtractConfig

FC_CODES = ("fc6", "fc7")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackboneError("extract.device is cuda but no CUDA device is visible")
    return "cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def power_normalise(x: torch.Tensor, power: float) -> torch.Tensor:
    """sign(x)·|x|^power, then L2. (B, D) -> (B, D)"""
    return l2n(x.sign() * x.abs().pow(power)) if power != 1.0 else l2n(x)


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


class Embedder:
    """Loads the backbone once; ``__call__`` maps an (H, W, 3) uint8 image to {descriptor: (C,) float32}.

    Images go through the network one at a time at their own size (no padding, no batching effects),
    so a descriptor does not depend on which other images shared its batch. With several scales, each
    scale's L2-normalised descriptor is summed before power normalisation and the final L2 (as
    cnnimageretrieval-pytorch's multi-scale extraction)."""

    def __init__(self, cfg: ExtractConfig, threads: int = 0):
        self.threads = threads
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model, self.spec = load_backbone(cfg.backbone, cfg.weights)
        self.pools = tuple(d for d in cfg.descriptors if d not in FC_CODES)
        # a fine-tuned backbone brings its learnt GeM exponent
        self.gem_p = self.spec.gem_p if self.spec.gem_p is not None else cfg.gem_p
        self.fc = tuple(d for d in cfg.descriptors if d in FC_CODES)
        if self.fc and self.spec.fc_codes is None:
            raise BackboneError(
                f"{cfg.backbone} has no fc6/fc7 layers (use a VGG-style torchvision backbone)"
            )
        self.model = self.model.to(self.device)
        if self.spec.fc_codes is not None:
            self.spec.fc_codes.to(self.device)
        if self.device == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def dims(self) -> dict[str, int]:
        fc = self.spec.fc_codes
        return {
            d: (getattr(fc, d).out_features if d in FC_CODES else self.spec.channels)
            for d in self.cfg.descriptors
        }

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, H, W) float32, normalised for the backbone."""
        pixels = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # copies only read-only input
        x = pixels.to(self.device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.device == "cuda" else x

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=DTYPES[self.cfg.precision])

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        # torch's thread count is per calling thread (OpenMP), and engines may call from another thread
        # than the one that built the embedder: set it where the work happens.
        if self.threads > 0 and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        total: dict[str, torch.Tensor] = {}
        for scale in self.cfg.scales:
            with self._autocast():
                fmap = self.model(self.preprocess(rescale(image, scale)))  # (1, C, h, w)
                codes = self.spec.fc_codes(fmap) if self.fc else {}
            pooled = pool_all(fmap, self.pools, self.gem_p)
            pooled.update({name: l2n(codes[name].float()) for name in self.fc})
            for name, v in pooled.items():
                total[name] = total[name] + v if name in total else v
        return {
            name: power_normalise(v, self.cfg.power)[0].cpu().numpy().astype(np.float32, copy=False)
            for name, v in total.items()
        }
