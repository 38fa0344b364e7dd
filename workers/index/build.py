"""Index engine: train once on a seeded sample of the feature store, fill one copy of the trained index
per part file as Ray tasks (one CPU each), merge them in part order (or, sharded, each task writes its
part's shard file itself), and keep versions on disk.

Row ids: the store's rows are numbered in store order (part by part); the FAISS id of a vector is its
row, and ``ids.parquet`` beside the index maps ``row`` -> content ``id`` -> ``path``. Incremental adds
continue the numbering; removals drop rows from both.

The files of a version folder in each layout (``index.layout``: merged, ondisk, sharded) are written and
read by ``storage.index_folder``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedpipe.storage import index_versions
from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.storage.contracts.layout import atomic_dir, write_error
from embedpipe.storage.features import part_row_counts, read_part, read_parts, read_store_manifest, vectors_of
from embedpipe.storage.index_folder import (
    IDS_FILE,
    INDEX_FILE,
    IVFDATA_FILE,
    SHARDS_DIR,
    TRAINED_FILE,
    empty_ids,
    index_layout,
    link_file,
    live_version,
    read_ids,
    read_index,
    read_shard,
    read_shards,
    read_version,
    save_version,
    shard_name,
    write_ids,
    write_shard,
    write_shards,
)
from embedpipe.workers.engines.dask_jobs import sample_store
from embedpipe.workers.engines.ray_index import map_parts, run_on_node
from embedpipe.workers.fit.whitening import apply_whitening
from embedpipe.workers.index import ann
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import FitConfig, IndexConfig

log = logging.getLogger("embedpipe.index")

Transform = tuple[np.ndarray, np.ndarray] | None  # PCA-whitening (mean (D,), proj (d, D)) or none


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
    from embedpipe.workers.engines.ray_stages import current_node

    faiss.omp_set_num_threads(1)  # one CPU per task
    out = fill_part(trained, path, row0, transform) if merge else gather_part(path, row0, transform)
    return *out, current_node()


def fill_shard(trained: np.ndarray, path: str, row0: int, transform: Transform, out: str) -> pa.Table:
    """One shard written where the part is read: a copy of the trained index filled with the part's
    vectors, written to ``out`` (a shard file of a version being written). Returns the part's ids."""
    ids, x = part_table(Path(path), row0, transform)
    write_shard(ann.fill(trained, x, ids.column("row").to_numpy()), Path(out))
    return ids


def _ray_fill_shard(trained: np.ndarray, path: str, row0: int, transform: Transform, out: str):
    """``fill_shard`` as a Ray task of one CPU; also returns the node id it ran on."""
    from embedpipe.workers.engines.ray_stages import current_node

    faiss.omp_set_num_threads(1)
    return fill_shard(trained, path, row0, transform, out), current_node()


def _recorded(result: tuple) -> tuple:
    """A ``_ray_fill`` result without its node id, which is counted on the session's ``NodeWork``."""
    from embedpipe.workers.engines.ray_stages import record_work

    *out, node = result
    record_work("index", [node])
    return tuple(out)


def train_on_store(
    directory: Path, cfg: IndexConfig, seed: int, transform: Transform, fit: FitConfig | None = None
) -> faiss.Index:
    """The empty index of ``cfg.factory`` trained on a seeded sample of ``cfg.train_size`` rows, drawn
    by a Dask job over the store's parts (``dask_jobs.sample_store``) on ``fit``'s scheduler (local
    threads without one). Index types that need no training (Flat, HNSW, …) read no sample."""
    if not sum(c for _, c in part_row_counts(directory)):
        raise RunFailed(f"feature store {directory} has no rows to train an index on")
    dim = int(transform[1].shape[0]) if transform is not None else int(read_store_manifest(directory)["dim"])
    if ann.make_index(cfg.factory, dim).is_trained:
        return ann.train_index(cfg.factory, np.empty((0, dim), np.float32), seed)
    scheduler, address = (fit.scheduler, fit.dask_address) if fit is not None else ("threads", None)
    include = fit.include_distractors if fit is not None else True
    sample = sample_store(directory, cfg.train_size, seed, scheduler, address, include)
    if transform is not None:
        sample = apply_whitening(sample, *transform)
    return ann.train_index(cfg.factory, sample, seed, cfg.two_level_nlist)


TASK_SAMPLE_MB = 64  # a training sample this large trains in a Ray task, not in the driver


def _trained(
    directory: Path,
    cfg: IndexConfig,
    seed: int,
    transform: Transform,
    fit: FitConfig | None,
    max_retries: int = 3,
) -> np.ndarray:
    """The empty index of ``cfg.factory`` trained on the store's sample, serialised. With engine 'ray'
    and a sample of ``TASK_SAMPLE_MB`` or more, in one Ray task on the CPUs of a node (``run_on_node``):
    the sample (1.3 GB for 1.3M rows of 256 dims) never comes to the driver. Otherwise in this process,
    where a small sample costs less than a task's start."""
    rows = min(cfg.train_size, sum(c for _, c in part_row_counts(directory)))
    sample_mb = rows * int(read_store_manifest(directory)["dim"]) * 4 / 2**20
    if cfg.engine == "ray" and sample_mb >= TASK_SAMPLE_MB:
        return run_on_node(_train_serialized, (rows, directory, cfg, seed, transform, fit), max_retries)
    return _train_serialized(0, rows, directory, cfg, seed, transform, fit)


def _train_serialized(
    threads: int,
    rows: int,
    directory: Path,
    cfg: IndexConfig,
    seed: int,
    transform: Transform,
    fit: FitConfig | None,
) -> np.ndarray:
    """``train_on_store`` serialised, on ``threads`` FAISS threads (0: as set); one thread when the
    sample (``rows``) is small (``ann.threads_for``)."""
    if threads:
        faiss.omp_set_num_threads(threads)
    with ann.threads_for(rows):
        return ann.serialize(train_on_store(directory, cfg, seed, transform, fit))


def build_store_index(
    directory: Path,
    cfg: IndexConfig,
    seed: int,
    transform: Transform = None,
    engine: str | None = None,
    fit: FitConfig | None = None,
) -> tuple[faiss.Index, pa.Table]:
    """Train once, fill one index per part file (Ray tasks, or in this process with engine 'local'),
    merge in part order. Returns the index and its ids table (row, id, path)."""
    engine = engine or cfg.engine
    start = time.perf_counter()
    trained = _trained(directory, cfg, seed, transform, fit)
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


def _parts(directory: Path) -> list[tuple[str, int, int]]:
    """(part file, its first row number, its rows) per part file of the store, in store order."""
    counts = part_row_counts(directory)
    row0s = np.concatenate([[0], np.cumsum([c for _, c in counts])])[:-1].tolist()
    return [(str(p), int(r), int(c)) for (p, c), r in zip(counts, row0s, strict=True)]


def _part_results(
    directory: Path, trained: np.ndarray, engine: str, transform: Transform, merge: bool, max_retries: int
) -> tuple[int, Iterator[tuple[np.ndarray, pa.Table]]]:
    """(number of parts, per part in part order: the filled copy of the trained index serialised, or
    with ``merge`` off its vectors, and its ids), as Ray tasks of one CPU each (engine 'ray'; a task
    whose worker dies is retried ``max_retries`` times) or in this process ('local')."""
    jobs = [(p, r) for p, r, _ in _parts(directory)]
    if engine == "ray":
        results = map_parts(_ray_fill, [(p, r, transform, merge) for p, r in jobs], trained, max_retries)
        return len(jobs), (_recorded(x) for x in results)  # in part order, each released once used
    # adds run on FAISS's own threads
    fill = fill_part if merge else gather_part
    args = (trained,) if merge else ()
    return len(jobs), (fill(*args, p, r, transform) for p, r in jobs)


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
    mergeable = ann.is_mergeable(ann.deserialize(trained))
    n_jobs, results = _part_results(directory, trained, engine, transform, mergeable, max_retries)
    progress = Progress(f"index {label}".rstrip(), n_jobs, log, unit="parts")
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
    return index, pa.concat_tables(tables) if tables else empty_ids()


def fill_parts(
    directory: Path, trained: np.ndarray, engine: str, transform: Transform = None, label: str = ""
) -> list[tuple[faiss.Index, pa.Table]]:
    """(filled copy of the trained index, its ids) per non-empty part file in part order, not merged
    (HNSW too: one graph per part)."""
    n_jobs, results = _part_results(directory, trained, engine, transform, True, 3)
    progress = Progress(f"index {label}".rstrip(), n_jobs, log, unit="parts")
    parts = []
    for blob, ids in results:
        if ids.num_rows:
            parts.append((ann.deserialize(blob), ids))
        progress.update(1)
    progress.finish()
    return parts


def publish_shards(
    root: Path,
    directory: Path,
    trained: np.ndarray,
    engine: str,
    transform: Transform = None,
    label: str = "",
    max_retries: int = 3,
) -> Path:
    """A new sharded version under ``root`` (published), one shard per non-empty part file: each part's
    task (Ray, or in this process with engine 'local') fills a copy of the trained index and writes it
    as the version's shard file itself; only the part's ids come back, appended to ``ids.parquet`` as
    they arrive. The driver holds one part's ids at a time, never a shard."""
    filled = [part for part in _parts(directory) if part[2]]
    version = index_versions.new_version(root)
    with atomic_dir(version):  # a version that could not be written whole is removed, never published
        (version / SHARDS_DIR).mkdir()
        files = [str(version / SHARDS_DIR / shard_name(i)) for i in range(len(filled))]
        jobs = [(p, r, transform, f) for (p, r, _), f in zip(filled, files, strict=True)]
        if engine == "ray":
            results = (_recorded(x)[0] for x in map_parts(_ray_fill_shard, jobs, trained, max_retries))
        else:
            results = (fill_shard(trained, *job) for job in jobs)
        progress = Progress(f"index {label}".rstrip(), len(jobs), log, unit="parts")
        writer = None
        try:
            for ids in results:
                writer = writer or pq.ParquetWriter(version / IDS_FILE, ids.schema)
                writer.write_table(ids)
                progress.update(1)
        finally:
            if writer is not None:
                writer.close()
        progress.finish()
        if writer is None:
            write_ids(version, empty_ids())
        shards = [{"file": shard_name(i), "rows": [r, r + c]} for i, (_, r, c) in enumerate(filled)]
        empty = ann.deserialize(trained)
        if not shards:  # an empty store: one empty shard
            shards = [{"file": shard_name(0), "rows": [0, 0]}]
            write_shard(empty, version / SHARDS_DIR / shards[0]["file"])
        write_shards(version, empty, shards, [])
    index_versions.publish(root, version)
    return version


def save_layout(
    root: Path, parts: list[tuple[faiss.Index, pa.Table]], trained: np.ndarray, layout: str
) -> Path:
    """Write filled shard indices (``fill_parts``) as a new version under ``root`` in ``layout``
    (merged, ondisk or sharded) and switch CURRENT to it."""
    empty = ann.deserialize(trained)
    if layout == "ondisk" and ann._ivf(empty) is None:
        raise InputError(ann.ONDISK_NEEDS_IVF)
    indices = [p for p, _ in parts]
    if layout == "ondisk" and not sum(p.ntotal for p in indices):
        raise RunFailed("index.layout 'ondisk': no vectors to put on disk (the store is empty)")
    ids = pa.concat_tables([t for _, t in parts]) if parts else empty_ids()
    if layout == "merged":
        return save_version(root, ann.merge(indices) if indices else empty, ids)
    version = index_versions.new_version(root)
    with atomic_dir(version):  # a version that could not be written whole is removed, never published
        if layout == "ondisk":
            ann.write_ondisk(indices or [empty], version / INDEX_FILE, version / IVFDATA_FILE)
        else:
            spans = [
                [int(pc.min(t.column("row")).as_py()), int(pc.max(t.column("row")).as_py()) + 1]
                for _, t in parts
            ]
            shards = [{"file": shard_name(i), "rows": span} for i, span in enumerate(spans or [[0, 0]])]
            write_shards(version, empty, shards, indices or [empty])
        write_ids(version, ids)
    index_versions.publish(root, version)
    return version


def publish_store_index(
    root: Path,
    directory: Path,
    cfg: IndexConfig,
    seed: int,
    transform: Transform = None,
    fit: FitConfig | None = None,
    load: bool = True,
) -> tuple[faiss.Index | None, pa.Table | None, Path]:
    """Train once, fill one index per part file, write them as a new version in ``cfg.layout`` and
    return the live index as searched (merged, on-disk lists or shards), its ids and its version;
    without ``load``, a sharded or on-disk index is not read back (None, None, version)."""
    if cfg.layout == "merged":
        index, ids = build_store_index(directory, cfg, seed, transform, fit=fit)
        return index, ids, save_version(root, index, ids)
    start = time.perf_counter()
    trained = _trained(directory, cfg, seed, transform, fit)
    if cfg.layout == "sharded":
        version = publish_shards(root, directory, trained, cfg.engine, transform, cfg.factory)
    else:
        parts = fill_parts(directory, trained, cfg.engine, transform, cfg.factory)
        version = save_layout(root, parts, trained, cfg.layout)
        del parts  # the shards in memory: the live index is read back from the version
    n = sum(c for _, c in part_row_counts(directory))
    log.info("index %s (%s): %d vectors in %.2fs", cfg.factory, cfg.layout, n, time.perf_counter() - start)
    if not load:
        return None, None, version
    index, ids, _ = load_current(root, cfg)
    return index, ids, version


def load_current(root: Path, cfg: IndexConfig | None = None) -> tuple[faiss.Index, pa.Table, Path]:
    """The live index, its ids table and its version folder."""
    version = live_version(root)
    index = read_version(version)
    if cfg is not None:
        ann.set_search_params(index, cfg.nprobe, cfg.efsearch)
    return index, read_ids(version), version


def _next_sharded(
    root: Path, version: Path, ids: pa.Table, gone: np.ndarray, x: np.ndarray, rows: np.ndarray
) -> tuple[Path, int]:
    """A new version of a sharded index: the shards holding ``gone`` rows rewritten without them, the
    others hard-linked unchanged, and ``x`` (n, d) added under ``rows`` as one new shard filled from
    the trained empty index. The work is the new shard and the touched ones, not the whole index.
    Returns the version (published with ``ids``) and the number of vectors removed."""
    shards, removed = read_shards(version), 0
    out = index_versions.new_version(root)
    try:
        (out / SHARDS_DIR).mkdir()
        link_file(version / TRAINED_FILE, out / TRAINED_FILE)
        trained = read_index(out / TRAINED_FILE)
        kept, parts = [], []
        for entry in shards:
            lo, hi = entry["rows"]
            hit = gone[(gone >= lo) & (gone < hi)]
            src = version / SHARDS_DIR / entry["file"]
            if not hit.size:
                link_file(src, out / SHARDS_DIR / entry["file"])
                kept.append(entry)
                continue
            part = read_shard(src, trained)
            removed += ann.remove_ids(part, hit)
            if part.ntotal:
                write_shard(part, out / SHARDS_DIR / entry["file"])
                kept.append(entry)
        if len(x) or not kept:
            number = 1 + max((int(s["file"][6:11]) for s in shards), default=-1)
            parts = [ann.fill(ann.serialize(trained), x, rows)] if len(x) else [trained]
            span = [int(rows.min()), int(rows.max()) + 1] if len(x) else [0, 0]
            kept.append({"file": shard_name(number), "rows": span})
        write_shards(out, trained, kept, parts)
        write_ids(out, ids)
    except BaseException as err:
        shutil.rmtree(out, ignore_errors=True)  # never published
        if isinstance(err, OSError):
            raise write_error(out, err) from err
        raise
    index_versions.publish(root, out)
    return out, removed


def _updatable(version: Path) -> str:
    layout = index_layout(version)
    if layout == "ondisk":
        raise InputError(
            "index.layout 'ondisk': the on-disk lists are written once per build; incremental adds and "
            "removals need layout 'merged' or 'sharded' (the index is rebuilt)"
        )
    return layout


def add_part(root: Path, part: Path, transform: Transform = None) -> Path:
    """Incremental add: the live index plus one new part file's vectors, no retraining, as a new
    version. The added work is the part's encoding; rows continue after the largest existing row
    (layout 'sharded': the part becomes a new shard and the other shard files are linked, not read)."""
    version = live_version(root)
    ids = read_ids(version)
    row0 = int(pc.max(ids.column("row")).as_py()) + 1 if ids.num_rows else 0
    new_ids, x = part_table(part, row0, transform)
    if _updatable(version) == "sharded":
        dim = read_index(version / TRAINED_FILE).d
    else:
        index = read_version(version)
        dim = index.d
    if x.shape[1] != dim:
        raise InputError(f"{part}: vectors of dim {x.shape[1]} do not fit an index of dim {dim}")
    all_ids = pa.concat_tables([ids, new_ids])
    if index_layout(version) == "sharded":
        rows = new_ids.column("row").to_numpy()
        return _next_sharded(root, version, all_ids, np.empty(0, np.int64), x, rows)[0]
    if len(x):
        index.add_with_ids(x, new_ids.column("row").to_numpy())
    return save_version(root, index, all_ids)


def remove_content_ids(root: Path, content_ids: list[str]) -> tuple[Path, int]:
    """Remove the vectors of these content ids from the live index, as a new version."""
    version = live_version(root)
    ids = read_ids(version)
    mask = pc.is_in(ids.column("id"), value_set=pa.array(content_ids, pa.string()))
    rows = ids.filter(mask).column("row").to_numpy()
    kept = ids.filter(pc.invert(mask))
    if _updatable(version) == "sharded":
        return _next_sharded(root, version, kept, rows, np.empty((0, 0), np.float32), np.empty(0, np.int64))
    index = read_version(version)
    removed = ann.remove_ids(index, rows)
    return save_version(root, index, kept), removed


def input_keys(table: pa.Table) -> pa.Array:
    """path + NUL + content id per row: an input whose bytes changed gets a new key."""
    return pc.binary_join_element_wise(table.column("path"), table.column("id"), "\0").combine_chunks()


def store_keys(directory: Path) -> pa.Array:
    """``input_keys`` of every row of a feature store, in store order (id and path columns only)."""
    table = read_parts(directory, ["id", "path"])
    return input_keys(table) if table is not None else pa.array([], pa.string())


def new_rows(root: Path, directory: Path) -> np.ndarray:
    """Store positions (store order) of the rows the live index of ``root`` does not hold."""
    ids = read_ids(live_version(root))
    return np.flatnonzero(
        ~pc.is_in(store_keys(directory), value_set=input_keys(ids)).to_numpy(zero_copy_only=False)
    )


def update_store_index(
    root: Path, directory: Path, transform: Transform = None
) -> tuple[faiss.Index, pa.Table, int, int]:
    """Bring the live index of ``root`` up to date with the feature store, without retraining: remove
    the rows whose input is gone or changed, add the store rows it lacks (rows numbered on after the
    largest; layout 'sharded': as one new shard), and publish the result as a new version. Returns
    (index, ids, added, removed). Layout 'ondisk' cannot be updated (InputError)."""
    version = live_version(root)
    layout = _updatable(version)
    ids = read_ids(version)
    current = store_keys(directory)
    gone = ~pc.is_in(input_keys(ids), value_set=current).to_numpy(zero_copy_only=False)
    gone_rows = ids.column("row").to_numpy()[gone]
    kept = ids.filter(pa.array(~gone))
    held = input_keys(kept)
    next_row = int(pc.max(ids.column("row")).as_py()) + 1 if ids.num_rows else 0
    tables, blocks = [kept], []
    fresh_rows = ~pc.is_in(current, value_set=held).to_numpy(zero_copy_only=False)
    start = 0
    for path, n in part_row_counts(directory):  # vectors read only from parts with new rows
        fresh, start = fresh_rows[start : start + n], start + n
        if not fresh.any():
            continue
        table, x = part_table(path, 0, transform)
        rows = np.arange(next_row, next_row + int(fresh.sum()), dtype=np.int64)
        next_row += len(rows)
        blocks.append(np.ascontiguousarray(x[fresh]))
        tables.append(table.filter(pa.array(fresh)).set_column(0, "row", pa.array(rows)))
    new_ids = pa.concat_tables(tables)
    added = new_ids.num_rows - kept.num_rows
    if layout == "sharded":
        x = np.concatenate(blocks) if blocks else np.empty((0, 0), np.float32)
        rows = new_ids.column("row").to_numpy()[kept.num_rows :]
        out, removed = _next_sharded(root, version, new_ids, gone_rows, x, rows)
        return read_version(out), new_ids, added, removed
    index = read_version(version)
    removed = ann.remove_ids(index, gone_rows) if gone.any() else 0
    for x, table in zip(blocks, tables[1:], strict=True):
        index.add_with_ids(x, table.column("row").to_numpy())
    save_version(root, index, new_ids)
    return index, new_ids, added, removed


class StoreOrderIndex:
    """A live index whose ids are its stable rows, searched as though its ids were store positions
    (what evaluation needs after incremental updates). Has the few members ``ann.search`` and the
    evaluation read: ``search``, ``ntotal``, ``d``, ``metric_type``."""

    def __init__(self, index: faiss.Index, ids: pa.Table, directory: Path):
        position = {k: i for i, k in enumerate(store_keys(directory).to_pylist())}
        rows = ids.column("row").to_numpy()
        self.map = np.full(int(rows.max(initial=-1)) + 2, -1, np.int64)  # the last slot answers -1 pads
        self.map[rows] = [position[k] for k in input_keys(ids).to_pylist()]
        self.index, self.ntotal, self.d, self.metric_type = index, index.ntotal, index.d, index.metric_type

    def search(
        self, x: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by store position; ``allowed``: store positions to search among (see ``ann.search``)."""
        if allowed is None:
            scores, rows = self.index.search(x, k)
        else:
            scores, rows = ann.search(self.index, x, k, np.flatnonzero(np.isin(self.map[:-1], allowed)))
        return scores, self.map[rows]
