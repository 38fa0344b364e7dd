"""DBA where the database lies: one Ray task per store part searches that part's rows against the shard
files of the variant's sharded index, augments them with their neighbours' vectors (read by position
from the transformed rows, written once per part and mapped) and writes them as a part of a derived
store; the augmented index is then trained and filled from those parts like any index
(``publish_store_index``: one Ray task per part).

The driver holds the part names, never the vectors nor the neighbour lists: each augmented part keeps
its rows' lists beside the vectors (``dba_ids``, ``dba_sims``). Under ``index/<variant>/dba/``:
``parts/`` (the derived store), ``rows/`` (the transformed rows as ``.npy``) and ``groups/`` (an inverted
file's shards merged into groups, each one index file), both while parts are still to be written,
``dba.json`` (what the parts were computed from: a part already written for the same
inputs is kept when the stage runs again) and the augmented index's versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.storage import index_versions
from embedpipe.storage.contracts.layout import atomic_path, write_json_atomic
from embedpipe.storage.features import MANIFEST, read_part, read_store_manifest
from embedpipe.storage.index_folder import TRAINED_FILE, merge_shard, read_index, write_index
from embedpipe.workers.engines.ray_index import map_parts
from embedpipe.workers.evaluate.rerank import dba
from embedpipe.workers.evaluate.search import (
    ShardedIndex,
    StoreRows,
    Transform,
    merge_topk,
    padded,
    ranked_topk,
    search_shard_file,
)
from embedpipe.workers.index.ann import set_quantizer_search
from embedpipe.workers.index.build import publish_store_index
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.evaluate")
DBA_DIR, PARTS_DIR, ROWS_DIR, GROUPS_DIR, STATE_FILE = "dba", "parts", "rows", "groups", "dba.json"


@dataclass(frozen=True)
class DbaJob:
    """What every part's task shares (put in the object store once): the store and the variant's
    transform, the index's shard files and trained empty index, DBA's parameters, the derived store's
    folder (``out``), the mapped rows' (``rows``) and, for an inverted file, the merged shard groups'
    files (``groups``: one index file per group of ``shard_groups``, written once by ``write_group``;
    none for other indices)."""

    store: str
    transform: Transform
    dim: int
    shards: tuple[str, ...]
    trained: str
    k: int
    alpha: float
    nprobe: int
    efsearch: int
    metric: int
    out: str
    rows: str
    groups: tuple[str, ...]


def part_lists(job: DbaJob, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact merge of every shard's top-k for ``queries`` (what ``ShardedIndex.search`` gives).
    An inverted file's shards are merged into groups of at most ``rerank.dba_group_mb`` MB
    (``job.groups``, written once by ``write_group``), each read whole and searched once with the
    coarse assignment computed once (with the trained quantiser every shard was filled from): a query's
    probed lists are scanned once per group, not once per shard, so a part's work does not grow with
    the number of shards. Other indices: the shards read one at a time."""
    trained = read_index(Path(job.trained))  # FAISS reads an index back as its own class
    if not isinstance(trained, faiss.IndexIVF):
        lists = [search_shard_file(p, queries, job.k, None, job.nprobe, job.efsearch) for p in job.shards]
        return merge_topk(lists, job.k, job.metric)
    nprobe = trained.nprobe = min(job.nprobe, trained.nlist)
    set_quantizer_search(trained, job.efsearch)  # as the sharded search probes (an HNSW quantiser)
    coarse, assigned = trained.quantizer.search(queries, nprobe)
    lists = []
    for group in job.groups:
        index = read_index(Path(group))
        index.nprobe = nprobe

        def search(rows: np.ndarray, kk: int, index: faiss.IndexIVF = index) -> tuple[np.ndarray, np.ndarray]:
            return index.search_preassigned(queries[rows], kk, assigned[rows], coarse[rows])

        lists.append(padded(*ranked_topk(search, len(queries), job.k, index.ntotal, job.metric), job.k))
        del index
    return merge_topk(lists, job.k, job.metric)


def write_group(job: DbaJob, target: str, files: tuple[str, ...]) -> str:
    """One group of ``shard_groups`` merged once (a Ray task): a copy of the trained index with the
    lists of the shard files ``files`` appended in order, written to ``target`` (one of ``job.groups``),
    which every part's task then reads whole instead of merging the group's shard files itself: one
    read per task instead of one per shard (at 10M rows, 200 shard files of 32,768 lists each). Kept
    when already written. Returns ``target``."""
    if not Path(target).is_file():
        index = read_index(Path(job.trained))
        for path in files:
            merge_shard(index, Path(path))
        write_index(index, Path(target))
    return target


def shard_groups(files: Sequence[str], group_mb: float) -> list[list[str]]:
    """Consecutive shard files in groups of at most ``group_mb`` MB on disk (a larger file alone)."""
    groups: list[list[str]] = []
    size = 0
    for path in files:
        mb = os.path.getsize(path) / 2**20
        if not groups or size + mb > group_mb:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += mb
    return groups


class MappedParts(Mapping[int, np.ndarray]):
    """Part number -> that part's transformed rows (``StoreRows.take``'s ``known``), memory-mapped from
    the ``.npy`` files ``write_rows`` wrote, each when asked: taking a few rows touches their pages, not
    the part."""

    def __init__(self, directory: Path, parts: Sequence[Path]):
        self.files = [directory / f"{Path(p).stem}.npy" for p in parts]

    def __getitem__(self, part: int) -> np.ndarray:
        return np.load(self.files[part], mmap_mode="r")

    def __contains__(self, part: object) -> bool:
        return isinstance(part, int) and 0 <= part < len(self.files)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.files)))

    def __len__(self) -> int:
        return len(self.files)


def write_rows(job: DbaJob, part: int) -> int:
    """One store part's rows, transformed as the variant's index holds them, written once as a raw
    ``.npy`` under ``rows/`` (kept while a run's DBA parts are not all written). The part tasks map these
    files to read their rows' neighbours: each task reads the pages of its neighbours, not every part
    of the store whole. Returns the part's rows."""
    rows = StoreRows(Path(job.store), job.transform, job.dim)
    target = MappedParts(Path(job.rows), rows.parts).files[part]
    if target.is_file():
        return int(rows.starts[part + 1] - rows.starts[part])
    x = rows.part(part)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, x)
    return len(x)


def dba_part(job: DbaJob, part: int) -> int:
    """One store part as a Ray task of one CPU: its rows' ``k`` nearest database rows (themselves
    included), their DBA vectors from those neighbours' vectors (its rows and theirs read from the
    mapped rows, the store part itself only for its ids and paths),
    written as the derived store's part of the same name. Returns the part's rows."""
    faiss.omp_set_num_threads(1)
    rows = StoreRows(Path(job.store), job.transform, job.dim)
    source = rows.parts[part]
    mapped = MappedParts(Path(job.rows), rows.parts)
    x = np.array(mapped[part])  # this part's rows as ``write_rows`` transformed them, in memory
    sims, idx = part_lists(job, x) if len(x) else (np.empty((0, job.k), np.float32), np.empty((0, job.k)))
    idx = idx.astype(np.int64)
    used = np.unique(idx[idx >= 0])  # the neighbours' rows, read once each
    local = np.where(idx >= 0, np.searchsorted(used, np.maximum(idx, 0)), -1)
    vectors = rows.take(used, mapped)
    if job.metric != faiss.METRIC_INNER_PRODUCT and len(x):  # distances: DBA weighs by similarity
        sims = np.einsum("nd,nkd->nk", x, vectors[np.maximum(local, 0)])
        sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
    augmented = dba(vectors, sims, local, job.alpha) if len(x) else x
    table = read_part(source, ["id", "path"])
    table = table.append_column("descriptor", _fixed(augmented.astype(np.float32), job.dim))
    table = table.append_column("dba_ids", _fixed(idx, job.k))
    table = table.append_column("dba_sims", _fixed(sims.astype(np.float32), job.k))
    with atomic_path(Path(job.out) / source.name) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return len(x)


def _fixed(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), width)


def read_lists(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every row's neighbour list (similarities, store positions) from an augmented store, in store
    order (for tests and inspection: evaluation never gathers them)."""
    tables = [pq.read_table(p, columns=["dba_sims", "dba_ids"]) for p in StoreRows(directory, None, 0).parts]
    sims = [t.column("dba_sims").combine_chunks() for t in tables]
    ids = [t.column("dba_ids").combine_chunks() for t in tables]
    k = (sims[0].type.list_size) if sims else 0
    return (
        np.concatenate([s.values.to_numpy().reshape(-1, k) for s in sims]),
        np.concatenate([i.values.to_numpy().reshape(-1, k) for i in ids]),
    )


def _fingerprint(rows: StoreRows, index: ShardedIndex, k: int, alpha: float, nprobe: int) -> str:
    """What a part's output depends on: the store's part files, the transform, the index's files and
    search parameters, DBA's k and α."""
    h = hashlib.sha256()
    for path in rows.parts:
        st = Path(path).stat()
        h.update(f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns};".encode())
    if rows.transform is not None:
        for array in rows.transform:
            h.update(np.ascontiguousarray(array).tobytes())
    for path in (*index.files, str(index.version / TRAINED_FILE)):
        h.update(f"{Path(path).name}:{Path(path).stat().st_size};".encode())
    h.update(f"{k}:{alpha!r}:{nprobe}:{index.efsearch}:{index.metric_type}".encode())
    return h.hexdigest()


def _group_files(directory: Path, index: ShardedIndex, group_mb: float) -> list[tuple[str, tuple[str, ...]]]:
    """Each merged shard group of an inverted file (none for other indices): where ``write_group``
    writes it and its shard files. The files lie under a folder named by the groups' shard files, so
    groups cut differently (another ``rerank.dba_group_mb``) are never read for these."""
    if not isinstance(index.trained, faiss.IndexIVF):
        return []
    groups = shard_groups(index.files, group_mb)
    name = hashlib.sha256(json.dumps([[Path(f).name for f in g] for g in groups]).encode()).hexdigest()[:16]
    return [(str(directory / name / f"group-{g:05d}.faiss"), tuple(files)) for g, files in enumerate(groups)]


def read_state(root: Path) -> dict:
    """``dba.json`` of a variant's DBA folder: the parts' fingerprint and, once the DBA index is
    published, the seconds of the last run's part tasks and index build ({} when absent)."""
    try:
        return json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def augment_sharded(
    root: Path, cfg: Config, rows: StoreRows, index: ShardedIndex
) -> tuple[StoreRows, ShardedIndex]:
    """DBA of a variant searched as a sharded index (``index``, its rows read by ``rows``): the
    augmented parts written under ``root`` (``index/<variant>/dba``) by one Ray task per store part
    (those already written for the same inputs kept), then the augmented index published beside them
    in ``cfg.index``'s layout and factory. Returns the augmented rows and their sharded index."""
    k = min(cfg.rerank.dba_k + 1, index.ntotal)
    nprobe = cfg.rerank.dba_nprobe or index.nprobe
    parts_dir = root / PARTS_DIR
    fingerprint = _fingerprint(rows, index, k, cfg.rerank.dba_alpha, nprobe)
    if read_state(root).get("fingerprint") != fingerprint:
        shutil.rmtree(parts_dir, ignore_errors=True)
        shutil.rmtree(root / ROWS_DIR, ignore_errors=True)
        shutil.rmtree(root / GROUPS_DIR, ignore_errors=True)
        parts_dir.mkdir(parents=True)
        write_json_atomic(root / STATE_FILE, {"fingerprint": fingerprint})
    groups = _group_files(root / GROUPS_DIR, index, cfg.rerank.dba_group_mb)
    job = DbaJob(
        store=str(rows.directory),
        transform=rows.transform,
        dim=rows.dim,
        shards=tuple(index.files),
        trained=str(index.version / TRAINED_FILE),
        k=k,
        alpha=cfg.rerank.dba_alpha,
        nprobe=nprobe,
        efsearch=index.efsearch,
        metric=index.metric_type,
        out=str(parts_dir),
        rows=str(root / ROWS_DIR),
        groups=tuple(target for target, _ in groups),
    )
    todo = [i for i, p in enumerate(rows.parts) if not (parts_dir / Path(p).name).is_file()]
    start = time.perf_counter()
    if todo:
        every = [(i,) for i in range(len(rows.parts))]
        for _ in map_parts(write_rows, every, job, cfg.ray.max_retries):
            pass
        for _ in map_parts(write_group, groups, job, cfg.ray.max_retries):
            pass
    progress = Progress("dba", len(todo), log, unit="parts")
    for _ in map_parts(dba_part, [(i,) for i in todo], job, cfg.ray.max_retries):
        progress.update(1)
    progress.finish()
    shutil.rmtree(root / ROWS_DIR, ignore_errors=True)  # every part written: the mapped rows are done
    shutil.rmtree(root / GROUPS_DIR, ignore_errors=True)  # and the merged groups
    kept = len(rows.parts) - len(todo)
    parts_s = time.perf_counter() - start
    log.info("dba: %d part(s) augmented in %.1fs, %d kept from an earlier run", len(todo), parts_s, kept)
    write_json_atomic(parts_dir / MANIFEST, {"dim": rows.dim, "rows": len(rows), "n_parts": len(rows.parts)})
    start = time.perf_counter()
    _, _, version = publish_store_index(root, parts_dir, cfg.index, cfg.seed, None, cfg.fit, load=False)
    for old in index_versions.versions(root)[:-1]:  # only the live augmented index is kept
        shutil.rmtree(old, ignore_errors=True)
    index_s = time.perf_counter() - start
    seconds = {"parts": round(parts_s, 3), "index": round(index_s, 3), "parts_run": len(todo)}
    write_json_atomic(root / STATE_FILE, {"fingerprint": fingerprint, "seconds": seconds})
    augmented = ShardedIndex(version, cfg.index.nprobe, cfg.index.efsearch, cfg.ray.max_retries)
    return StoreRows(parts_dir, None, int(read_store_manifest(parts_dir)["dim"])), augmented
