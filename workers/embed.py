"""One image in, one vector per descriptor out: backbone forward + poolings. Engine-free.

Used unchanged by the Ray model actor and by the plain-loop baseline of ``embedpipe bench extract``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from embedpipe.workers.descriptors.backbones import load_backbone
from embedpipe.workers.descriptors.pooling import pool_all

if TYPE_CHECKING:
    from embedpipe.flows.config import ExtractConfig


class Embedder:
    """Loads the backbone once; ``__call__`` maps an (H, W, 3) uint8 image to {descriptor: (C,) float32}.

    Images go through the network one at a time at their own size (no padding, no batching effects),
    so a descriptor does not depend on which other images shared its batch."""

    def __init__(self, cfg: ExtractConfig, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.model, self.spec = load_backbone(cfg.backbone, cfg.weights)
        self.mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return self.spec.channels

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, H, W) float32, normalised for the backbone."""
        pixels = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # copies only read-only input
        x = pixels.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        fmap = self.model(self.preprocess(image))  # (1, C, h, w)
        pooled = pool_all(fmap, self.cfg.descriptors, self.cfg.gem_p)
        return {name: v[0].numpy().astype(np.float32, copy=False) for name, v in pooled.items()}
