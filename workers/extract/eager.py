"""The eager PyTorch model a user writes for batch embedding, without our runtime layer: the peer that
``embedpipe bench extract`` compares the extraction stage with, in a plain loop, a Ray Data actor and a
Daft class UDF alike. Engine-free.

Plain torch in fp32: the backbone of the registry (same architecture and weights as ours) in eval mode,
``torch.inference_mode()``, ``torch.set_num_threads`` threads, NCHW or channels-last, images of one shape
stacked into one forward pass (``shape_buckets``), then the same poolings and normalisation as ours, so
its descriptors can be compared with the pipeline's image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from embedpipe.workers.descriptors.backbones import load_backbone
from embedpipe.workers.extract.embed import (
    FC_CODES,
    descriptor_dims,
    pooled_descriptors,
    power_normalise,
    rescale,
    shape_buckets,
)

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import ExtractConfig


class EagerModel:
    """(H, W, 3) uint8 images -> {descriptor: (N, D) float32}, on the CPU in fp32 with plain torch.

    ``channels_last``: model and input in NHWC memory format (else NCHW); ``stack``: at most this many
    images of one shape per forward pass."""

    def __init__(self, cfg: ExtractConfig, threads: int, channels_last: bool, stack: int):
        self.cfg, self.threads, self.channels_last, self.stack = cfg, threads, channels_last, stack
        torch.set_num_threads(threads)
        model, self.spec = load_backbone(cfg.backbone, cfg.weights)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(memory_format=self.format)
        self.fc_codes = self.spec.fc_codes.eval() if self.spec.fc_codes is not None else None
        self.pools = tuple(d for d in cfg.descriptors if d not in FC_CODES)
        self.fc = tuple(d for d in cfg.descriptors if d in FC_CODES)
        self.gem_p = self.spec.gem_p if self.spec.gem_p is not None else cfg.gem_p
        self.mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.forwards = 0

    def dims(self) -> dict[str, int]:
        return descriptor_dims(self.spec, self.cfg.descriptors)

    @torch.inference_mode()
    def embed_many(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Each image's descriptors as rows of one (N, D) array per descriptor, in order."""
        if torch.get_num_threads() != self.threads:  # per calling thread: engines may call from another
            torch.set_num_threads(self.threads)
        out = {name: np.zeros((len(images), d), np.float32) for name, d in self.dims().items()}
        for group in shape_buckets([im.shape for im in images], self.stack):
            vectors = self._forward([images[i] for i in group])
            for name, v in vectors.items():
                out[name][group] = v
        return out

    def _forward(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Images of one shape -> {descriptor: (B, D)}."""
        total: dict[str, torch.Tensor] = {}
        for scale in self.cfg.scales:
            batch = np.stack([rescale(im, scale) for im in images])  # (B, H, W, 3) uint8
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - self.mean) / self.std).contiguous(memory_format=self.format)  # (B, 3, H, W)
            fmap = self.model(x)  # (B, C, h, w)
            self.forwards += 1
            codes = self.fc_codes(fmap) if self.fc else {}
            pooled = pooled_descriptors(fmap, codes, self.pools, self.fc, self.gem_p)
            for name, v in pooled.items():
                total[name] = total[name] + v if name in total else v
        return {
            name: power_normalise(v, self.cfg.power).numpy().astype(np.float32) for name, v in total.items()
        }
