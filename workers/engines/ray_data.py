"""Ray Data binding: map a function over rows in batches on CPU tasks, results in input order.

The stages give plain functions of a numpy batch (``dict`` of columns -> ``dict`` of columns); this module
alone knows they run as ``ray.data`` ``map_batches`` tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.workers.engines.ray_stages import (
    cluster_cpus,
    configure_data_context,
    iterate_results,
    ray_session,
)

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import RayConfig


def map_items(
    items: list[dict[str, Any]],
    fn: Callable[..., dict[str, np.ndarray]],
    fn_kwargs: dict[str, Any],
    batch_size: int,
    ray_cfg: RayConfig,
    what: str,
) -> Iterator[dict[str, Any]]:
    """``fn(batch, **fn_kwargs)`` over ``items`` (rows such as ``input_items`` makes) in numpy batches of
    ``batch_size`` rows, one CPU per task, in up to four blocks per cluster CPU; yields the result batches
    in input order. A Ray failure becomes one ``RunFailed`` line naming ``what``. Runs in the open
    ``ray_session`` (or one of its own: open it around the loop to control when Ray stops)."""
    import ray.data

    with ray_session(ray_cfg):
        configure_data_context(ray_cfg)
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), cluster_cpus() * 4)))
        ds = ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=batch_size, batch_format="numpy", num_cpus=1)
        yield from iterate_results(ds, what)
