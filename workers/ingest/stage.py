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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.storage.contracts.errors import DecodeError
from embedpipe.storage.contracts.layout import spill_folder, write_json_atomic
from embedpipe.storage.dataset import (
    RESULT_SCHEMA,
    ShardPlan,
    previous_shards,
    read_manifest,
    write_plan_manifest,
)
from embedpipe.storage.inputs import spill_to
from embedpipe.storage.tar_shards import ShardTarWriter, shard_name
from embedpipe.workers.engines.ray_data import map_table
from embedpipe.workers.engines.ray_stages import (
    batch_results,
    input_table,
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
    out: dict[int, str] = {}
    for shard in plan.shard_numbers():
        digest = hashlib.sha256(settings)
        for ref in plan.shard_rows(shard):
            digest.update(ref.signature() + str(rotation_of(ref.key, rotations)).encode())
        out[shard] = digest.hexdigest()[:16]
    return out


def run_ingest(source: str, out: Path, cfg: Config, max_side: int) -> IngestResult:
    """Ingest ``source`` into ``out`` (see the module doc). The driver keeps the inputs and their results
    as Arrow columns, never a Python object per input; the rows to read go to Ray as Arrow blocks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.parquet"
    with remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries), spill_to(spill_folder(out)):
        plan = plan_shards(source, cfg.extract.shard_size, previous_shards(manifest_path))
    done_file = out / SHARDS_FILE
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    fps = _shard_fingerprints(plan, max_side, cfg)
    kept = {
        s
        for s, fp in fps.items()
        if done.get(str(s), {}).get("fingerprint") == fp and (out / shard_name(s)).exists()
    }
    found = [_previous_results(manifest_path, plan, kept)] if kept else []
    todo = np.flatnonzero(~np.isin(plan.shards, sorted(kept)))
    log.info("ingest %s: %d inputs in %d shard(s), %d already done", source, len(plan), len(fps), len(kept))
    progress = Progress("ingest", len(todo), log)
    writers: dict[int, ShardTarWriter] = {}
    written: set[int] = set()
    members = _ShardMembers(plan)

    def finish(shard: int) -> None:
        writers.pop(shard).close()
        written.add(shard)
        done[str(shard)] = {"fingerprint": fps[shard], "file": shard_name(shard)}
        write_json_atomic(done_file, done)

    if todo.size:
        with ray_session(cfg.ray):
            rows = input_table(plan.table, todo, ingest=cfg.ingest)
            batch_size = max(cfg.extract.batch_size, cfg.ingest.read_threads)  # a read per thread at least
            kwargs = {"max_side": max_side, "ingest": cfg.ingest}
            for batch in map_table(rows, ingest_batch, kwargs, batch_size, cfg.ray, "ingest"):
                found.append(pa.Table.from_batches([batch_results(batch)]))
                for j, pos in enumerate(batch["pos"].tolist()):
                    shard = plan.shard_of(pos)
                    key, label = members.of(shard, pos)
                    for s in [s for s in writers if s != shard]:
                        finish(s)
                    if shard not in writers:
                        writers[shard] = ShardTarWriter(out / shard_name(shard))
                    if batch["error"][j]:
                        log.warning("quarantined %s: %s", key, batch["error"][j])
                    else:
                        meta = {
                            "source": key,
                            "id": batch["id"][j],
                            "width": int(batch["width"][j]),
                            "height": int(batch["height"][j]),
                        }
                        writers[shard].add(key, label, batch["payload"][j], batch["ext"][j], meta)
                progress.update(len(batch["pos"]))
            for s in list(writers):
                finish(s)
        for s in sorted(set(np.unique(plan.shards[todo]).tolist()) - written):  # shards without an image
            ShardTarWriter(out / shard_name(s)).close()
            done[str(s)] = {"fingerprint": fps[s], "file": shard_name(s)}
        write_json_atomic(done_file, done)
    ordered, ends = _in_plan_order(found, len(plan)), np.cumsum([0, *plan.file.rows])
    per_shard = [ordered.slice(lo, hi - lo) for lo, hi in zip(ends[:-1], ends[1:], strict=True)]
    counts = write_plan_manifest(manifest_path, plan, per_shard)
    n, n_bad, n_dup = counts["inputs"], counts["quarantined"], counts["duplicates"]
    summary = progress.finish(
        f"{n - n_bad} ok, {n_bad} quarantined, {n_dup} exact duplicate(s), "
        f"{len(fps) - len(kept)} shard(s) written, {len(kept)} kept, in {out}"
    )
    return IngestResult(n, n - n_bad, n_bad, n_dup, len(fps) - len(kept), len(kept), summary)


class _ShardMembers:
    """The keys and labels of one shard of ``plan`` at a time (the one being written), by plan position."""

    def __init__(self, plan: ShardPlan):
        self.plan, self.shard, self.start = plan, -1, 0
        self.keys: list[str] = []
        self.labels: list[str | None] = []

    def of(self, shard: int, pos: int) -> tuple[str, str | None]:
        if shard != self.shard:
            rows = self.plan.shard_rows(shard).table
            self.shard, self.start = shard, int(np.searchsorted(self.plan.shards, shard))
            self.keys, self.labels = rows.column("key").to_pylist(), rows.column("label").to_pylist()
        return self.keys[pos - self.start], self.labels[pos - self.start]


RESULT_COLUMNS = ["pos", *RESULT_SCHEMA.names]


def _in_plan_order(found: list[pa.Table], n: int) -> pa.Table:
    """The ``RESULT_SCHEMA`` rows of the plan's ``n`` inputs in plan order, from ``found`` (tables with a
    ``pos`` column); an input found nowhere gets a row of nulls."""
    schema = pa.schema([pa.field("pos", pa.int64()), *RESULT_SCHEMA])
    known = pa.concat_tables([schema.empty_table(), *(f.select(RESULT_COLUMNS).cast(schema) for f in found)])
    every = pa.table({"pos": pa.array(np.arange(n, dtype=np.int64))})
    joined = every.join(known, "pos", join_type="left outer", use_threads=False)
    return joined.sort_by("pos").select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)


def _previous_results(path: Path, plan: ShardPlan, kept: set[int]) -> pa.Table:
    """Manifest rows of an earlier ingest for the inputs of ``plan`` in the shards it completed
    (``kept``), with each input's ``pos`` in ``plan``; column work in Arrow."""
    schema = pa.schema([pa.field("pos", pa.int64()), *RESULT_SCHEMA])
    table = read_manifest(path)
    if table is None:
        return schema.empty_table()
    table = table.filter(pc.greater_equal(table.column("shard"), 0))
    pos = pc.index_in(table.column("key"), value_set=plan.table.column("key"))
    table = table.append_column("pos", pc.cast(pos, pa.int64())).filter(pc.is_valid(pos))
    shards = pa.array(plan.shards).take(table.column("pos"))
    table = table.filter(pc.is_in(shards, value_set=pa.array(sorted(kept), pa.int64())))
    return table.select(RESULT_COLUMNS).cast(schema)
