"""The ingest stage alone (``embedpipe ingest``): list any source, read every input once on Ray (remote
ones with timeouts and retries), hash, check and downscale it, and write WebDataset tar shards plus the
dataset manifest into one folder, ready for extraction (``embedpipe run --images DIR``).

Shards follow the stable shard plan, each written to a temporary name and renamed when complete and
recorded in ``_shards.json`` with the fingerprint of its members: an interrupted ingest re-run with the
same arguments redoes only the shards that were not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.storage.contracts.errors import DecodeError
from embedpipe.storage.contracts.layout import write_json_atomic
from embedpipe.storage.dataset import (
    ShardPlan,
    manifest_table,
    previous_shards,
    read_manifest,
    results_batch,
    write_manifest,
)
from embedpipe.storage.tar_shards import ShardTarWriter, shard_name
from embedpipe.workers.engines.ray_data import map_items
from embedpipe.workers.engines.ray_stages import (
    input_items,
    input_result,
    ray_session,
    read_rows,
    row_rotation,
)
from embedpipe.workers.ingest.decode import JPEG_QUALITY, content_id, stored_bytes
from embedpipe.workers.ingest.plan import plan_shards
from embedpipe.workers.ingest.sources import read_rotations, remote_shard_limits, rotation_of
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, IngestConfig

log = logging.getLogger("embedpipe.ingest")
SHARDS_FILE = "_shards.json"


@dataclass(frozen=True)
class IngestResult:
    n_inputs: int
    n_ok: int
    n_quarantined: int
    n_duplicates: int
    shards_written: int
    shards_kept: int
    summary: str


def ingest_batch(batch: dict[str, np.ndarray], max_side: int, ingest: IngestConfig) -> dict[str, np.ndarray]:
    """Read, hash, check and (when larger than ``max_side``, or turned by ``ingest.rotations`` or with
    ``ingest.exif_orientation`` off) re-encode each input to a JPEG; other inputs keep their original
    bytes. Bad inputs keep their row with ``error`` set.

    The remote reads of the batch are all started at once on reader threads (``read_rows``: network waits
    overlap each other and the decoding, and a hostile URL holds only its own row); the rows are then
    decoded in order as their bytes arrive."""
    n = len(batch["path"])
    ids, errors, payloads, exts = [""] * n, [""] * n, [b""] * n, [""] * n
    sizes, width, height = np.full(n, -1, np.int64), np.zeros(n, np.int32), np.zeros(n, np.int32)
    reads = read_rows(batch, ingest)
    for i in range(n):
        try:
            data = reads[i].result()
            sizes[i], ids[i] = len(data), content_id(data)
            rotate, exif = row_rotation(batch, i), ingest.exif_orientation
            payloads[i], exts[i], (width[i], height[i]) = stored_bytes(
                data, max_side, ingest.max_pixels, exif, rotate
            )
        except DecodeError as err:
            errors[i] = str(err)
    return {
        "pos": batch["pos"],
        "id": np.array(ids, dtype=object),
        "bytes": sizes,
        "width": width,
        "height": height,
        "payload": np.array(payloads, dtype=object),
        "ext": np.array(exts, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def _shard_fingerprints(plan: ShardPlan, max_side: int, cfg: Config) -> dict[int, str]:
    """shard -> fingerprint of its members and the output settings, in one pass over the plan."""
    rotations = read_rotations(cfg.ingest.rotations) if cfg.ingest.rotations else {}
    settings = f"{max_side}\0{JPEG_QUALITY}\0{cfg.ingest.exif_orientation}\n".encode()
    digests: dict[int, Any] = {}
    for ref, shard in zip(plan.refs, plan.shards.tolist(), strict=True):
        if shard not in digests:
            digests[shard] = hashlib.sha256(settings)
        digests[shard].update(ref.signature() + str(rotation_of(ref.key, rotations)).encode())
    return {s: d.hexdigest()[:16] for s, d in sorted(digests.items())}


def run_ingest(source: str, out: Path, cfg: Config, max_side: int) -> IngestResult:
    """Ingest ``source`` into ``out`` (see the module doc)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.parquet"
    with remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries):
        plan = plan_shards(source, cfg.extract.shard_size, previous_shards(manifest_path))
    done_file = out / SHARDS_FILE
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    fps = _shard_fingerprints(plan, max_side, cfg)
    kept = {
        s
        for s, fp in fps.items()
        if done.get(str(s), {}).get("fingerprint") == fp and (out / shard_name(s)).exists()
    }
    previous = _previous_results(manifest_path, plan) if kept else {}
    todo = np.flatnonzero(~np.isin(plan.shards, sorted(kept)))
    log.info("ingest %s: %d inputs in %d shard(s), %d already done", source, len(plan), len(fps), len(kept))
    results: dict[int, dict] = {p: r for p, r in previous.items() if plan.shard_of(p) in kept}
    progress = Progress("ingest", len(todo), log)
    writers: dict[int, ShardTarWriter] = {}
    written: set[int] = set()

    def finish(shard: int) -> None:
        writers.pop(shard).close()
        written.add(shard)
        done[str(shard)] = {"fingerprint": fps[shard], "file": shard_name(shard)}
        write_json_atomic(done_file, done)

    if todo.size:
        with ray_session(cfg.ray):
            todo_refs = list(plan.refs.take(todo))
            items = input_items(todo_refs, ingest=cfg.ingest)
            for row, pos in zip(items, todo.tolist(), strict=True):
                row["pos"] = pos
            batch_size = max(cfg.extract.batch_size, cfg.ingest.read_threads)  # a read per thread at least
            kwargs = {"max_side": max_side, "ingest": cfg.ingest}
            for batch in map_items(items, ingest_batch, kwargs, batch_size, cfg.ray, "ingest"):
                for j, pos in enumerate(batch["pos"]):
                    pos = int(pos)
                    shard, ref = plan.shard_of(pos), todo_refs[int(np.searchsorted(todo, pos))]
                    for s in [s for s in writers if s != shard]:
                        finish(s)
                    if shard not in writers:
                        writers[shard] = ShardTarWriter(out / shard_name(shard))
                    results[pos] = res = input_result(batch, j)
                    if res["reason"]:
                        log.warning("quarantined %s: %s", ref.key, res["reason"])
                    else:
                        meta = {
                            "source": ref.key,
                            "id": res["id"],
                            "width": res["width"],
                            "height": res["height"],
                        }
                        writers[shard].add(ref.key, ref.label, batch["payload"][j], batch["ext"][j], meta)
                progress.update(len(batch["pos"]))
            for s in list(writers):
                finish(s)
        for s in sorted(set(np.unique(plan.shards[todo]).tolist()) - written):  # shards without an image
            ShardTarWriter(out / shard_name(s)).close()
            done[str(s)] = {"fingerprint": fps[s], "file": shard_name(s)}
        write_json_atomic(done_file, done)
    found = [results.get(i) for i in range(len(plan))]
    manifest = manifest_table(plan, pa.Table.from_batches([results_batch(found)]))
    write_manifest(manifest_path, manifest)
    n, n_bad = manifest.num_rows, pc.sum(pc.not_equal(manifest.column("status"), "ok")).as_py() or 0
    n_dup = n - manifest.column("duplicate_of").null_count
    summary = progress.finish(
        f"{n - n_bad} ok, {n_bad} quarantined, {n_dup} exact duplicate(s), "
        f"{len(fps) - len(kept)} shard(s) written, {len(kept)} kept, in {out}"
    )
    return IngestResult(n, n - n_bad, n_bad, n_dup, len(fps) - len(kept), len(kept), summary)


def _previous_results(path: Path, plan: ShardPlan) -> dict[int, dict]:
    """Manifest rows of an earlier ingest, by position in ``plan`` (for the shards it completed)."""
    if not path.exists():
        return {}
    position = {key: i for i, key in enumerate(plan.table.column("key").to_pylist())}
    out = {}
    for row in read_manifest(path).to_pylist():
        if row["key"] in position and row["shard"] >= 0:
            out[position[row["key"]]] = {k: row[k] for k in ("id", "bytes", "width", "height", "reason")}
    return out
