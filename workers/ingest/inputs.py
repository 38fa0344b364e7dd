"""What a run reads: the shard plan of its database and, for the Oxford/Paris protocols, the box-cropped
queries and the ground truth that come with the benchmark's layout.

A benchmark folder as ``embedpipe datasets fetch`` leaves it: images under ``jpg/`` (any depth) and the
ground truth as ``gt/`` (the original ``*_query.txt``, ``_good/_ok/_junk`` lists) or ``gnd_<name>.pkl``
(revisitop). ``ground_truth:`` in the config points elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import pyarrow as pa

from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import spill_folder
from embedpipe.storage.dataset import PreviousPlan, ShardPlan, merge_plans, plan_listing
from embedpipe.storage.inputs import InputRef, Listing, as_distractors, spill_to
from embedpipe.workers.evaluate.protocols import BENCHMARK_PROTOCOLS, BenchmarkLayout, benchmark_layout
from embedpipe.workers.ingest.sources import list_inputs, remote_shard_limits

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config


@dataclass(frozen=True)
class RunInputs:
    plan: ShardPlan
    benchmark: BenchmarkLayout | None = None
    query_refs: tuple[InputRef, ...] = ()
    query_boxes: tuple[tuple[float, float, float, float], ...] = ()
    fingerprint: str = ""  # the plan's, and the ground truth's when the protocol has files of its own


def ground_truth_path(cfg: Config) -> Path:
    """Where an Oxford/Paris protocol's ground truth is: ``ground_truth`` or found in the images folder."""
    if cfg.ground_truth:
        path = Path(cfg.ground_truth)
    else:
        root = Path(str(cfg.images))
        candidates = [root / f"gnd_{cfg.protocol}.pkl"]
        if cfg.protocol in ("oxford5k", "paris6k"):
            candidates.insert(0, root / "gt")
        path = next((c for c in candidates if c.exists()), candidates[0])
    if not path.exists():
        raise InputError(
            f"{cfg.protocol} protocol: ground truth not found at {path} (set ground_truth: PATH)"
        )
    return path


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def with_distractors(
    plan: ShardPlan, cfg: Config, previous: PreviousPlan | pa.Table | Mapping[str, int] | None
) -> ShardPlan:
    """``plan`` with the inputs of ``cfg.distractors`` after the collection's, in shards of their own
    (numbered after the collection's, stable against ``previous`` like any input), so that no part
    file mixes the two: the collection's parts are those of a run without distractors."""
    if not cfg.distractors:
        return plan
    extra = as_distractors(list_inputs(cfg.distractors))
    if not len(extra):
        raise InputError(f"no distractor images found at {cfg.distractors}")
    # new distractor shards start after every shard so far; new collection inputs likewise go after
    # every earlier shard, so the two never share one
    last = plan.n_shards - 1 if len(plan) else -1
    known, previous = None, PreviousPlan.of(previous)
    if previous is not None and len(previous):
        last = max(last, previous.last(distractor=False))
        known = previous.part(distractor=True)
    digest = hashlib.sha256(f"{plan.fingerprint}\0{extra.fingerprint()}\0".encode())
    # the fingerprint takes the distractors' shards in listing order
    planned = plan_listing(
        extra, plan.source, plan.shard_size, known, last, digest, digest_stream_order=False
    )
    return merge_plans(plan, planned, digest)


def run_inputs(cfg: Config, previous: PreviousPlan | pa.Table | None = None) -> RunInputs:
    """The run's inputs for ``cfg`` (``previous``: the key and shard columns of an earlier plan of the
    same run, ``storage.dataset.previous_shards``); remote tar shards are listed with the reads' limits
    (``ingest.timeout_s``, ``ingest.retries``)."""
    with remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries), spill_to(spill_folder(cfg.out)):
        return _run_inputs(cfg, previous)


def _run_inputs(cfg: Config, previous: PreviousPlan | pa.Table | None) -> RunInputs:
    if cfg.images is None:
        raise InputError("no images given (--images PATH or 'images:' in the config)")
    shard_size = cfg.extract.shard_size
    if cfg.protocol not in BENCHMARK_PROTOCOLS:
        plan = plan_listing(list_inputs(cfg.images), str(cfg.images), shard_size, previous)
        plan = with_distractors(plan, cfg, previous)
        return RunInputs(plan, fingerprint=plan.fingerprint)
    gt_path = ground_truth_path(cfg)
    bench = benchmark_layout(cfg.protocol, str(gt_path))
    root = Path(str(cfg.images))
    source = root / "jpg" if (root / "jpg").is_dir() else root
    listing = list_inputs(source)
    by_name = {PurePath(r.key).stem: r for r in listing.refs}
    absent = [n for n in bench.query_images if n not in by_name]
    if absent:
        raise InputError(
            f"{cfg.protocol}: query image '{absent[0]}' not found under {source} (+{len(absent) - 1} more)"
        )
    if bench.database_is_imlist:  # revisited: the database is imlist; query images are not part of it
        wanted = set(bench.imlist)
        listing = Listing([r for r in listing.refs if PurePath(r.key).stem in wanted], listing.problems)
    plan = with_distractors(plan_listing(listing, str(source), shard_size, previous), cfg, previous)
    fingerprint = hashlib.sha256(f"{plan.fingerprint}\0{_digest(gt_path)}".encode()).hexdigest()[:16]
    return RunInputs(
        plan,
        bench,
        tuple(by_name[n] for n in bench.query_images),
        bench.query_boxes,
        fingerprint,
    )
