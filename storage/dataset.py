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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedpipe.storage.contracts.layout import atomic_path, write_json_atomic
from embedpipe.storage.inputs import InputRef, KnownTars, Listing


@dataclass(frozen=True)
class ShardPlan:
    """Inputs in stream order (by shard, then listing order) with their shard numbers."""

    source: str
    refs: tuple[InputRef, ...]
    shards: tuple[int, ...]
    problems: tuple[tuple[str, str], ...]  # (key, reason) of entries unusable already at listing
    shard_size: int
    fingerprint: str

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(r.key for r in self.refs)

    @property
    def n_shards(self) -> int:
        return max(self.shards, default=0) + 1

    def shard_of(self, position: int) -> int:
        return self.shards[position]


def assign_shards(keys: list[str], shard_size: int, previous: dict[str, int] | None = None) -> list[int]:
    """Shard of each key: its earlier shard when ``previous`` has it, else new shards after the last one,
    ``shard_size`` new keys each, in the order given."""
    previous = previous or {}
    first_new = max(previous.values(), default=-1) + 1
    out, n_new = [], 0
    for key in keys:
        if key in previous:
            out.append(previous[key])
        else:
            out.append(first_new + n_new // shard_size)
            n_new += 1
    return out


def plan_listing(
    listing: Listing, source: str, shard_size: int, previous: dict[str, int] | None = None
) -> ShardPlan:
    """Cut the inputs of ``listing`` into shards (stable against ``previous``: key -> shard)."""
    shards = assign_shards([r.key for r in listing.refs], shard_size, previous)
    order = sorted(range(len(shards)), key=lambda i: (shards[i], i))
    digest = hashlib.sha256(f"{listing.fingerprint()}\0{shard_size}\0".encode())
    digest.update(",".join(str(shards[i]) for i in order).encode())
    return ShardPlan(
        source,
        tuple(listing.refs[i] for i in order),
        tuple(shards[i] for i in order),
        tuple(listing.problems),
        shard_size,
        digest.hexdigest()[:16],
    )


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


def manifest_rows(plan: ShardPlan, results: dict[int, dict]) -> list[dict]:
    """One manifest row per planned input (``results``: position -> {id, bytes, width, height, reason})
    plus the entries rejected at listing; ``duplicate_of`` set on repeated content."""
    rows, first_of = [], {}
    for pos, (ref, shard) in enumerate(zip(plan.refs, plan.shards, strict=True)):
        res = results.get(pos, {})
        cid, reason = res.get("id") or None, res.get("reason") or None
        duplicate = first_of.setdefault(cid, ref.key) if cid else None
        rows.append(
            {
                "key": ref.key,
                "uri": ref.uri,
                "offset": ref.offset,
                "length": ref.length,
                "label": ref.label,
                "shard": shard,
                "id": cid,
                "bytes": res.get("bytes"),
                "width": res.get("width") if not reason else None,
                "height": res.get("height") if not reason else None,
                "status": "quarantined" if reason else "ok",
                "reason": reason,
                "duplicate_of": None if duplicate == ref.key else duplicate,
            }
        )
    for key, reason in plan.problems:
        rows.append(
            {
                "key": key,
                "uri": key,
                "offset": -1,
                "length": -1,
                "label": None,
                "shard": -1,
                "id": None,
                "bytes": None,
                "width": None,
                "height": None,
                "status": "quarantined",
                "reason": reason,
                "duplicate_of": None,
            }
        )
    return rows


def write_manifest(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp, compression="zstd")


def read_manifest(path: Path) -> pa.Table | None:
    return pq.read_table(path) if Path(path).exists() else None


def write_tar_stamps(path: Path, plan: ShardPlan, whole: bool = True) -> None:
    """The size:mtime stamp of each local tar shard of ``plan`` whose samples all entered the plan (none
    rejected at listing), as listed: what ``known_tars`` reads back for the next listing. ``whole``:
    the plan holds every listed input (False for a benchmark's image list: then no shard is recorded)."""
    refs = plan.refs if whole else ()
    stamps = {r.uri: r.stamp.rsplit(":", 1)[0] for r in refs if r.offset >= 0 and "://" not in r.uri}
    for key, _ in plan.problems:  # "shard.tar/sample": a sample without an image, say
        for cut in (i for i, c in enumerate(key) if c == "/"):
            stamps.pop(key[:cut], None)
    write_json_atomic(path, dict(sorted(stamps.items())))


def known_tars(dataset: Path, stamps: Path) -> KnownTars:
    """The local tar shards an earlier plan of the run took whole: resolved path -> (stamp then, its
    samples in member order, rebuilt from the dataset manifest), for ``known_tar_listings``
    (``workers.ingest.sources``; ``workers.ingest.plan.run_listings``)."""
    try:
        recorded = json.loads(stamps.read_text())
    except (OSError, ValueError):
        return {}
    table = read_manifest(dataset) if recorded and isinstance(recorded, dict) else None
    if table is None:
        return {}
    table = table.select(["key", "uri", "offset", "length", "label"])
    table = table.filter(pc.is_in(table.column("uri"), value_set=pa.array(list(recorded), pa.string())))
    table = table.filter(pc.greater_equal(table.column("offset"), 0))
    members: dict[str, list[InputRef]] = {}
    for key, uri, offset, length, label in zip(
        *(table.column(c).to_pylist() for c in table.column_names), strict=True
    ):
        stamp = f"{recorded[uri]}:{length}"
        members.setdefault(uri, []).append(InputRef(key, uri, offset, length, label, stamp))
    return {
        uri: (recorded[uri], tuple(sorted(refs, key=lambda r: r.offset))) for uri, refs in members.items()
    }


def previous_shards(path: Path) -> dict[str, int]:
    """key -> shard of an earlier manifest (empty when there is none)."""
    table = read_manifest(path)
    if table is None:
        return {}
    return {
        k: s
        for k, s in zip(table.column("key").to_pylist(), table.column("shard").to_pylist(), strict=True)
        if s >= 0
    }


def labels_by_key(path: Path) -> dict[str, str]:
    table = read_manifest(path)
    if table is None:
        return {}
    keys, labels = table.column("key").to_pylist(), table.column("label").to_pylist()
    return {k: lab for k, lab in zip(keys, labels, strict=True) if lab is not None}


def locations(path: Path) -> dict[str, tuple[str, int, int]]:
    """key -> (uri, offset, length) of every input of a manifest, to read one back (report thumbnails)."""
    table = read_manifest(path)
    if table is None:
        return {}
    cols = [table.column(c).to_pylist() for c in ("key", "uri", "offset", "length")]
    return {k: (u, o, n) for k, u, o, n in zip(*cols, strict=True)}
