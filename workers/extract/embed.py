"""One image in, one vector per descriptor out: backbone forward + poolings. Engine-free.

Used unchanged by the Ray model actor and the query extraction; the trunk runs on ``extract.runtime``
(``runtimes``). The peers of ``embedpipe bench extract`` use plain torch instead (``eager``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from embedpipe.storage.contracts.errors import BackboneError
from embedpipe.workers.descriptors.backbones import load_backbone
from embedpipe.workers.descriptors.pooling import l2n, pool_all
from embedpipe.workers.extract.reference import REFERENCE
from embedpipe.workers.extract.runtimes import PARITY_POOLS, Resolver

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import ExtractConfig

FC_CODES = ("fc6", "fc7")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def precision_autocast(device: str, precision: str):
    """Autocast to ``precision`` (fp16 / bf16) on ``device`` ('cuda:0' counts as cuda); none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[precision])


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackboneError("extract.device is cuda but no CUDA device is visible")
    return "cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def forward_batch(cfg: ExtractConfig, device: str) -> int:
    """Images per forward pass: ``extract.forward_batch``, or when 0 the batch size on a GPU and 1 on a
    CPU, where stacking large images slows a forward down (see docs/benchmarks.md)."""
    if cfg.forward_batch:
        return cfg.forward_batch
    return cfg.batch_size if device == "cuda" else 1


def power_normalise(x: torch.Tensor, power: float) -> torch.Tensor:
    """sign(x)·|x|^power, then L2. (B, D) -> (B, D)"""
    return l2n(x.sign() * x.abs().pow(power)) if power != 1.0 else l2n(x)


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def shape_buckets(shapes: Sequence[tuple[int, ...]], size: int) -> list[list[int]]:
    """Positions of ``shapes`` grouped by equal shape (in order of first appearance), each group cut into
    runs of at most ``size``: the forward passes of a batch bucketed by aspect ratio, with no padding."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]


def descriptor_dims(spec: Any, descriptors: Sequence[str]) -> dict[str, int]:
    """Output dimension of each CNN descriptor of a backbone (``spec``: its ``BackboneSpec``)."""
    return {
        d: (getattr(spec.fc_codes, d).out_features if d in FC_CODES else spec.channels) for d in descriptors
    }


def pooled_descriptors(
    fmap: torch.Tensor, codes: dict[str, torch.Tensor], pools: Sequence[str], fc: Sequence[str], gem_p: float
) -> dict[str, torch.Tensor]:
    """A conv map and its fc codes -> {descriptor: (B, C)}: the poolings ``pools`` and the L2-normalised
    fc codes ``fc``, before any multi-scale sum and power normalisation."""
    pooled = pool_all(fmap, pools, gem_p)
    pooled.update({name: l2n(codes[name].float()) for name in fc})
    return pooled


class Embedder:
    """Loads the backbone once; maps (H, W, 3) uint8 images to {descriptor: (C,) float32} each.

    Images are never padded: ``embed_many`` stacks images of the same shape into one forward pass of up
    to ``forward_batch`` images (an aspect-ratio bucket) and runs every other shape apart. A stacked
    image's descriptor equals its one-image descriptor up to float rounding (kernels may sum in another
    order), and the buckets are a function of the batch, which the shard plan fixes, so output bytes
    are still the same run after run; with one image per forward (the CPU default) they do not depend on
    the batch at all. With several scales, each scale's L2-normalised descriptor is summed before power
    normalisation and the final L2 (as cnnimageretrieval-pytorch's multi-scale extraction).

    The trunk (backbone up to its conv map) runs on ``extract.runtime`` (see ``runtimes``): ``runtime``
    and ``precision`` are what was resolved (``auto``'s choice; bf16 / int8 fall back to fp32 when no
    runtime reaches parity), ``runtime_record`` the decision as the run keeps it. ``models_dir`` (or the
    config's, set by the extract stage) holds the exported models and ``runtime.json``; without one they
    live in this machine's cache. The torch module stays loaded as ``model`` (the reference, the fc
    codes); a non-torch runtime runs the file it was exported to, so changing ``model``'s weights later
    only changes what ``runtime`` torch computes.

    With ``extract.fp32_reference`` true (the extract stage resolves ``auto``), each descriptor also
    comes as ``<descriptor>@fp32``: the same poolings of the eager torch fp32 trunk on the same input,
    one more forward per image; when the resolved precision is fp32 already, a copy of the descriptor."""

    def __init__(self, cfg: ExtractConfig, threads: int = 0, *, models_dir: Path | str | None = None):
        self.threads = threads
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.forward_batch = forward_batch(cfg, self.device)
        self.model, self.spec = load_backbone(cfg.backbone, cfg.weights)
        self.pools = tuple(d for d in cfg.descriptors if d not in FC_CODES)
        # a fine-tuned backbone brings its learnt GeM exponent
        self.gem_p = self.spec.gem_p if self.spec.gem_p is not None else cfg.gem_p
        self.fc = tuple(d for d in cfg.descriptors if d in FC_CODES)
        if self.fc and self.spec.fc_codes is None:
            raise BackboneError(
                f"{cfg.backbone} has no fc6/fc7 layers (use a VGG-style torchvision backbone)"
            )
        # channels-last on CPUs too: faster there as well (oneDNN's NHWC convolutions; docs/benchmarks.md)
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        if self.spec.fc_codes is not None:
            self.spec.fc_codes.to(self.device)
        self.mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        folder = Path(models_dir) if models_dir is not None else cfg.models_dir
        if models_dir is None and folder is not None and not folder.parent.is_dir():
            folder = None  # the stage's run folder, which this node cannot see: this machine's cache
        self._meta: torch.nn.Module | None = None  # shapes-only copy of the module (``_check_shape``)
        self._shapes: dict[tuple[int, ...], str] = {}
        self.runtime_record, self.trunk = Resolver(self, folder).resolve()
        self.runtime, self.precision = self.runtime_record["runtime"], self.runtime_record["precision"]
        self.reference = cfg.fp32_reference is True

    def dims(self) -> dict[str, int]:
        """Output dimension of each descriptor (and of its fp32 reference when one is computed)."""
        out = descriptor_dims(self.spec, self.cfg.descriptors)
        return {**out, **{d + REFERENCE: dim for d, dim in out.items()}} if self.reference else out

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, H, W) float32, normalised for the backbone."""
        pixels = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # copies only read-only input
        x = pixels.to(self.device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """One image's descriptors."""
        return self.embed_many([image])[0]

    @torch.inference_mode()
    def embed_many(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each image's descriptors, in order; one forward pass per ``shape_buckets`` group."""
        # torch's thread count is per calling thread (OpenMP), and engines may call from another thread
        # than the one that built the embedder: set it where the work happens.
        if self.threads > 0 and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        out: list[dict[str, np.ndarray]] = [{} for _ in images]
        for group in shape_buckets([im.shape for im in images], self.forward_batch):
            vectors = self._forward([images[i] for i in group])
            for row, i in enumerate(group):
                out[i] = {name: v[row] for name, v in vectors.items()}
        return out

    def trunk_forward(
        self, x: torch.Tensor, trunk: Any, precision: str, codes: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A preprocessed batch -> (conv map (B, C, h, w), fc codes) on ``trunk`` (None: the torch
        module, autocast to ``precision``); the fc codes (with ``codes``, or when extracted) always by
        torch. A runtime's failure is a ``RuntimeError``."""
        want = (codes or bool(self.fc)) and self.spec.fc_codes is not None
        if trunk is None:
            with precision_autocast(self.device, precision):
                fmap = self.model(x)  # (B, C, h, w)
                return fmap, (self.spec.fc_codes(fmap) if want else {})
        self._check_shape(tuple(x.shape))
        fmap = trunk(x)
        return fmap, (self.spec.fc_codes(fmap) if want else {})

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise torch's ``RuntimeError`` for an input the backbone cannot take (e.g. smaller than its
        strides) before a runtime sees it: ONNX Runtime may crash the process on such input instead of
        raising. Checked once per shape by running the module on the meta device (shapes only)."""
        if shape not in self._shapes:
            if self._meta is None:
                self._meta = copy.deepcopy(self.model).to("meta")
            try:
                with torch.inference_mode():
                    self._meta(torch.empty(shape, device="meta"))
                self._shapes[shape] = ""
            except NotImplementedError:  # an operator without a meta kernel: no check possible
                self._shapes[shape] = ""
            except RuntimeError as err:
                self._shapes[shape] = str(err).splitlines()[0] if str(err) else type(err).__name__
        if self._shapes[shape]:
            raise RuntimeError(self._shapes[shape])

    def parity_descriptors(
        self, fmap: torch.Tensor, codes: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What the parity check compares: every pooling of ``PARITY_POOLS`` and the fc codes, whatever
        this run extracts, so that one decision serves every descriptor choice."""
        out = pool_all(fmap, PARITY_POOLS, self.gem_p)
        out.update({name: l2n(v.float()) for name, v in codes.items()})
        return out

    def _pool(self, fmap: torch.Tensor, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A conv map and fc codes -> {descriptor: (B, C)} of this run's CNN descriptors."""
        return pooled_descriptors(fmap, codes, self.pools, self.fc, self.gem_p)

    def _forward(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Images of one shape -> {descriptor: (B, C) float32}."""
        total: dict[str, torch.Tensor] = {}
        for scale in self.cfg.scales:
            x = torch.cat([self.preprocess(rescale(image, scale)) for image in images])
            fmap, codes = self.trunk_forward(x, self.trunk, self.precision)
            pooled = self._pool(fmap, codes)
            if self.reference and self.precision != "fp32":  # the same descriptors at eager torch fp32
                pooled.update(
                    {k + REFERENCE: v for k, v in self._pool(*self.trunk_forward(x, None, "fp32")).items()}
                )
            elif self.reference:
                pooled.update({k + REFERENCE: v for k, v in pooled.items()})
            for name, v in pooled.items():
                total[name] = total[name] + v if name in total else v
        return {
            name: power_normalise(v, self.cfg.power).cpu().numpy().astype(np.float32, copy=False)
            for name, v in total.items()
        }
