"""The database side of evaluation where it lies: store rows read by position as they are needed, and a
sharded index searched one Ray task per shard file, each returning its top-k, merged exactly.

Evaluation brings query vectors (and the few database rows that re-ranking adds to them) to the
driver, never the whole store; a sharded index is searched without loading its shards in the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from embedpipe.storage.features import part_row_counts, read_part, vectors_of
from embedpipe.storage.index_folder import (
    IDS_FILE,
    SHARDS_DIR,
    TRAINED_FILE,
    read_index,
    read_shard,
    read_shards,
)
from embedpipe.workers.engines.ray_index import map_parts
from embedpipe.workers.fit.whitening import apply_whitening
from embedpipe.workers.index import ann

log = logging.getLogger("embedpipe.evaluate")
Transform = tuple[np.ndarray, np.ndarray] | None


class StoreParts:
    """A feature store's parts and the store position each starts at (from the Parquet footers), to
    read rows by position: only the parts that hold them, each once."""

    def __init__(self, directory: Path):
        counts = part_row_counts(directory)
        self.directory = Path(directory)
        self.parts = [p for p, _ in counts]
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in counts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def by_part(self, flat: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(part number, where in ``flat``) for each part that holds some of the store positions ``flat``."""
        part = np.searchsorted(self.starts, flat, side="right") - 1
        for i in np.unique(part):
            yield int(i), np.flatnonzero(part == i)


class StoreRows(StoreParts):
    """A feature store's vectors (after ``transform``, the variant's PCA-whitening) read by store
    position when asked: ``rows[positions]`` reads only the parts that hold them, each part
    transformed whole, as the index fill transforms it. ``all()`` reads everything once, for the steps
    that need the whole database (DBA computed in this process, few-shot classification)."""

    def __init__(self, directory: Path, transform: Transform, dim: int):
        super().__init__(directory)
        self.transform, self.dim = transform, dim
        self._all: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def part(self, i: int) -> np.ndarray:
        """Part ``i``'s rows, transformed whole (as the index fill transforms them)."""
        x = vectors_of(read_part(self.parts[i], ["descriptor"]))
        if not len(x):  # a part of only quarantined inputs
            return np.empty((0, self.dim), np.float32)
        return apply_whitening(x, *self.transform) if self.transform is not None else x

    def all(self) -> np.ndarray:
        if self._all is None:
            blocks = [self.part(i) for i in range(len(self.parts))]
            self._all = np.concatenate(blocks) if blocks else np.empty((0, self.dim), np.float32)
        return self._all

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        if self._all is not None:
            return self._all[positions]
        return self.take(positions)

    def take(self, positions: np.ndarray, known: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        """The rows at ``positions`` (any shape) -> (*shape, dim), each part that holds some read once,
        one at a time; ``known``: parts already read or mapped (part number -> its rows), not read
        from the store."""
        positions = np.asarray(positions, np.int64)
        flat = positions.reshape(-1)
        out = np.empty((len(flat), self.dim), np.float32)
        for i, where in self.by_part(flat):
            block = known[i] if known and i in known else self.part(i)
            out[where] = block[flat[where] - self.starts[i]]
        return out.reshape(*positions.shape, self.dim)


def padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's top lists widened to k columns (a shard smaller than k): pads (NaN, -1) last."""
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


def search_shard_file(
    path: str, queries: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int, efsearch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One shard file read and searched: its top-k (scores, ids) per query (exact ties by smaller id),
    padded to k."""
    index = read_shard(Path(path))
    ann.set_search_params(index, nprobe, efsearch)
    limit = index.ntotal if allowed is None else len(allowed)

    def top(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return ann.search(index, queries[rows], kk, allowed)

    return padded(*ranked_topk(top, len(queries), k, limit, index.metric_type), k)


Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def ranked_topk(search: Search, n: int, k: int, limit: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """One index's top-k in the order ``merge_topk`` ranks (best score first, exact ties by smaller id),
    not in the order of FAISS's heap, which keeps whichever tied candidate it met first.
    ``search(rows, kk)`` gives the top kk of the queries at ``rows`` (of ``n``); ``limit``: how many
    candidates the index holds. Searched for k + 1, then again with twice as many for the queries
    whose last score still equals their k-th, until it does not or every candidate was returned."""
    k = min(k, limit)
    kk = min(k + 1, limit)
    scores, ids = padded(*search(np.arange(n), kk), kk)
    best_scores, best_ids = merge_topk([(scores, ids)], k, metric)
    tied = _still_tied(scores, ids, k, kk, limit)
    while len(tied):
        kk = min(2 * kk, limit)
        scores, ids = padded(*search(tied, kk), kk)
        best_scores[tied], best_ids[tied] = merge_topk([(scores, ids)], k, metric)
        tied = tied[_still_tied(scores, ids, k, kk, limit)]
    return best_scores, best_ids


def _still_tied(scores: np.ndarray, ids: np.ndarray, k: int, kk: int, limit: int) -> np.ndarray:
    """Rows whose kk-th candidate scores as their k-th (more candidates may tie it)."""
    if k == 0 or kk <= k or kk >= limit:
        return np.empty(0, np.int64)
    return np.flatnonzero((ids[:, kk - 1] >= 0) & (scores[:, kk - 1] == scores[:, k - 1]))


def _search_shard(shared: tuple, path: str) -> tuple[np.ndarray, np.ndarray]:
    """One shard file searched as a Ray task of one CPU: its top-k (scores, ids) per query."""
    queries, k, allowed, nprobe, efsearch = shared
    faiss.omp_set_num_threads(1)
    return search_shard_file(path, queries, k, allowed, nprobe, efsearch)


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of per-shard top-k lists: best score first (largest inner product, smallest
    distance), ties by smaller id, pads (-1) last. Each element: (scores (n, k'), ids (n, k'))."""
    sign = 1.0 if metric == faiss.METRIC_INNER_PRODUCT else -1.0
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1).astype(np.int64)
    valid = ids >= 0
    key = np.where(valid, scores * sign, -np.inf)
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), -key), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ShardedIndex:
    """A sharded index version searched where it lies: ``search`` sends the queries to one Ray task per
    shard file (tasks retried when their worker dies) and merges their top-k exactly as they come back
    (the driver holds the merged (queries, k) lists and one shard's, whatever the shards). Has what
    ``ann.search`` and the evaluation read: ``search``, ``ntotal``, ``d``, ``metric_type``, and the
    trained empty index (``trained``) for the code size."""

    def __init__(self, version: Path, nprobe: int, efsearch: int, max_retries: int = 3):
        self.version = version
        self.files = [str(version / SHARDS_DIR / s["file"]) for s in read_shards(version)]
        self.trained = read_index(version / TRAINED_FILE)
        self.d, self.metric_type = int(self.trained.d), int(self.trained.metric_type)
        self.ntotal = int(pq.ParquetFile(version / IDS_FILE).metadata.num_rows)
        self.nprobe, self.efsearch, self.max_retries = nprobe, efsearch, max_retries

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.ntotal if allowed is None else len(allowed))
        shared = (np.ascontiguousarray(queries, np.float32), k, allowed, self.nprobe, self.efsearch)
        merged: list[tuple[np.ndarray, np.ndarray]] = []
        for part in map_parts(_search_shard, [(f,) for f in self.files], shared, self.max_retries):
            merged = [merge_topk([*merged, part], k, self.metric_type)]  # (queries, k) held, not per shard
        return merged[0]
