"""Parquet feature store: one dataset per descriptor, ``part-XXXXX-of-YYYYY.parquet`` plus a manifest.

Rows: ``id`` (content hash), ``path`` (source), ``width``/``height`` (original image size) and
``descriptor`` (fixed-size list of float32). Files open with pandas, duckdb or pyarrow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from embedpipe.storage.contracts.layout import atomic_path, write_error, write_json_atomic
from embedpipe.storage.inputs import is_distractor

MANIFEST = "_manifest.json"


def feature_schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("descriptor", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata=metadata,
    )


def part_name(shard: int, n_shards: int) -> str:
    return f"part-{shard:05d}-of-{n_shards:05d}.parquet"


_PART = re.compile(r"^part-(\d{5,})-of-(\d{5,})\.parquet$")


def feature_table(schema: pa.Schema, ids, paths, widths, heights, vectors: np.ndarray) -> pa.Table:
    """Rows of ``schema`` (``feature_schema``) from per-image columns and (n, dim) vectors."""
    dim = schema.field("descriptor").type.list_size
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {vectors.shape}")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "path": pa.array(list(paths), pa.string()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=schema,
    )


def write_part_table(directory: Path, shard: int, n_shards: int, table: pa.Table) -> Path:
    """Write one whole part file atomically: a temporary name, then a rename."""
    final = directory / part_name(shard, n_shards)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return final


def find_part(directory: Path, shard: int) -> Path | None:
    """The part file of ``shard`` whatever the shard count in its name (that count grows when a
    collection grows), or None."""
    found = sorted(Path(directory).glob(f"part-{shard:05d}-of-*.parquet"))
    return found[-1] if found else None


def finish_store(directory: Path, n_shards: int, schema: pa.Schema, manifest: dict[str, Any]) -> None:
    """Make ``directory`` a complete store of ``n_shards`` parts: parts renamed to the current count,
    parts of shards beyond it and unfinished temporary files removed, an empty part of ``schema`` for
    each shard without one, then the manifest (``manifest`` with ``rows`` and ``n_parts``) written last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for tmp in directory.glob(".part-*.tmp"):
        tmp.unlink()
    for path in sorted(directory.glob("part-*-of-*.parquet")):
        m = _PART.match(path.name)
        if m is None:
            continue
        shard, count = int(m.group(1)), int(m.group(2))
        final = directory / part_name(shard, n_shards)
        if shard >= n_shards or (count != n_shards and final.exists()):
            path.unlink()
        elif count != n_shards:
            os.replace(path, final)
    for shard in range(n_shards):
        if not (directory / part_name(shard, n_shards)).exists():
            write_part_table(directory, shard, n_shards, schema.empty_table())
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in part_files(directory))
    write_json_atomic(directory / MANIFEST, {**manifest, "rows": rows, "n_parts": n_shards})


class FeatureWriter:
    """Streams rows into part files. Rows of one shard arrive together and shards in increasing order,
    so at most one part file is open at a time and memory stays flat."""

    def __init__(self, directory: Path, dim: int, n_shards: int, meta: dict[str, Any]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.n_shards = n_shards
        self.meta = meta
        self.schema = feature_schema(dim, {"embedpipe": json.dumps(meta, sort_keys=True)})
        self._shard: int | None = None
        self._writer: pq.ParquetWriter | None = None
        self._done: set[int] = set()
        self.rows = 0

    def _tmp(self, shard: int) -> Path:
        return self.directory / f".{part_name(shard, self.n_shards)}.tmp"

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write error on the open part removes its temporary file and raises ``WriteFailed``."""
        try:
            yield
        except OSError as err:
            shard, writer = self._shard, self._writer
            self._shard, self._writer = None, None
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.close()
            if shard is None:
                raise
            self._tmp(shard).unlink(missing_ok=True)
            raise write_error(self.directory / part_name(shard, self.n_shards), err) from err

    def _close_current(self) -> None:
        if self._shard is None:
            return
        assert self._writer is not None
        with self._writing():
            self._writer.close()
            os.replace(self._tmp(self._shard), self.directory / part_name(self._shard, self.n_shards))
        self._done.add(self._shard)
        self._shard, self._writer = None, None

    def _switch(self, shard: int) -> None:
        if shard != self._shard:
            if shard in self._done or (self._shard is not None and shard < self._shard):
                raise ValueError(f"rows of shard {shard} arrived after the shard was closed")
            self._close_current()
            self._shard = shard
            with self._writing():
                self._writer = pq.ParquetWriter(self._tmp(shard), self.schema, compression="zstd")

    def write_table(self, shard: int, table: pa.Table) -> None:
        """Append rows already shaped as ``self.schema`` to the part of ``shard``."""
        self._switch(shard)
        assert self._writer is not None
        with self._writing():
            self._writer.write_table(table.cast(self.schema))
        self.rows += len(table)

    def write(self, shard: int, ids, paths, widths, heights, vectors: np.ndarray) -> None:
        self._switch(shard)
        table = feature_table(self.schema, ids, paths, widths, heights, vectors)
        assert self._writer is not None
        with self._writing():
            self._writer.write_table(table)
        self.rows += len(table)

    def close(self) -> None:
        """Finish the open part, write empty parts for shards that had no usable image, then the manifest."""
        self._close_current()
        for shard in range(self.n_shards):
            if shard not in self._done:
                write_part_table(self.directory, shard, self.n_shards, self.schema.empty_table())
        write_json_atomic(
            self.directory / MANIFEST,
            {"dim": self.dim, "rows": self.rows, "n_parts": self.n_shards, **self.meta},
        )


def part_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*-of-*.parquet"))


def read_store_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST).read_text())


def vectors_of(table: pa.Table) -> np.ndarray:
    """The ``descriptor`` column as a contiguous (n, dim) float32 array, without a per-row copy."""
    column = table.column("descriptor").combine_chunks()
    dim = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(column), dim), dtype=np.float32)


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def read_parts(directory: Path, columns: list[str] | None = None) -> pa.Table | None:
    """Every part of a store as one table, in store order (None when it has none). Arrow reads the
    files in parallel; its scanner hands the batches back in the order of the files given."""
    paths = [str(p) for p in part_files(directory)]
    if not paths:
        return None
    scanner = ds.dataset(paths, format="parquet").scanner(columns=columns)
    return pa.Table.from_batches(scanner.to_batches(), scanner.projected_schema)


# stores ``kept_store_reads`` keeps (most recently read last), and the largest one it keeps
KEPT_READS = 2
KEPT_READ_BYTES = 1 << 30
_kept_reads: dict[tuple, tuple[pa.Table, np.ndarray]] | None = None


@contextlib.contextmanager
def kept_store_reads() -> Iterator[None]:
    """Inside this scope the last ``KEPT_READS`` stores read (up to ``KEPT_READ_BYTES`` of vectors
    each) are kept: reading one again while its part files are the same files (name, inode, size,
    mtime) returns the rows read before (read-only arrays, as Arrow's are) rather than scanning the
    Parquet again. A reindex reads each store in its drift check, its evaluation and its report."""
    global _kept_reads
    outer, _kept_reads = _kept_reads, {} if _kept_reads is None else _kept_reads
    try:
        yield
    finally:
        _kept_reads = outer


def _store_state(directory: Path) -> tuple:
    states = []
    for p in part_files(directory):
        st = p.stat()
        states.append((p.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return (str(Path(directory).resolve()), tuple(states))


def read_features(directory: Path) -> tuple[pa.Table, np.ndarray]:
    """All rows (metadata table without the vectors) and the (n, dim) vectors, in store order."""
    cache = _kept_reads
    state = _store_state(directory) if cache is not None else None
    if cache is not None and state in cache:
        cache[state] = cache.pop(state)  # most recent last
        return cache[state]
    table = read_parts(directory)
    if table is None:
        table = feature_schema(read_store_manifest(directory)["dim"]).empty_table()
    meta, vectors = table.drop_columns(["descriptor"]), vectors_of(table)
    if cache is not None and vectors.nbytes <= KEPT_READ_BYTES:
        vectors.flags.writeable = False
        cache[state] = meta, vectors
        while len(cache) > KEPT_READS:
            cache.pop(next(iter(cache)))
    return meta, vectors


def part_row_counts(directory: Path) -> list[tuple[Path, int]]:
    """(part file, rows) in store order, from the Parquet footers only."""
    return [(p, pq.ParquetFile(p).metadata.num_rows) for p in part_files(directory)]


def distractor_part(path: Path) -> bool:
    """Whether a part file holds distractors (their parts hold nothing else: see the shard plan)."""
    parquet = pq.ParquetFile(path)
    if not parquet.metadata.num_rows:
        return False
    first = parquet.read_row_group(0, columns=["path"]).column(0)[0].as_py()
    return is_distractor(first)


def fit_part_rows(directory: Path, include_distractors: bool = False) -> list[tuple[Path, int]]:
    """(part file, rows) of the parts models are fitted on, in store order: every part, or
    (``include_distractors`` off) those of the collection alone."""
    counts = part_row_counts(directory)
    if include_distractors:
        return counts
    return [(p, n) for p, n in counts if not (n and distractor_part(p))]


def sample_quotas(counts: list[int], n: int) -> list[int]:
    """Rows to sample from each part for a sample of ``min(n, total)`` rows, proportional to the part
    sizes: the floors of ``n * count / total``, then one more row to the parts with the largest
    remainders (ties: earlier part first). Integer arithmetic only, so every machine agrees."""
    total = sum(counts)
    n = min(n, total)
    if not n:
        return [0] * len(counts)
    quotas = [n * c // total for c in counts]
    remainders = [n * c % total for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    for i in order[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


def sample_part(path: Path, take: int, seed: int, part: int) -> np.ndarray:
    """``take`` rows of one part file drawn without replacement by the generator seeded with
    (``seed``, ``part``), kept in the part's order -> (take, dim) float32; only those rows are kept."""
    x = vectors_of(read_part(path, ["descriptor"]))
    rows = np.sort(np.random.default_rng([seed, part]).choice(len(x), size=take, replace=False))
    return np.ascontiguousarray(x[rows])
