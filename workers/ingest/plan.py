"""The listing side of the shard plan: list a source and cut it into shards, and list a run's inputs
without reading its unchanged tar shards again. The plan and the dataset manifest themselves are
``storage.dataset``; listing is ``workers.ingest.sources``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa

from embedpipe.storage.contracts.layout import RunLayout, spill_folder
from embedpipe.storage.dataset import ShardPlan, known_tars, plan_listing
from embedpipe.storage.inputs import spill_to
from embedpipe.workers.ingest.sources import known_tar_listings, list_inputs


def plan_shards(
    source: str | Path, shard_size: int, previous: pa.Table | Mapping[str, int] | None = None
) -> ShardPlan:
    """List ``source`` and cut it into shards (stable against ``previous``: key -> shard)."""
    return plan_listing(list_inputs(source), str(source), shard_size, previous)


@contextlib.contextmanager
def run_listings(root: Path) -> Iterator[None]:
    """Listing for the run directory ``root``: its earlier plan's unchanged tar shards are not read again
    (``known_tar_listings``), and listings and plans spill to files in the run's ``spill_folder``."""
    layout = RunLayout(root)
    known = known_tar_listings(lambda: known_tars(layout.dataset, layout.tar_stamps))
    with known, spill_to(spill_folder(root)):
        yield
