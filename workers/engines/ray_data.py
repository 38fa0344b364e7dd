"""Ray Data binding: map a function over rows in batches on CPU tasks, results in input order.

The stages give plain functions of a numpy batch (``dict`` of columns -> ``dict`` of columns); this module
alone knows they run as ``ray.data`` ``map_batches`` tasks. It also holds the Ray Data peer that
``embedpipe bench extract`` compares the extraction stage with: batch inference written as Ray's examples
show it (decode tasks, then a callable model class on an actor pool) around the eager torch model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedpipe.storage.contracts.errors import RunFailed
from embedpipe.workers.engines.ray_stages import (
    cluster_cpus,
    configure_data_context,
    iterate_results,
    ray_session,
)

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, ExtractConfig, IngestConfig, RayConfig


def map_table(
    table: pa.Table,
    fn: Callable[..., dict[str, np.ndarray]],
    fn_kwargs: dict[str, Any],
    batch_size: int,
    ray_cfg: RayConfig,
    what: str,
) -> Iterator[dict[str, Any]]:
    """``fn(batch, **fn_kwargs)`` over the rows of an Arrow table (``input_table`` makes them) in numpy
    batches of ``batch_size`` rows, one CPU per task, in up to four blocks per cluster CPU; yields the
    result batches in input order. The rows go to Ray as Arrow blocks, never as one Python object each.
    A Ray failure becomes one ``RunFailed`` line naming ``what``. Runs in the open ``ray_session`` (or
    one of its own: open it around the loop to control when Ray stops)."""
    import ray.data

    with ray_session(ray_cfg):
        configure_data_context(ray_cfg)
        step = max(1, -(-table.num_rows // _blocks(table.num_rows)))
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, max(1, table.num_rows), step)])
        ds = ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=batch_size, batch_format="numpy", num_cpus=1)
        yield from iterate_results(ds, what)


def _blocks(rows: int) -> int:
    """Blocks of a mapped dataset: up to four per cluster CPU."""
    return max(1, min(rows, cluster_cpus() * 4))


def read_and_decode(batch: dict[str, np.ndarray], max_side: int, ingest: IngestConfig) -> dict[str, Any]:
    """Ray Data peer's first stage: read and decode each row (``decode_image``, as ours); a bad input
    raises, as in a user's script."""
    from embedpipe.workers.ingest.decode import decode_image
    from embedpipe.workers.ingest.sources import read_input

    images = []
    ing = ingest
    for uri, offset, length in zip(batch["uri"], batch["offset"], batch["length"], strict=True):
        data = read_input(str(uri), int(offset), int(length), ing.timeout_s, ing.retries, ing.max_bytes)
        images.append(decode_image(data, max_side, ingest.max_pixels)[0])
    return {"pos": batch["pos"], "image": images}


class EagerActor:
    """Ray Data peer's model stage, as Ray's batch-inference examples write it: a callable class that loads
    the eager channels-last model once and maps a numpy batch of images to descriptor columns."""

    def __init__(self, cfg: ExtractConfig, threads: int, stack: int):
        from embedpipe.workers.extract.eager import EagerModel  # torch: imported by the actor process

        self.model = EagerModel(cfg, threads, channels_last=True, stack=stack)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.model.embed_many([np.asarray(im) for im in batch["image"]])
        return {"pos": batch["pos"], **{f"d_{name}": v for name, v in vectors.items()}}


@dataclass(frozen=True)
class PeerPool:
    actors: int
    actor_cpus: int  # CPUs each actor reserves (at least one is left to the decode tasks)
    threads: int  # torch threads per actor


def peer_pool(cpus: int) -> PeerPool:
    """How a Ray user sizes batch inference on ``cpus`` CPUs: one actor per four CPUs, each reserving
    what the decode tasks leave (at least one CPU for them: actors that take every CPU starve the decode
    stage and the pipeline stalls), torch on the actor's share of the cores."""
    actors = max(1, cpus // 4)
    return PeerPool(actors, max(1, (cpus - 1) // actors), max(1, cpus // actors))


def eager_batch_inference(
    items: list[dict[str, Any]], config: Config, stack: int
) -> tuple[PeerPool, Iterator[dict[str, np.ndarray]]]:
    """The Ray Data peer of the extraction stage: ``from_items`` -> ``map_batches(read_and_decode)`` (1-CPU
    tasks) -> ``map_batches(EagerActor)`` on a fixed actor pool (``peer_pool``), batches of
    ``extract.batch_size`` rows, in the open ``ray_session``. ``items``: rows with ``pos``, ``uri``,
    ``offset``, ``length``. Returns the pool and the result batches (``pos``, ``d_<descriptor>``) in
    whatever order they finish. Ray Data may fuse the two stages into one actor (its optimiser's choice,
    as a user gets it)."""
    import ray.data

    pool = peer_pool(cluster_cpus())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    size = config.extract.batch_size
    ds = ray.data.from_items(items)
    ds = ds.map_batches(
        read_and_decode,
        fn_kwargs={"max_side": config.extract.max_side, "ingest": config.ingest},
        batch_size=size,
        batch_format="numpy",
        num_cpus=1,
    )
    ds = ds.map_batches(
        EagerActor,
        fn_constructor_kwargs={"cfg": config.extract, "threads": pool.threads, "stack": stack},
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.actor_cpus,
        batch_size=size,
        batch_format="numpy",
    )
    return pool, _peer_batches(ds)


def _peer_batches(ds) -> Iterator[dict[str, np.ndarray]]:
    """The result batches of a peer's dataset; a Ray failure becomes one ``RunFailed`` line."""
    import ray

    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise RunFailed(f"the Ray Data peer failed: {lines[-1] if lines else type(err).__name__}") from err
