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
    DISTRACTOR_PREFIX,
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
        return int(self.shards[position])


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


def key_digests(keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """A 128-bit digest of each key, as (n, 2) uint64: what an earlier plan is matched on."""
    values = keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else list(keys)
    raw = b"".join(hashlib.blake2b(k.encode(), digest_size=16).digest() for k in values)
    return np.frombuffer(raw, np.uint64).reshape(-1, 2)


class PreviousPlan:
    """An earlier plan's key -> shard, held as each key's 128-bit digest (sorted), its shard and whether
    it is a distractor's: 25 bytes per input, not the keys. Built from the dataset manifest a batch at
    a time (``previous_shards``), from a table with ``key``/``shard`` columns, or from a mapping."""

    def __init__(self, digests: np.ndarray, shards: np.ndarray, distractor: np.ndarray):
        order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: a repeated key keeps its first shard
        self.hi, self.lo = digests[order, 0].copy(), digests[order, 1].copy()
        self.shards, self.distractor = shards[order].astype(np.int64), distractor[order]

    @classmethod
    def of_batches(cls, batches: Iterable[pa.RecordBatch | pa.Table]) -> PreviousPlan:
        digests, shards, flags = [np.empty((0, 2), np.uint64)], [np.empty(0, np.int64)], [np.empty(0, bool)]
        for batch in batches:
            keys = batch.column("key")
            digests.append(key_digests(keys))
            shards.append(np.asarray(batch.column("shard").to_numpy(zero_copy_only=False), np.int64))
            flags.append(pc.starts_with(keys, DISTRACTOR_PREFIX).to_numpy(zero_copy_only=False))
        return cls(np.concatenate(digests), np.concatenate(shards), np.concatenate(flags))

    @classmethod
    def of(cls, previous: PreviousPlan | pa.Table | Mapping[str, int] | None) -> PreviousPlan | None:
        if previous is None or isinstance(previous, PreviousPlan):
            return previous
        if not isinstance(previous, pa.Table):
            previous = pa.table(
                {
                    "key": pa.array(list(previous), pa.string()),
                    "shard": pa.array(list(previous.values()), pa.int64()),
                }
            )
        return cls.of_batches(previous.to_batches(max_chunksize=CHUNK))

    def __len__(self) -> int:
        return len(self.shards)

    def last(self, distractor: bool | None = None) -> int:
        """The last shard of the plan (of its distractors', or of the collection's), -1 when none."""
        shards = self.shards if distractor is None else self.shards[self.distractor == distractor]
        return int(shards.max()) if shards.size else -1

    def part(self, distractor: bool) -> PreviousPlan:
        """The distractors' inputs alone, or the collection's."""
        keep = self.distractor == distractor
        digests = np.stack([self.hi[keep], self.lo[keep]], axis=1)
        return PreviousPlan(digests, self.shards[keep], self.distractor[keep])

    def lookup(self, digests: np.ndarray) -> np.ndarray:
        """The earlier shard of each key (``key_digests``), -1 for a key the plan did not have."""
        out = np.full(len(digests), -1, np.int64)
        if not len(self) or not len(digests):
            return out
        left = np.searchsorted(self.hi, digests[:, 0], "left")
        right = np.searchsorted(self.hi, digests[:, 0], "right")
        one = (right - left) == 1
        hit = one & (self.lo[np.minimum(left, len(self) - 1)] == digests[:, 1])
        out[hit] = self.shards[left[hit]]
        for i in np.flatnonzero(right - left > 1).tolist():  # 64 bits alike: compare the rest
            same = np.flatnonzero(self.lo[left[i] : right[i]] == digests[i, 1])
            if same.size:
                out[i] = self.shards[left[i] + same[0]]
        return out


def assign_shards(
    keys: Sequence[str] | pa.Array | pa.ChunkedArray,
    shard_size: int,
    previous: PreviousPlan | pa.Table | Mapping[str, int] | None = None,
    after: int = -1,
) -> np.ndarray:
    """Shard of each key: its earlier shard when ``previous`` (a ``PreviousPlan``, ``key``/``shard``
    columns, or a mapping) has it, else new shards after the last one (and after ``after``),
    ``shard_size`` new keys each, in the order given."""
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = pa.array(list(keys), pa.string())
    return _Assigner(shard_size, PreviousPlan.of(previous), after).shards(keys)


class _Assigner:
    """``assign_shards`` a chunk of keys at a time (new keys counted across chunks)."""

    def __init__(self, shard_size: int, previous: PreviousPlan | None, after: int):
        self.shard_size, self.new = shard_size, 0
        self.previous = previous if previous is not None and len(previous) else None
        self.first_new = max(after, previous.last() if previous is not None else -1) + 1

    def shards(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        if self.previous is None:  # a first plan: no key is looked at
            out = np.full(len(keys), -1, np.int64)
        else:
            out = self.previous.lookup(key_digests(keys))
        fresh = out < 0
        out[fresh] = self.first_new + (self.new + np.arange(int(fresh.sum()))) // self.shard_size
        self.new += int(fresh.sum())
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
    previous: PreviousPlan | pa.Table | Mapping[str, int] | None = None,
    after: int = -1,
    digest: Any = None,
    digest_stream_order: bool = True,
) -> ShardPlan:
    """Cut the inputs of ``listing`` into shards (stable against ``previous``: key -> shard; new shards
    after ``after`` too). The fingerprint: ``digest`` (default: of the listing and ``shard_size``) fed the
    shard numbers in stream order (``digest_stream_order``) or in listing order.

    The listing is read a batch at a time: its shards come first (a number per input), then the plan's
    file is written in stream order, straight from the batches when the shards follow the listing's
    order (a first plan, new tar shards after old ones), else a shard at a time, gathered from the
    batches that hold its inputs."""
    if digest is None:
        digest = hashlib.sha256(f"{listing.fingerprint()}\0{shard_size}\0".encode())
    assigner = _Assigner(shard_size, PreviousPlan.of(previous), after)
    ends, parts = [0], []
    for batch in listing.batches():
        parts.append(assigner.shards(batch.column("key")).astype(np.int32))
        ends.append(ends[-1] + batch.num_rows)
    shards = np.concatenate([np.empty(0, np.int32), *parts])
    del parts
    numbers, writer = ShardDigest(digest), _PlanWriter()
    if np.all(shards[1:] >= shards[:-1]):  # already in stream order: written as the batches come
        numbers.update(shards)
        for i, batch in enumerate(listing.batches()):
            writer.add(batch, shards[ends[i] : ends[i + 1]])
        return writer.plan(source, listing.problems, shard_size, digest)
    order = np.argsort(shards, kind="stable")
    numbers.update(shards[order] if digest_stream_order else shards)
    cuts = np.flatnonzero(np.diff(shards[order])) + 1
    batches = _BatchCache(listing)
    for run in np.split(order, cuts):
        writer.add(batches.take(run, ends), np.full(len(run), shards[run[0]], np.int64))
    return writer.plan(source, listing.problems, shard_size, digest)


class _BatchCache:
    """Rows of a listing by position, read from its batches, the last few kept."""

    KEEP = 4

    def __init__(self, listing: Listing):
        self.listing, self.kept = listing, {}

    def batch(self, i: int) -> pa.RecordBatch:
        if i not in self.kept:
            if len(self.kept) >= self.KEEP:
                self.kept.pop(next(iter(self.kept)))
            self.kept[i] = self.listing.batch(i)
        return self.kept[i]

    def take(self, positions: np.ndarray, ends: list[int]) -> pa.Table:
        """The rows at ``positions`` (increasing), in that order."""
        which = np.searchsorted(ends, positions, side="right") - 1
        pieces = []
        for i in np.unique(which).tolist():
            rows = positions[which == i] - ends[i]
            pieces.append(pa.Table.from_batches([self.batch(i).take(pa.array(rows))]))
        return pa.concat_tables(pieces)


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


def duplicates(ids: Iterable[pa.Array | pa.ChunkedArray]) -> tuple[np.ndarray, np.ndarray]:
    """(positions, first positions) of the repeated ids among ``ids`` (chunks in order; a null id
    repeats nothing): each id that occurred before, and where it first did, by position. Held: a 16-byte
    digest and a position per id, not the ids."""
    digests, positions, start = [], [], 0
    for chunk in ids:
        values = chunk.to_pylist()
        valid = [i for i, v in enumerate(values) if v is not None]
        digests.append(b"".join(hashlib.blake2b(values[i].encode(), digest_size=16).digest() for i in valid))
        positions.append(start + np.array(valid, np.int64))
        start += len(values)
    pos = np.concatenate([np.empty(0, np.int64), *positions])
    if not pos.size:
        return pos, pos
    halves = np.frombuffer(b"".join(digests), np.uint64).reshape(-1, 2)
    order = np.lexsort((halves[:, 1], halves[:, 0]))  # stable: the first position leads each id's run
    ordered = halves[order]
    starts = np.ones(len(order), bool)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    first = pos[order][np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    repeated = np.flatnonzero(~starts)
    at = np.argsort(pos[order][repeated], kind="stable")
    return pos[order][repeated][at], first[repeated][at]


def write_plan_manifest(path: Path, plan: ShardPlan, results: Sequence[pa.RecordBatch | pa.Table]) -> dict:
    """Write the dataset manifest of ``plan`` (``results[i]``: the ``RESULT_SCHEMA`` rows of the plan's
    i-th shard, in plan order) a shard at a time, plus the entries rejected at listing;
    ``duplicate_of`` set on repeated content (the first input in plan order with the same id). Returns
    the counts ``{"inputs", "quarantined", "duplicates"}`` of its rows."""
    counts = plan.file.rows
    if len(results) != len(counts) or any(results[i].num_rows != n for i, n in enumerate(counts)):
        raise ValueError(f"results do not match the {len(counts)} shard(s) of the plan")
    repeated, first = duplicates(results[i].column("id") for i in range(len(counts)))
    ends = np.cumsum(np.array(counts, np.int64))
    first_keys: dict[int, str] = {}  # the key of each first occurrence of a repeated id
    where = np.searchsorted(ends, first, side="right")
    for i in np.unique(where).tolist():
        keys = plan.file.batch(i).column("key")
        lo = int(ends[i - 1]) if i else 0
        for at in np.unique(first[where == i]).tolist():
            first_keys[at] = keys[at - lo].as_py()
    n_bad, pending, size = 0, [], 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, MANIFEST_SCHEMA, compression="zstd") as writer:
        for i, t in enumerate(plan.batches()):
            lo = int(ends[i - 1]) if i else 0
            res = results[i]
            dup = [None] * t.num_rows
            a, b = np.searchsorted(repeated, [lo, lo + t.num_rows])
            for pos, at in zip(repeated[a:b].tolist(), first[a:b].tolist(), strict=True):
                dup[pos - lo] = first_keys[at]
            page = _manifest_rows(t, res, pa.array(dup, pa.string()))
            n_bad += page.num_rows - page.column("reason").null_count
            pending.append(page)
            size += page.num_rows
            if size >= CHUNK:
                writer.write_table(pa.concat_tables(pending))
                pending, size = [], 0
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
        pending.append(pa.Table.from_pylist(listed, schema=MANIFEST_SCHEMA))
        writer.write_table(pa.concat_tables(pending))
    n = len(plan) + len(plan.problems)
    return {"inputs": n, "quarantined": n_bad + len(plan.problems), "duplicates": len(repeated)}


def _manifest_rows(t: pa.Table, results: pa.RecordBatch | pa.Table, duplicate: pa.Array) -> pa.Table:
    """The manifest rows of the plan rows ``t`` (one shard) and what reading them gave."""
    keys, reason = t.column("key"), results.column("reason")
    bad = pc.is_valid(reason)
    no_size = pa.nulls(t.num_rows, pa.int32())
    columns = {
        "key": keys,
        "uri": pc.coalesce(pc.cast(t.column("uri"), pa.string()), keys),
        "offset": t.column("offset"),
        "length": t.column("length"),
        "label": t.column("label"),
        "shard": t.column("shard"),
        "id": results.column("id"),
        "bytes": results.column("bytes"),
        "width": pc.if_else(bad, no_size, results.column("width")),
        "height": pc.if_else(bad, no_size, results.column("height")),
        "status": pc.if_else(bad, "quarantined", "ok"),
        "reason": reason,
        "duplicate_of": duplicate,
    }
    return pa.table(columns, schema=MANIFEST_SCHEMA)


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
    ``known_tar_listings`` (``workers.ingest.sources``; ``workers.ingest.plan.run_listings``). A
    ``ManifestTars``: each shard's samples are read when it is listed."""
    try:
        recorded = json.loads(stamps.read_text())
    except (OSError, ValueError):
        return {}
    if not recorded or not isinstance(recorded, dict) or not dataset.exists():
        return {}
    return ManifestTars(dataset, recorded)


class ManifestTars(Mapping[str, tuple[str, pa.Table]]):
    """``known_tars`` read from the dataset manifest on demand: opening it reads the ``uri`` column a
    row group at a time and keeps, per recorded tar shard, the row groups that hold its samples; a
    shard's samples are then read from those groups (the last few groups read are kept, so a listing in
    the manifest's order reads each group once). Held: the row groups of each shard, not its samples."""

    KEEP = 2

    def __init__(self, dataset: Path, recorded: dict[str, str]):
        self.file, self.recorded = pq.ParquetFile(dataset), recorded
        wanted = pa.array(list(recorded), pa.string())
        self.groups: dict[str, list[int]] = {}
        for g in range(self.file.num_row_groups):
            uris = pc.unique(self.file.read_row_group(g, columns=["uri"]).column("uri"))
            for uri in uris.filter(pc.is_in(uris, value_set=wanted)).to_pylist():
                self.groups.setdefault(uri, []).append(g)
        self._kept: dict[int, dict[str, pa.Table]] = {}

    def _group(self, g: int) -> dict[str, pa.Table]:
        """Row group ``g``'s samples of recorded shards, by shard, in member order."""
        if g not in self._kept:
            if len(self._kept) >= self.KEEP:
                self._kept.pop(next(iter(self._kept)))
            table = self.file.read_row_group(g, columns=["key", "uri", "offset", "length", "label"])
            table = table.filter(pc.greater_equal(table.column("offset"), 0))
            wanted = pa.array(list(self.recorded), pa.string())
            table = table.filter(pc.is_in(table.column("uri"), value_set=wanted))
            table = table.sort_by([("uri", "ascending"), ("offset", "ascending")])
            runs = pc.run_end_encode(table.column("uri").combine_chunks())
            out, start = {}, 0
            for uri, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
                out[uri], start = table.slice(start, end - start), end
            self._kept[g] = out
        return self._kept[g]

    def __getitem__(self, uri: str) -> tuple[str, pa.Table]:
        groups = self.groups[uri]
        members = pa.concat_tables([self._group(g)[uri] for g in groups])
        if len(groups) > 1:
            members = members.sort_by("offset")
        lengths = pc.cast(members.column("length"), pa.string())
        stamp = pc.binary_join_element_wise(f"{self.recorded[uri]}:", lengths, "")
        members = members.append_column("stamp", stamp)
        return self.recorded[uri], members.select(REF_SCHEMA.names).cast(REF_SCHEMA)

    def __contains__(self, uri: object) -> bool:  # without reading the shard's samples
        return uri in self.groups

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)


def previous_shards(path: Path) -> PreviousPlan | None:
    """An earlier manifest's planned inputs as a ``PreviousPlan`` (None when there is none): what a new
    plan keeps stable. Read a row group at a time: the keys are never held."""
    if not Path(path).exists():
        return None
    batches = pq.ParquetFile(path).iter_batches(batch_size=CHUNK, columns=["key", "shard"])
    return PreviousPlan.of_batches(b.filter(pc.greater_equal(b.column("shard"), 0)) for b in batches)


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
