"""Index engine: train once on a seeded sample of the feature store, fill one copy of the trained index
per part file as Ray tasks (one CPU each), merge them in part order, and keep versions on disk.

Row ids: the store's rows are numbered in store order (part by part); the FAISS id of a vector is its
row, and ``ids.parquet`` beside the index maps ``row`` -> content ``id`` -> ``path``. Incremental adds
continue the numbering; removals drop rows from both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedpipe.storage import index_versions
from embedpipe.storage.errors import InputError, RunFailed
from embedpipe.storage.features import part_row_counts, read_part, sample_vectors, vectors_of
from embedpipe.storage.layout import atomic_dir
from embedpipe.workers import ann
from embedpipe.workers.progress import Progress
from embedpipe.workers.whitening import apply_whitening

if TYPE_CHECKING:
    from embedpipe.flows.config import IndexConfig

log = logging.getLogger("embedpipe.index")

Transform = tuple[np.ndarray, np.ndarray] | None  # PCA-whitening (mean (D,), proj (d, D)) or none
IDS_FILE, INDEX_FILE = "ids.parquet", "index.faiss"


def part_table(path: Path, row0: int, transform: Transform) -> tuple[pa.Table, np.ndarray]:
    """One part's (row, id, path) table with rows numbered from ``row0``, and its (n, d) vectors."""
    table = read_part(path, ["id", "path", "descriptor"])
    x = vectors_of(table)
    if transform is not None and len(x):
        x = apply_whitening(x, *transform)
    ids = pa.table(
        {
            "row": np.arange(row0, row0 + len(x), dtype=np.int64),
            "id": table.column("id"),
            "path": table.column("path"),
        }
    )
    return ids, x


def fill_part(trained: np.ndarray, path: str, row0: int, transform: Transform) -> tuple[np.ndarray, pa.Table]:
    """One shard: a copy of the trained index filled with the part's vectors (serialised) and its ids."""
    ids, x = part_table(Path(path), row0, transform)
    return ann.serialize(ann.fill(trained, x, ids.column("row").to_numpy())), ids


def gather_part(path: str, row0: int, transform: Transform) -> tuple[np.ndarray, pa.Table]:
    """One shard of an index that cannot merge (HNSW): the part's vectors and ids, added by the caller."""
    ids, x = part_table(Path(path), row0, transform)
    return x, ids


def _ray_fill(trained: np.ndarray, path: str, row0: int, transform: Transform, merge: bool):
    """One part as a Ray task of one CPU; also returns the node id it ran on."""
    from embedpipe.workers.ray_stages import current_node

    faiss.omp_set_num_threads(1)  # one CPU per task
    out = fill_part(trained, path, row0, transform) if merge else gather_part(path, row0, transform)
    return *out, current_node()


def _recorded(result: tuple) -> tuple:
    """A ``_ray_fill`` result without its node id, which is counted on the session's ``NodeWork``."""
    from embedpipe.workers.ray_stages import record_work

    *out, node = result
    record_work("index", [node])
    return tuple(out)


def train_on_store(directory: Path, cfg: IndexConfig, seed: int, transform: Transform) -> faiss.Index:
    """The empty index of ``cfg.factory`` trained on a seeded sample of ``cfg.train_size`` rows."""
    sample = sample_vectors(directory, cfg.train_size, seed)
    if not len(sample):
        raise RunFailed(f"feature store {directory} has no rows to train an index on")
    if transform is not None:
        sample = apply_whitening(sample, *transform)
    return ann.train_index(cfg.factory, sample, seed)


def build_store_index(
    directory: Path, cfg: IndexConfig, seed: int, transform: Transform = None, engine: str | None = None
) -> tuple[faiss.Index, pa.Table]:
    """Train once, fill one index per part file (Ray tasks, or in this process with engine 'local'),
    merge in part order. Returns the index and its ids table (row, id, path)."""
    engine = engine or cfg.engine
    start = time.perf_counter()
    counts = part_row_counts(directory)
    with ann.threads_for(min(cfg.train_size, sum(c for _, c in counts))):
        trained = ann.serialize(train_on_store(directory, cfg, seed, transform))
    train_s = time.perf_counter() - start
    index, ids = fill_from_store(directory, trained, engine, transform, cfg.factory)
    ann.set_search_params(index, cfg.nprobe, cfg.efsearch)
    log.info(
        "index %s: %d vectors, trained in %.2fs, %d bytes/vector",
        cfg.factory,
        index.ntotal,
        train_s,
        ann.bytes_per_vector(index),
    )
    return index, ids


def fill_from_store(
    directory: Path,
    trained: np.ndarray,
    engine: str,
    transform: Transform = None,
    label: str = "",
    max_retries: int = 3,
) -> tuple[faiss.Index, pa.Table]:
    """Fill copies of the trained index (serialised), one per part file, as Ray tasks of one CPU each
    (engine 'ray'; a task whose worker dies is retried ``max_retries`` times) or in this process
    ('local'), and merge them in part order."""
    counts = part_row_counts(directory)
    row0s = np.concatenate([[0], np.cumsum([c for _, c in counts])])[:-1].tolist()
    jobs = [(str(p), int(r)) for (p, _), r in zip(counts, row0s, strict=True)]
    mergeable = ann.is_mergeable(ann.deserialize(trained))
    progress = Progress(f"index {label}".rstrip(), len(jobs), log, unit="parts")
    if engine == "ray":
        import ray

        task = ray.remote(num_cpus=1, max_retries=max_retries)(_ray_fill)
        ref = ray.put(trained)
        pending = [task.remote(ref, p, r, transform, mergeable) for p, r in jobs]
        results = (_recorded(ray.get(x)) for x in pending)  # in part order; each released once merged
    else:  # adds run on FAISS's own threads
        results = (
            fill_part(trained, p, r, transform) if mergeable else gather_part(p, r, transform)
            for p, r in jobs
        )
    index, tables = None, []
    for blob_or_x, ids in results:
        if mergeable:
            part = ann.deserialize(blob_or_x)
            index = part if index is None else ann.merge([index, part])
        else:
            index = index if index is not None else ann.deserialize(trained)
            if len(blob_or_x):
                index.add_with_ids(blob_or_x, ids.column("row").to_numpy())
        tables.append(ids)
        progress.update(1)
    progress.finish()
    if index is None:
        index = ann.deserialize(trained)
    return index, pa.concat_tables(tables) if tables else _empty_ids()


def _empty_ids() -> pa.Table:
    return pa.table(
        {"row": pa.array([], pa.int64()), "id": pa.array([], pa.string()), "path": pa.array([], pa.string())}
    )


def save_version(root: Path, index: faiss.Index, ids: pa.Table) -> Path:
    """Write ``index`` and its ids as a new version under ``root`` and switch CURRENT to it."""
    version = index_versions.new_version(root)
    with atomic_dir(version):  # a version that could not be written whole is removed, never published
        ann.write_index(index, version / INDEX_FILE)
        pq.write_table(ids, version / IDS_FILE)
    index_versions.publish(root, version)
    return version


def load_current(root: Path, cfg: IndexConfig | None = None) -> tuple[faiss.Index, pa.Table, Path]:
    """The live index, its ids table and its version folder."""
    version = index_versions.current(root)
    if version is None or not (version / INDEX_FILE).is_file():
        raise InputError(f"no published index under {root}")
    index = ann.read_index(version / INDEX_FILE)
    if cfg is not None:
        ann.set_search_params(index, cfg.nprobe, cfg.efsearch)
    return index, pq.read_table(version / IDS_FILE), version


def add_part(root: Path, part: Path, transform: Transform = None) -> Path:
    """Incremental add: the live index plus one new part file's vectors, no retraining, as a new
    version. The added work is the part's encoding; rows continue after the largest existing row."""
    index, ids, _ = load_current(root)
    row0 = int(pc.max(ids.column("row")).as_py()) + 1 if ids.num_rows else 0
    new_ids, x = part_table(part, row0, transform)
    if x.shape[1] != index.d:
        raise InputError(f"{part}: vectors of dim {x.shape[1]} do not fit an index of dim {index.d}")
    if len(x):
        index.add_with_ids(x, new_ids.column("row").to_numpy())
    return save_version(root, index, pa.concat_tables([ids, new_ids]))


def remove_content_ids(root: Path, content_ids: list[str]) -> tuple[Path, int]:
    """Remove the vectors of these content ids from the live index, as a new version."""
    index, ids, _ = load_current(root)
    mask = pc.is_in(ids.column("id"), value_set=pa.array(content_ids, pa.string()))
    rows = ids.filter(mask).column("row").to_numpy()
    removed = ann.remove_ids(index, rows)
    return save_version(root, index, ids.filter(pc.invert(mask))), removed


def _keys(table: pa.Table) -> pa.Array:
    """path + NUL + content id per row: an input whose bytes changed gets a new key."""
    return pc.binary_join_element_wise(table.column("path"), table.column("id"), "\0").combine_chunks()


def store_keys(directory: Path) -> pa.Array:
    """``_keys`` of every row of a feature store, in store order (id and path columns only)."""
    tables = [read_part(p, ["id", "path"]) for p, _ in part_row_counts(directory)]
    return _keys(pa.concat_tables(tables)) if tables else pa.array([], pa.string())


def new_rows(root: Path, directory: Path) -> np.ndarray:
    """Store positions (store order) of the rows the live index of ``root`` does not hold."""
    _, ids, _ = load_current(root)
    return np.flatnonzero(
        ~pc.is_in(store_keys(directory), value_set=_keys(ids)).to_numpy(zero_copy_only=False)
    )


def update_store_index(
    root: Path, directory: Path, transform: Transform = None
) -> tuple[faiss.Index, pa.Table, int, int]:
    """Bring the live index of ``root`` up to date with the feature store, without retraining: remove
    the rows whose input is gone or changed, add the store rows it lacks (rows numbered on after the
    largest), and publish the result as a new version. Returns (index, ids, added, removed)."""
    index, ids, _ = load_current(root)
    current = store_keys(directory)
    gone = ~pc.is_in(_keys(ids), value_set=current).to_numpy(zero_copy_only=False)
    removed = ann.remove_ids(index, ids.column("row").to_numpy()[gone]) if gone.any() else 0
    kept = ids.filter(pa.array(~gone))
    held = _keys(kept)
    next_row = int(pc.max(ids.column("row")).as_py()) + 1 if ids.num_rows else 0
    added = [kept]
    for path, _ in part_row_counts(directory):
        keys = _keys(read_part(path, ["id", "path"]))  # vectors read only from parts with new rows
        fresh = ~pc.is_in(keys, value_set=held).to_numpy(zero_copy_only=False)
        if not fresh.any():
            continue
        table, x = part_table(path, 0, transform)
        rows = np.arange(next_row, next_row + int(fresh.sum()), dtype=np.int64)
        next_row += len(rows)
        index.add_with_ids(np.ascontiguousarray(x[fresh]), rows)
        added.append(table.filter(pa.array(fresh)).set_column(0, "row", pa.array(rows)))
    ids = pa.concat_tables(added)
    save_version(root, index, ids)
    return index, ids, ids.num_rows - kept.num_rows, removed


class StoreOrderIndex:
    """A live index whose ids are its stable rows, searched as though its ids were store positions
    (what evaluation needs after incremental updates). Has the few members ``ann.search`` and the
    evaluation read: ``search``, ``ntotal``, ``d``, ``metric_type``."""

    def __init__(self, index: faiss.Index, ids: pa.Table, directory: Path):
        position = {k: i for i, k in enumerate(store_keys(directory).to_pylist())}
        rows = ids.column("row").to_numpy()
        self.map = np.full(int(rows.max(initial=-1)) + 2, -1, np.int64)  # the last slot answers -1 pads
        self.map[rows] = [position[k] for k in _keys(ids).to_pylist()]
        self.index, self.ntotal, self.d, self.metric_type = index, index.ntotal, index.d, index.metric_type

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(x, k)
        return scores, self.map[rows]
