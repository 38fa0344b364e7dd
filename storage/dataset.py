"""Shard plan and dataset manifest.

The plan puts every listed input (listed by ``workers.ingest.sources``; ``workers.ingest.plan`` lists a
source and plans it) in a shard. It is stable: given the manifest of an earlier ingest of the same run,
inputs seen before keep their shard and new inputs fill new shards after the last one, so existing shard
membership never changes when files are added.

The dataset manifest (``dataset.parquet``) has one row per input: its key and where it is read from, its
label, shard, content-hash id, byte size, image size, status (``ok`` / ``quarantined``) with the reason,
and ``duplicate_of`` (the first input with the same bytes).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedpipe.storage.contracts.layout import atomic_path, write_json_atomic
from embedpipe.storage.inputs import (
    CHUNK,
    REF_SCHEMA,
    SPILL_SCHEMA,
    InputRef,
    KnownTars,
    Listing,
    RefView,
    SpillFile,
    as_refs,
    as_spilled,
)

PLAN_SCHEMA = SPILL_SCHEMA.append(pa.field("shard", pa.int32(), nullable=False))  # as the file holds it
_REF_PLAN = REF_SCHEMA.append(pa.field("shard", pa.int32(), nullable=False))  # as it is read back


@dataclass(frozen=True)
class ShardPlan:
    """Inputs in stream order (by shard, then listing order) with their shard numbers, kept in a
    ``SpillFile`` (``PLAN_SCHEMA``) of one record batch per shard: a shard's inputs are read back alone
    (``shard_rows``, ``batches``), and the process holds a number and a count per shard, not the plan."""

    source: str
    file: SpillFile
    numbers: np.ndarray  # the shard of each of the file's batches, increasing
    problems: tuple[tuple[str, str], ...]  # (key, reason) of entries unusable already at listing
    shard_size: int
    fingerprint: str

    def __len__(self) -> int:
        return sum(self.file.rows)

    def shard_numbers(self) -> list[int]:
        """The shards that hold inputs, in order."""
        return self.numbers.tolist()

    def shard_sizes(self) -> dict[int, int]:
        return dict(zip(self.numbers.tolist(), self.file.rows, strict=True))

    @property
    def n_shards(self) -> int:
        return int(self.numbers[-1]) + 1 if len(self.numbers) else 1

    def shard_table(self, shard: int) -> pa.Table:
        """The inputs of ``shard`` (``REF_SCHEMA`` and ``shard``), in plan order; empty when it has none."""
        i = int(np.searchsorted(self.numbers, shard))
        if i == len(self.numbers) or self.numbers[i] != shard:
            return _REF_PLAN.empty_table()
        return pa.Table.from_batches([as_refs(self.file.batch(i))])

    def batches(self) -> Iterator[pa.Table]:
        """Each shard's ``shard_table``, in order."""
        for batch in self.file.batches():
            yield pa.Table.from_batches([as_refs(batch)])

    @property
    def table(self) -> pa.Table:
        """The whole plan in one table (``REF_SCHEMA`` and ``shard``): in memory, unlike the plan."""
        return pa.concat_tables([_REF_PLAN.empty_table(), *self.batches()])

    @property
    def refs(self) -> RefView:
        return RefView(self.table)

    @functools.cached_property
    def shards(self) -> np.ndarray:
        """The shard of each input, in stream order (so non-decreasing): one number per input."""
        return np.repeat(self.numbers.astype(np.int64), self.file.rows)

    def shard_rows(self, shard: int) -> RefView:
        """The inputs of ``shard``, in plan order."""
        return RefView(self.shard_table(shard))

    def refs_of(self, shard: int) -> tuple[InputRef, ...]:
        return tuple(self.shard_rows(shard))

    def shard_of(self, position: int) -> int:
        ends = np.cumsum(self.file.rows)
        return int(self.numbers[int(np.searchsorted(ends, position, side="right"))])


class _PlanWriter:
    """Writes a plan's file, one record batch per shard, from inputs given in stream order."""

    def __init__(self) -> None:
        self.file = SpillFile(PLAN_SCHEMA, "plan")
        self.numbers: list[int] = []
        self.pending: list[pa.Table] = []

    def add(self, table: pa.Table | pa.RecordBatch, shards: np.ndarray) -> None:
        """Inputs (``REF_SCHEMA`` columns) and their shards, continuing the stream order."""
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
        if not len(shards):
            return
        if self.numbers and shards[0] < self.numbers[-1] or np.any(shards[1:] < shards[:-1]):
            raise ValueError("plan inputs out of stream order")
        cuts = np.flatnonzero(shards[1:] != shards[:-1]) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(shards)], strict=True):
            shard = int(shards[lo])
            if not self.numbers or shard != self.numbers[-1]:
                self._emit()
                self.numbers.append(shard)
            rows = table.slice(lo, hi - lo).select(REF_SCHEMA.names)
            self.pending.append(rows.append_column("shard", pa.array(np.full(hi - lo, shard, np.int32))))

    def _emit(self) -> None:
        if self.pending:
            self.file.write(as_spilled(pa.concat_tables(self.pending), PLAN_SCHEMA))
            self.pending = []

    def plan(self, source: str, problems: Sequence, shard_size: int, digest: Any) -> ShardPlan:
        self._emit()
        self.file.close()
        numbers = np.array(self.numbers, np.int64)
        return ShardPlan(source, self.file, numbers, tuple(problems), shard_size, digest.hexdigest()[:16])


def previous_table(previous: pa.Table | Mapping[str, int] | None) -> pa.Table | None:
    """An earlier plan's ``key`` and ``shard`` columns, from a table (as it is) or a mapping."""
    if previous is None or isinstance(previous, pa.Table):
        return previous
    return pa.table(
        {"key": pa.array(list(previous), pa.string()), "shard": pa.array(list(previous.values()), pa.int64())}
    )


def assign_shards(
    keys: Sequence[str] | pa.Array | pa.ChunkedArray,
    shard_size: int,
    previous: pa.Table | Mapping[str, int] | None = None,
    after: int = -1,
) -> np.ndarray:
    """Shard of each key: its earlier shard when ``previous`` (``key``/``shard`` columns, or a mapping)
    has it, else new shards after the last one (and after ``after``), ``shard_size`` new keys each, in
    the order given."""
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = pa.array(list(keys), pa.string())
    previous = previous_table(previous)
    out = np.empty(len(keys), np.int64)
    known = np.zeros(len(keys), bool)
    first_new = after + 1
    if previous is not None and previous.num_rows:
        old = previous.column("shard").to_numpy().astype(np.int64)
        where = pc.index_in(keys, value_set=previous.column("key"))
        known = where.is_valid().to_numpy(zero_copy_only=False)
        out[known] = old[where.drop_null().to_numpy()]
        first_new = max(first_new, int(old.max()) + 1)
    out[~known] = first_new + np.arange(int((~known).sum())) // shard_size
    return out


class ShardDigest:
    """Feeds a digest shard numbers as ``0,0,1,...`` (the plan fingerprint), a chunk at a time."""

    def __init__(self, digest: Any):
        self.digest, self.first = digest, True

    def update(self, shards: np.ndarray) -> None:
        for i in range(0, len(shards), CHUNK):
            text = ",".join(map(str, shards[i : i + CHUNK].tolist()))
            self.digest.update((("" if self.first else ",") + text).encode())
            self.first = False


def plan_listing(
    listing: Listing,
    source: str,
    shard_size: int,
    previous: pa.Table | Mapping[str, int] | None = None,
    after: int = -1,
    digest: Any = None,
    digest_stream_order: bool = True,
) -> ShardPlan:
    """Cut the inputs of ``listing`` into shards (stable against ``previous``: key -> shard; new shards
    after ``after`` too). The fingerprint: ``digest`` (default: of the listing and ``shard_size``) fed the
    shard numbers in stream order (``digest_stream_order``) or in listing order.

    Without an earlier plan the listing is planned as it streams, a batch at a time (shards in listing
    order): the process holds a batch. Against an earlier plan, its keys and the listing's are joined
    in memory, and the plan is put in shard order there."""
    if digest is None:
        digest = hashlib.sha256(f"{listing.fingerprint()}\0{shard_size}\0".encode())
    numbers, writer = ShardDigest(digest), _PlanWriter()
    previous = previous_table(previous)
    if previous is None or not previous.num_rows:
        start = 0
        for batch in listing.batches():
            shards = after + 1 + (start + np.arange(batch.num_rows)) // shard_size
            writer.add(batch, shards)
            numbers.update(shards)
            start += batch.num_rows
        return writer.plan(source, listing.problems, shard_size, digest)
    table = listing.table()
    shards = assign_shards(table.column("key"), shard_size, previous, after)
    order = np.argsort(shards, kind="stable")
    numbers.update(shards[order] if digest_stream_order else shards)
    table, shards = table.take(pa.array(order)), shards[order]
    for i in range(0, len(shards), CHUNK):
        writer.add(table.slice(i, CHUNK), shards[i : i + CHUNK])
    return writer.plan(source, listing.problems, shard_size, digest)


def merge_plans(first: ShardPlan, second: ShardPlan, digest: Any) -> ShardPlan:
    """One plan of the shards of both (no shard in both), in shard order, with fingerprint ``digest``."""
    if np.intersect1d(first.numbers, second.numbers).size:
        raise ValueError("the plans to merge share a shard")
    writer = _PlanWriter()
    both = [(int(s), first, i) for i, s in enumerate(first.numbers)]
    both += [(int(s), second, i) for i, s in enumerate(second.numbers)]
    for shard, plan, i in sorted(both, key=lambda item: item[0]):
        writer.numbers.append(shard)
        writer.file.write(plan.file.batch(i))
    return writer.plan(first.source, first.problems + second.problems, first.shard_size, digest)


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("length", pa.int64(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("duplicate_of", pa.string()),
    ]
)


RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("reason", pa.string()),
    ]
)
"""What reading an input gave (``results_batch``): its content id, byte size, image size, and the reason
it was quarantined (null when it was not; every field null when the input was not read)."""


def results_batch(results: Sequence[dict | None]) -> pa.RecordBatch:
    """One ``RESULT_SCHEMA`` row per input (a dict with those keys, or None when unknown)."""
    blank: dict = {}
    rows = [r or blank for r in results]
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.get("id") or None for r in rows], pa.string()),
            pa.array([r.get("bytes") for r in rows], pa.int64()),
            pa.array([r.get("width") for r in rows], pa.int32()),
            pa.array([r.get("height") for r in rows], pa.int32()),
            pa.array([r.get("reason") or None for r in rows], pa.string()),
        ],
        schema=RESULT_SCHEMA,
    )


def manifest_table(plan: ShardPlan, results: pa.Table) -> pa.Table:
    """The dataset manifest: one row per planned input (``results``: its ``RESULT_SCHEMA`` row, in plan
    order) plus the entries rejected at listing; ``duplicate_of`` set on repeated content (the first
    input in plan order with the same id). Column work in Arrow: no Python object per input."""
    t, n = plan.table, len(plan)
    if results.num_rows != n:
        raise ValueError(f"{results.num_rows} results for {n} planned inputs")
    keys, ids, reason = t.column("key"), results.column("id"), results.column("reason")
    bad = pc.is_valid(reason)
    # the first position of each id (rows without one have no duplicate)
    positions = pa.array(np.arange(n, dtype=np.int64))
    firsts = (
        pa.table({"id": ids, "pos": positions})
        .filter(pc.is_valid(ids))
        .group_by("id", use_threads=False)
        .aggregate([("pos", "min")])
    )
    first = pc.take(firsts.column("pos_min"), pc.index_in(ids, value_set=firsts.column("id")))
    duplicate = pc.if_else(pc.equal(first, positions), None, pc.take(keys, pc.fill_null(first, 0)))
    no_size = pa.nulls(n, pa.int32())
    columns = {
        "key": keys,
        "uri": pc.coalesce(pc.cast(t.column("uri"), pa.string()), keys),
        "offset": t.column("offset"),
        "length": t.column("length"),
        "label": t.column("label"),
        "shard": t.column("shard"),
        "id": ids,
        "bytes": results.column("bytes"),
        "width": pc.if_else(bad, no_size, results.column("width")),
        "height": pc.if_else(bad, no_size, results.column("height")),
        "status": pc.if_else(bad, "quarantined", "ok"),
        "reason": reason,
        "duplicate_of": duplicate,
    }
    planned = pa.table(columns, schema=MANIFEST_SCHEMA)
    listed = [
        {
            "key": key,
            "uri": key,
            "offset": -1,
            "length": -1,
            "shard": -1,
            "status": "quarantined",
            "reason": why,
        }
        for key, why in plan.problems
    ]
    return pa.concat_tables([planned, pa.Table.from_pylist(listed, schema=MANIFEST_SCHEMA)])


def write_manifest(path: Path, manifest: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(manifest, tmp, compression="zstd")


def read_manifest(path: Path) -> pa.Table | None:
    return pq.read_table(path) if Path(path).exists() else None


def write_tar_stamps(path: Path, plan: ShardPlan, whole: bool = True) -> None:
    """The size:mtime stamp of each local tar shard of ``plan`` whose samples all entered the plan (none
    rejected at listing), as listed: what ``known_tars`` reads back for the next listing. ``whole``:
    the plan holds every listed input (False for a benchmark's image list: then no shard is recorded)."""
    stamps: dict[str, str] = {}
    for table in plan.batches() if whole else ():  # a shard at a time
        table = table.filter(pc.greater_equal(table.column("offset"), 0))
        table = table.set_column(1, "uri", pc.cast(table.column("uri"), pa.string()))
        table = table.filter(pc.invert(pc.match_substring(table.column("uri"), "://")))
        table = table.group_by("uri", use_threads=False).aggregate([("stamp", "first")])
        for uri, stamp in zip(*(table.column(c).to_pylist() for c in ("uri", "stamp_first")), strict=True):
            stamps.setdefault(uri, stamp.rsplit(":", 1)[0])
    for key, _ in plan.problems:  # "shard.tar/sample": a sample without an image, say
        for cut in (i for i, c in enumerate(key) if c == "/"):
            stamps.pop(key[:cut], None)
    write_json_atomic(path, dict(sorted(stamps.items())))


def known_tars(dataset: Path, stamps: Path) -> KnownTars:
    """The local tar shards an earlier plan of the run took whole: resolved path -> (stamp then, its
    samples in member order as ``REF_SCHEMA`` rows, rebuilt from the dataset manifest), for
    ``known_tar_listings`` (``workers.ingest.sources``; ``workers.ingest.plan.run_listings``)."""
    try:
        recorded = json.loads(stamps.read_text())
    except (OSError, ValueError):
        return {}
    if not recorded or not isinstance(recorded, dict) or not dataset.exists():
        return {}
    table = pq.read_table(dataset, columns=["key", "uri", "offset", "length", "label"])
    table = table.filter(pc.is_in(table.column("uri"), value_set=pa.array(list(recorded), pa.string())))
    table = table.filter(pc.greater_equal(table.column("offset"), 0))
    table = table.sort_by([("uri", "ascending"), ("offset", "ascending")])
    runs = pc.run_end_encode(table.column("uri").combine_chunks())
    out, start = {}, 0
    for uri, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        members = table.slice(start, end - start)
        lengths = pc.cast(members.column("length"), pa.string())
        stamp = pc.binary_join_element_wise(f"{recorded[uri]}:", lengths, "")
        members = members.append_column("stamp", stamp)
        out[uri] = (recorded[uri], members.select(REF_SCHEMA.names).cast(REF_SCHEMA))
        start = end
    return out


def previous_shards(path: Path) -> pa.Table | None:
    """The ``key`` and ``shard`` columns of an earlier manifest's planned inputs (None when there is
    none): what ``assign_shards`` keeps stable."""
    if not Path(path).exists():
        return None
    table = pq.read_table(path, columns=["key", "shard"])
    return table.filter(pc.greater_equal(table.column("shard"), 0))


def labels_by_key(path: Path) -> dict[str, str]:
    table = read_manifest(path)
    if table is None:
        return {}
    keys, labels = table.column("key").to_pylist(), table.column("label").to_pylist()
    return {k: lab for k, lab in zip(keys, labels, strict=True) if lab is not None}


def locations(path: Path, keys: Iterable[str] | None = None) -> dict[str, tuple[str, int, int]]:
    """key -> (uri, offset, length) of the inputs of a manifest (those named by ``keys``, else all), to
    read one back (report thumbnails)."""
    if not Path(path).exists():
        return {}
    table = pq.read_table(path, columns=["key", "uri", "offset", "length"])
    if keys is not None:
        table = table.filter(
            pc.is_in(table.column("key"), value_set=pa.array(sorted(set(keys)), pa.string()))
        )
    cols = [table.column(c).to_pylist() for c in ("key", "uri", "offset", "length")]
    return {k: (u, o, n) for k, u, o, n in zip(*cols, strict=True)}
