"""Global poolings of a conv feature map, as small pure functions over (B, C, H, W) tensors.

Each returns (B, C). Normalisation is separate (``l2n``) so poolings compose with post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def spoc(x: Tensor) -> Tensor:
    """Sum pooling (Babenko & Lempitsky, ICCV 2015): sum over all spatial positions.
    x: (B, C, H, W) -> (B, C)"""
    return x.sum(dim=(-2, -1))


def mac(x: Tensor) -> Tensor:
    """Maximum activation of convolutions (Tolias et al., ICLR 2016).
    x: (B, C, H, W) -> (B, C)"""
    return x.amax(dim=(-2, -1))


def gem(x: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean pooling (Radenović et al., TPAMI 2018): (mean x^p)^(1/p), x clamped at eps.
    x: (B, C, H, W) -> (B, C)"""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def spoc_centre_prior(x: Tensor) -> Tensor:
    """SPoC with the centre prior of Babenko & Lempitsky: positions weighted by a Gaussian centred on the
    map, sigma one third of the distance from the centre to the closest border.
    x: (B, C, H, W) -> (B, C)"""
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5 - h / 2
    xs = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5 - w / 2
    sigma = min(h, w) / 2 / 3
    prior = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))  # (H, W)
    return (x * prior).sum(dim=(-2, -1))


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (Tolias et al., ICLR 2016) as (top, left, height, width) on an (h, w) map, computed as
    cnnimageretrieval-pytorch does: square regions of side floor(2·min/(l+1)) at levels l = 1..L, with the
    number of regions along the longer side chosen for ~40% overlap. The whole map comes first."""
    side = min(w, h)
    steps = [2, 3, 4, 5, 6, 7]
    b_long = [(max(h, w) - side) / (s - 1) for s in steps]
    idx = min(range(len(steps)), key=lambda i: abs(((side**2 - side * b_long[i]) / side**2) - overlap))
    extra_w = idx + 1 if h < w else 0
    extra_h = idx + 1 if h > w else 0
    regions = [(0, 0, h, w)]
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        bw = 0.0 if level + extra_w == 1 else (w - wl) / (level + extra_w - 1)
        bh = 0.0 if level + extra_h == 1 else (h - wl) / (level + extra_h - 1)
        tops = [math.floor(wl2 + i * bh) - wl2 for i in range(level + extra_h)]
        lefts = [math.floor(wl2 + j * bw) - wl2 for j in range(level + extra_w)]
        regions += [(t, left, wl, wl) for t in tops for left in lefts]
    return regions


def rmac(x: Tensor, levels: int = 3, eps: float = 1e-6) -> Tensor:
    """Regional MAC: sum of the L2-normalised MAC of every R-MAC region (whole map included).
    x: (B, C, H, W) -> (B, C)"""
    out = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for top, left, rh, rw in rmac_regions(x.shape[-2], x.shape[-1], levels):
        v = x[..., top : top + rh, left : left + rw].amax(dim=(-2, -1))
        out = out + v / (v.norm(p=2, dim=1, keepdim=True) + eps)
    return out


def crow(x: Tensor, a: float = 2.0, b: float = 2.0) -> Tensor:
    """Cross-dimensional weighting (Kalantidis et al., ECCVW 2016), as its reference code: spatial weights
    (Σ_c x / ||Σ_c x||_a)^(1/b), channel weights log(Σ_k q_k / q_k) with q_k the non-zero fraction of
    channel k (0 for channels that are all zero). x: (B, C, H, W) -> (B, C)"""
    s = x.sum(dim=1)  # (B, H, W)
    z = s.pow(a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / a)
    spatial = (s / z.clamp(min=1e-12)).pow(1.0 / b)
    q = (x != 0).to(x.dtype).mean(dim=(-2, -1))  # (B, C)
    channel = torch.where(
        q > 0, torch.log(q.sum(dim=1, keepdim=True) / q.clamp(min=1e-12)), torch.zeros_like(q)
    )
    return (x * spatial[:, None]).sum(dim=(-2, -1)) * channel


def l2n(x: Tensor, eps: float = 1e-6) -> Tensor:
    """L2-normalise rows. x: (B, D) -> (B, D)"""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


POOLINGS: dict[str, Callable[..., Tensor]] = {
    "gem": gem,
    "spoc": spoc,
    "spoc-cp": spoc_centre_prior,
    "mac": mac,
    "rmac": rmac,
    "crow": crow,
}


def pooling(name: str, gem_p: float = 3.0) -> Callable[[Tensor], Tensor]:
    """The pooling function for a descriptor name."""
    if name == "gem":
        return lambda x: gem(x, p=gem_p)
    if name not in POOLINGS:
        raise KeyError(f"unknown pooling '{name}' (known: {', '.join(POOLINGS)})")
    return POOLINGS[name]


def pool_all(fmap: Tensor, names: tuple[str, ...], gem_p: float = 3.0) -> dict[str, Tensor]:
    """Several L2-normalised descriptors from one feature map. fmap: (B, C, H, W) -> {name: (B, C)}"""
    fmap = fmap.float()
    return {name: l2n(pooling(name, gem_p)(fmap)) for name in names}
