"""The fp32 reference of a reduced-precision extraction (``extract.fp32_reference``).

With bf16, int8 or fp16, the model actors also pool each CNN descriptor from the eager torch fp32 trunk
on the same input, into a store of its own, ``<descriptor>@fp32`` (same schema and part names); the
evaluation scores those stores as it scores the run's own and reports the mAP change of each result
row against them (``precision_change`` in metrics.json). Engine-free and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedpipe.workers.descriptors.local import is_classical

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

REFERENCE = "@fp32"


def fp32_reference(cfg: Config) -> bool:
    """Whether the run extracts the fp32 reference stores: ``extract.fp32_reference`` true, or auto
    with a protocol to score, in both cases only when the requested precision is not fp32."""
    ecfg = cfg.extract
    if ecfg.precision == "fp32" or ecfg.fp32_reference is False:
        return False
    return ecfg.fp32_reference is True or cfg.protocol != "none"


def reference_name(descriptor: str) -> str:
    """The store of ``descriptor``'s fp32 reference."""
    return descriptor + REFERENCE


def reference_stores(cfg: Config) -> list[tuple[str, str]]:
    """(descriptor, its reference store) for each CNN descriptor, when the run extracts references."""
    if not fp32_reference(cfg):
        return []
    return [(d, reference_name(d)) for d in cfg.extract.descriptors if not is_classical(d)]
