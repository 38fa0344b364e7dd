"""Parquet stores of local features and of bag-of-words encodings, laid out like the global store.

``features/local-<sift|orb>/part-XXXXX-of-YYYYY.parquet``, one row per image: ``id``, ``path``,
``width``, ``height``, keypoints as list columns ``x``, ``y``, ``size``, ``angle`` (float32) and
``descriptors`` (list of fixed-size lists of uint8: 128 bytes for SIFT, 32 for ORB).

``features/bow-<feature>/...``, one row per image: ``id``, ``path``, ``width``, ``height``, ``words``
(list of int32: the m nearest visual words of each keypoint, keypoint-major, in the local store's
keypoint order) and ``weights`` (list of float32, same length). Files open with pandas or duckdb.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedpipe.storage.contracts.layout import write_json_atomic
from embedpipe.storage.features import MANIFEST, FeatureWriter

_BASE = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
]


def local_schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    floats = pa.list_(pa.float32())
    return pa.schema(
        [
            *_BASE,
            *(pa.field(c, floats, nullable=False) for c in ("x", "y", "size", "angle")),
            pa.field("descriptors", pa.list_(pa.list_(pa.uint8(), dim)), nullable=False),
        ],
        metadata=metadata,
    )


def bow_schema(metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema(
        [
            *_BASE,
            pa.field("words", pa.list_(pa.int32()), nullable=False),
            pa.field("weights", pa.list_(pa.float32()), nullable=False),
        ],
        metadata=metadata,
    )


def _lists(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """One list per array, built from a single concatenation (no per-row Python objects)."""
    offsets = np.zeros(len(arrays) + 1, np.int32)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def local_table(
    schema: pa.Schema, ids, paths, widths, heights, keypoints: list[np.ndarray], descriptors: list[np.ndarray]
) -> pa.Table:
    """Rows of the local store.

    keypoints[i]: (n_i, 4) float32 x, y, size, angle; descriptors[i]: (n_i, dim) uint8."""
    dim = schema.field("descriptors").type.value_type.list_size
    flat = pa.array(np.concatenate([d.reshape(-1) for d in descriptors]) if descriptors else [], pa.uint8())
    per_kp = pa.FixedSizeListArray.from_arrays(flat, dim)
    offsets = np.zeros(len(descriptors) + 1, np.int32)
    offsets[1:] = np.cumsum([len(d) for d in descriptors])
    columns: dict[str, Any] = {
        "id": pa.array(list(ids), pa.string()),
        "path": pa.array(list(paths), pa.string()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
    }
    for j, name in enumerate(("x", "y", "size", "angle")):
        columns[name] = _lists([k[:, j] for k in keypoints], pa.float32())
    columns["descriptors"] = pa.ListArray.from_arrays(pa.array(offsets), per_kp)
    return pa.table(columns).cast(schema)


def bow_table(
    schema: pa.Schema, meta: pa.Table, words: list[np.ndarray], weights: list[np.ndarray]
) -> pa.Table:
    """Rows of a BoW store: ``meta`` gives id, path, width, height; words/weights one flat array per image."""
    columns = {c: meta.column(c) for c in ("id", "path", "width", "height")}
    columns["words"] = _lists([w.astype(np.int32) for w in words], pa.int32())
    columns["weights"] = _lists([w.astype(np.float32) for w in weights], pa.float32())
    return pa.table(columns).cast(schema)


class LocalFeatureWriter(FeatureWriter):
    """Streams local-feature rows into part files (same shard discipline as ``FeatureWriter``)."""

    def __init__(self, directory: Path, dim: int, n_shards: int, meta: dict[str, Any]):
        super().__init__(directory, dim, n_shards, meta)
        self.schema = local_schema(dim, {"embedpipe": json.dumps(meta, sort_keys=True)})
        self.keypoints = 0

    def write_images(self, shard: int, ids, paths, widths, heights, keypoints, descriptors) -> None:
        self.write_table(shard, local_table(self.schema, ids, paths, widths, heights, keypoints, descriptors))
        self.keypoints += sum(len(k) for k in keypoints)

    def close(self) -> None:
        self.meta = {**self.meta, "keypoints": self.keypoints}
        super().close()


def list_values(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets (n+1,), flat values): row i is values[offsets[i]:offsets[i+1]]."""
    col = table.column(column).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values
    if pa.types.is_fixed_size_list(values.type):
        dim = values.type.list_size
        flat = values.flatten().to_numpy(zero_copy_only=False)
        values_np = flat.reshape(-1, dim)
    else:
        values_np = values.to_numpy(zero_copy_only=False)
    base, end = int(offsets[0]), int(offsets[-1])
    return offsets - base, values_np[base:end]


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(directory) / MANIFEST, info)
