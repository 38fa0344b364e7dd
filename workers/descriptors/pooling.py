"""Global poolings of a conv feature map, as small pure functions over (B, C, H, W) tensors.

Each returns (B, C). Normalisation is separate (``l2n``) so poolings compose with post-processing.
"""

from __future__ import annotations

from collections.abc import Callable

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


def l2n(x: Tensor, eps: float = 1e-6) -> Tensor:
    """L2-normalise rows. x: (B, D) -> (B, D)"""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


def pooling(name: str, gem_p: float = 3.0) -> Callable[[Tensor], Tensor]:
    """The pooling function for a descriptor name."""
    if name == "gem":
        return lambda x: gem(x, p=gem_p)
    if name == "spoc":
        return spoc
    if name == "mac":
        return mac
    raise KeyError(f"unknown pooling '{name}' (known: gem, spoc, mac)")


def pool_all(fmap: Tensor, names: tuple[str, ...], gem_p: float = 3.0) -> dict[str, Tensor]:
    """Several L2-normalised descriptors from one feature map. fmap: (B, C, H, W) -> {name: (B, C)}"""
    fmap = fmap.float()
    return {name: l2n(pooling(name, gem_p)(fmap)) for name in names}
