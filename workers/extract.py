"""The extraction stage: inputs -> Ray pipeline -> Parquet feature store + quarantine rows."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from embedpipe.storage.dataset import ShardPlan
from embedpipe.storage.errors import RunFailed
from embedpipe.storage.features import FeatureWriter
from embedpipe.storage.layout import RunLayout
from embedpipe.storage.local_features import LocalFeatureWriter
from embedpipe.storage.sources import InputRef
from embedpipe.workers.descriptors.backbones import check_backbone
from embedpipe.workers.descriptors.local import (
    HOG_DIM,
    STORED_DIM,
    is_classical,
    local_store,
    stored_features,
)
from embedpipe.workers.progress import Progress
from embedpipe.workers.ray_stages import input_result, stream_descriptors, stream_local

if TYPE_CHECKING:
    from embedpipe.flows.config import Config

log = logging.getLogger("embedpipe.extract")


@dataclass(frozen=True)
class ExtractResult:
    n_inputs: int
    n_ok: int
    quarantined: list[dict[str, str | None]]
    seconds: float
    summary: str
    inputs: dict[int, dict]  # position in the plan -> id, bytes, width, height, reason (dataset manifest)


def shard_runs(shards: list[int]) -> list[tuple[int, int, int]]:
    """(shard, start, stop) for each run of equal consecutive values: a batch may straddle shards."""
    if not shards:
        return []
    cuts = [0] + [j for j in range(1, len(shards)) if shards[j] != shards[j - 1]] + [len(shards)]
    return [(shards[a], a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=False)]


def run_extract(plan: ShardPlan, cfg: Config, layout: RunLayout) -> ExtractResult:
    """Extract every descriptor of ``cfg.extract`` for the inputs of ``plan`` (inside a Ray session)."""
    ecfg = cfg.extract
    writers: dict[str, FeatureWriter] = {}
    quarantined: list[dict[str, str | None]] = []
    progress = Progress("extract", len(plan.refs), log)
    inputs: dict[int, dict] = {}

    def writer(name: str, dim: int) -> FeatureWriter:
        if name not in writers:
            meta = {
                "descriptor": name,
                "backbone": ecfg.backbone,
                "max_side": ecfg.max_side,
                "gem_p": ecfg.gem_p if name == "gem" else None,
            }
            writers[name] = FeatureWriter(layout.feature_dir(name), dim, plan.n_shards, meta)
        return writers[name]

    for name in ecfg.descriptors:
        shutil.rmtree(layout.feature_dir(name), ignore_errors=True)
    cnn = tuple(d for d in ecfg.descriptors if not is_classical(d))
    if not cnn:
        return run_local_extract(plan, cfg, layout)
    if len(cnn) < len(ecfg.descriptors):
        local = run_local_extract(plan, cfg, layout)
        quarantined.extend(local.quarantined)
    ecfg = ecfg.model_copy(update={"descriptors": cnn})
    check_backbone(ecfg.backbone, ecfg.weights, ecfg.descriptors)
    for batch in stream_descriptors(plan.refs, cfg.model_copy(update={"extract": ecfg})):
        for shard, sel in _good_rows(batch, plan, inputs, quarantined):
            for name in ecfg.descriptors:
                vectors = batch[f"d_{name}"][sel]
                writer(name, vectors.shape[1]).write(
                    shard,
                    batch["id"][sel],
                    batch["path"][sel],
                    batch["width"][sel],
                    batch["height"][sel],
                    vectors,
                )
        progress.update(len(batch["pos"]))
    for w in writers.values():
        w.close()
    once: dict[str | None, dict[str, str | None]] = {}
    for q in quarantined:  # an input both passes failed on is recorded once, with the first reason
        once.setdefault(q["path"], q)
    return _result(progress, list(once.values()), inputs)


def _result(
    progress: Progress, quarantined: list[dict[str, str | None]], inputs: dict[int, dict]
) -> ExtractResult:
    """The stage's result and its one-line summary (with the number of exact duplicates)."""
    n_ok = progress.done - len(quarantined)
    ids = [v["id"] for v in inputs.values() if v["id"] and not v["reason"]]
    duplicates = len(ids) - len(set(ids))
    summary = progress.finish(
        f"{n_ok} ok, {len(quarantined)} quarantined"
        + (f", {duplicates} exact duplicate(s)" if duplicates else "")
    )
    return ExtractResult(progress.done, n_ok, quarantined, progress.elapsed, summary, inputs)


def _good_rows(
    batch: dict, plan: ShardPlan, inputs: dict[int, dict], quarantined: list[dict[str, str | None]]
) -> Iterator[tuple[int, np.ndarray]]:
    """Record every row's manifest entry and quarantine the bad ones; yield (shard, rows) of the good."""
    for j, pos in enumerate(batch["pos"]):
        inputs[int(pos)] = input_result(batch, j)
    ok = batch["error"] == ""
    for i in (~ok).nonzero()[0]:
        _quarantine(quarantined, batch, i)
    rows = ok.nonzero()[0]
    for shard, a, b in shard_runs([plan.shard_of(int(p)) for p in batch["pos"][rows]]):
        yield shard, rows[a:b]


def _quarantine(quarantined: list[dict[str, str | None]], batch, i: int) -> None:
    reason = str(batch["error"][i])
    log.warning("quarantined %s: %s", batch["path"][i], reason)
    quarantined.append(
        {"path": str(batch["path"][i]), "id": batch["id"][i] or None, "stage": "extract", "reason": reason}
    )


def run_local_extract(plan: ShardPlan, cfg: Config, layout: RunLayout) -> ExtractResult:
    """Local-feature stores (``features/local-<sift|orb>``) and the HOG store for the classical
    descriptors of ``cfg.extract`` (inside a Ray session), streamed part by part."""
    lcfg = cfg.local
    stored = stored_features(cfg.extract.descriptors)
    hog = "hog" in cfg.extract.descriptors
    quarantined: list[dict[str, str | None]] = []
    progress = Progress("extract local", len(plan.refs), log)
    writers: dict[str, FeatureWriter] = {}
    for f in stored:
        meta = {
            "descriptor": local_store(f),
            "backbone": f"opencv-{f}",
            "max_side": lcfg.max_side,
            "max_keypoints": lcfg.max_keypoints,
        }
        shutil.rmtree(layout.feature_dir(local_store(f)), ignore_errors=True)
        writers[f] = LocalFeatureWriter(
            layout.feature_dir(local_store(f)), STORED_DIM[f], plan.n_shards, meta
        )
    if hog:
        meta = {
            "descriptor": "hog",
            "backbone": "skimage-hog",
            "max_side": lcfg.max_side,
            "hog_size": lcfg.hog_size,
        }
        writers["hog"] = FeatureWriter(layout.feature_dir("hog"), HOG_DIM, plan.n_shards, meta)
    inputs: dict[int, dict] = {}
    for batch in stream_local(plan.refs, cfg, stored, hog):
        for shard, sel in _good_rows(batch, plan, inputs, quarantined):
            head = (batch["id"][sel], batch["path"][sel], batch["width"][sel], batch["height"][sel])
            for f in stored:
                kps = [np.frombuffer(batch[f"kp_{f}"][i], np.float32).reshape(-1, 4) for i in sel]
                descs = [
                    np.frombuffer(batch[f"desc_{f}"][i], np.uint8).reshape(-1, STORED_DIM[f]) for i in sel
                ]
                writers[f].write_images(shard, *head, kps, descs)
            if hog:
                writers["hog"].write(shard, *head, batch["d_hog"][sel])
        progress.update(len(batch["pos"]))
    for w in writers.values():
        w.close()
    return _result(progress, quarantined, inputs)


def extract_queries(refs: tuple[InputRef, ...], boxes: tuple, cfg: Config, layout: RunLayout) -> str:
    """Descriptors of the box-cropped queries of an Oxford/Paris protocol, in query order, into
    ``RUN/queries/<descriptor>`` (inside a Ray session). A query that cannot be read fails the stage:
    the protocol is not defined without it."""
    ecfg = cfg.extract
    progress = Progress("extract queries", len(refs), log)
    writers: dict[str, FeatureWriter] = {}
    for name in ecfg.descriptors:
        shutil.rmtree(layout.query_dir(name), ignore_errors=True)
    for batch in stream_descriptors(refs, cfg, boxes):
        bad = (batch["error"] != "").nonzero()[0]
        if bad.size:
            i = int(bad[0])
            raise RunFailed(f"query image {batch['path'][i]} cannot be used: {batch['error'][i]}")
        for name in ecfg.descriptors:
            vectors = batch[f"d_{name}"]
            if name not in writers:
                meta = {
                    "descriptor": name,
                    "backbone": ecfg.backbone,
                    "max_side": ecfg.max_side,
                    "queries": True,
                }
                writers[name] = FeatureWriter(layout.query_dir(name), vectors.shape[1], 1, meta)
            writers[name].write(0, batch["id"], batch["path"], batch["width"], batch["height"], vectors)
        progress.update(len(batch["pos"]))
    for w in writers.values():
        w.close()
    return progress.finish()
