"""The listing side of the shard plan: list a source and cut it into shards, and list a run's inputs
without reading its unchanged tar shards again. The plan and the dataset manifest themselves are
``storage.dataset``; listing is ``workers.ingest.sources``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa

from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.dataset import ShardPlan, known_tars, plan_listing
from embedpipe.workers.ingest.sources import known_tar_listings, list_inputs


def plan_shards(
    source: str | Path, shard_size: int, previous: pa.Table | Mapping[str, int] | None = None
) -> ShardPlan:
    """List ``source`` and cut it into shards (stable against ``previous``: key -> shard)."""
    return plan_listing(list_inputs(source), str(source), shard_size, previous)


def run_listings(root: Path) -> contextlib.AbstractContextManager:
    """``known_tar_listings`` for the run directory ``root``: its earlier plan's unchanged tar shards are
    not read again."""
    layout = RunLayout(root)
    return known_tar_listings(lambda: known_tars(layout.dataset, layout.tar_stamps))
