"""What evaluation needs of a store's rows besides their vectors: the protocol's ground truth, which rows
are the collection's and which distractors (and the order the distractor curve adds them in), and paths
by position. Read a part at a time: the driver holds the rows the protocol may name and a position per
collection row, never the id and path columns of the whole store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.storage.dataset import labels_by_key
from embedpipe.storage.features import part_files, read_part
from embedpipe.storage.inputs import DISTRACTOR_PREFIX
from embedpipe.workers.evaluate.protocols import (
    BENCHMARK_PROTOCOLS,
    GroundTruth,
    PathColumn,
    benchmark_layout,
    flags,
    ground_truth,
    named_rows,
    on_positions,
    string_column,
)
from embedpipe.workers.evaluate.search import StoreParts
from embedpipe.workers.ingest.inputs import ground_truth_path

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.contracts.layout import RunLayout


def distractor_flags(paths: PathColumn) -> np.ndarray:
    """Whether each row of the Arrow ``path`` column is a distractor (``distractor:``)."""
    return flags(pc.starts_with(paths, DISTRACTOR_PREFIX))


class _NamedRows:
    """The collection rows a run's protocol may name (see ``named_rows``), gathered a part at a time
    with their store positions; distractors are never queries or positives."""

    def __init__(self, layout: RunLayout, cfg: Config):
        self.protocol = cfg.protocol
        images = cfg.images
        self.root = str(Path(images).resolve()) if images and Path(images).is_dir() else None
        self.bench = None
        if cfg.protocol in BENCHMARK_PROTOCOLS:
            self.bench = benchmark_layout(cfg.protocol, str(ground_truth_path(cfg)))
        self.known = labels_by_key(layout.dataset) if cfg.protocol == "labels" else None
        self.positions: list[np.ndarray] = []
        self.paths: list[pa.Array] = []

    def add(self, paths: pa.ChunkedArray, start: int) -> np.ndarray:
        """Keep the named rows of a part's path column (rows from store position ``start``); returns
        the part's distractor flags."""
        distractor = distractor_flags(paths)
        if self.protocol != "none":
            rows = np.flatnonzero(~distractor & named_rows(self.protocol, paths, self.bench))
            self.positions.append(rows + start)
            self.paths += paths.take(rows).chunks
        return distractor

    def ground_truth(self, n: int) -> GroundTruth | None:
        """The protocol's ground truth over a database of ``n`` rows."""
        column = pa.chunked_array(self.paths, self.paths[0].type if self.paths else pa.string())
        gt = ground_truth(self.protocol, column, self.root, self.known, self.bench)
        positions = np.concatenate(self.positions) if self.positions else np.empty(0, np.int64)
        if gt is None or len(positions) == n:  # every row named, in store order
            return gt
        return on_positions(gt, positions, n)


class FirstById:
    """The first ``k`` of the rows added (a part at a time, store positions increasing) in the order of
    their content ids, nulls last, ties in store order. Holds at most 2k rows: every time that many are
    held it keeps the first k, and then only takes rows whose id sorts before the k-th."""

    def __init__(self, k: int):
        self.k = k
        self.ids: list[pa.Array] = []
        self.positions: list[np.ndarray] = []
        self.held = 0
        self.last: pa.Scalar | None = None  # the k-th id kept, once k are

    def add(self, ids: PathColumn | Sequence[str | None], rows: np.ndarray, start: int = 0) -> None:
        """Rows ``rows`` of a part's ``ids`` column (store positions from ``start``); the ids are read
        only when some are to be kept."""
        if not self.k or not len(rows):
            return
        column, positions = string_column(ids).take(pa.array(rows)), rows + start if start else rows
        if self.last is not None:  # a later row sorts after the k-th kept unless its id is smaller
            keep = flags(pc.is_valid(column) if not self.last.is_valid else pc.less(column, self.last))
            column, positions = column.filter(pa.array(keep)), positions[keep]
        self.ids += column.chunks
        self.positions.append(np.asarray(positions, np.int64))
        self.held += len(positions)
        if self.held >= 2 * self.k:
            self._keep_first()

    def _keep_first(self) -> None:
        if not self.ids:
            return
        ids = pa.chunked_array(self.ids, self.ids[0].type)
        positions = np.concatenate(self.positions)
        table = pa.table({"id": ids, "position": positions})
        order = pc.sort_indices(table, [("id", "ascending"), ("position", "ascending")])  # nulls last
        order = order[: self.k]
        kept = ids.take(order)
        self.ids, self.positions = kept.chunks, [positions[order.to_numpy()]]
        self.held = len(kept)
        if self.held == self.k:
            self.last = kept[self.k - 1]

    def first(self) -> np.ndarray:
        """The store positions of the first ``k`` rows (fewer when fewer were added), in order."""
        self._keep_first()
        return self.positions[0] if self.positions else np.empty(0, np.int64)


@dataclass(frozen=True)
class Database:
    """A store's rows as evaluation sees them: ``rows`` in all, the ground truth over them (None under
    protocol ``none``), the collection's store positions, the number of distractors and the first of
    them in the order the distractor curve adds them (by content id, ties in store order)."""

    rows: int
    gt: GroundTruth | None
    collection: np.ndarray
    n_distractors: int
    distractors: np.ndarray


def read_database(layout: RunLayout, cfg: Config, directory: Path, first_distractors: int = 0) -> Database:
    """``Database`` of the store at ``directory``, its ``id`` and ``path`` columns read a part at a
    time, with the first ``first_distractors`` distractors in curve order."""
    named, order = _NamedRows(layout, cfg), FirstById(first_distractors)
    collection, n, n_distractors = [], 0, 0
    for path in part_files(directory):
        table = read_part(path, ["id", "path"])
        distractor = named.add(table.column("path"), n)
        collection.append(np.flatnonzero(~distractor) + n)
        rows = np.flatnonzero(distractor)
        order.add(table.column("id"), rows, n)
        n, n_distractors = n + table.num_rows, n_distractors + rows.size
    positions = np.concatenate(collection) if collection else np.empty(0, np.int64)
    return Database(n, named.ground_truth(n), positions, n_distractors, order.first())


def run_ground_truth(layout: RunLayout, cfg: Config, paths: PathColumn | Sequence[str]) -> GroundTruth | None:
    """The protocol's ground truth for a run's database ``paths``, the store's Arrow path column (a list
    is converted) (labels from its dataset manifest, Oxford/Paris ground truth from the benchmark's
    files). Distractors (``distractor:``) are never queries or positives; only the rows the protocol may
    name become Python strings. ``read_database`` computes the same a part at a time."""
    column = string_column(paths)
    named = _NamedRows(layout, cfg)
    named.add(column, 0)
    return named.ground_truth(len(column))


def database_split(
    paths: PathColumn | Sequence[str], ids: PathColumn | Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the collection's rows, positions of the distractors' rows), from the Arrow
    ``path`` column; the distractors in the order the distractor curve adds them: by content id
    (``ids``, ties in stored order), else as stored."""
    distractor = distractor_flags(string_column(paths))
    distractors = np.flatnonzero(distractor)
    if ids is not None and distractors.size:
        order = FirstById(distractors.size)
        order.add(ids, distractors)
        distractors = order.first()
    return np.flatnonzero(~distractor), distractors


class StorePaths(StoreParts):
    """A store's ``path`` column read by position when asked: only the parts that hold them."""

    def take(self, positions: np.ndarray) -> pa.Array:
        """The paths at ``positions`` (flattened), in their order."""
        flat = np.asarray(positions, np.int64).reshape(-1)
        pieces, placed = [], []
        for i, where in self.by_part(flat):
            column = read_part(self.parts[i], ["path"]).column(0)
            pieces.append(column.take(pa.array(flat[where] - self.starts[i])).combine_chunks())
            placed.append(where)
        if not pieces:
            return pa.array([], pa.string())
        inverse = np.empty(len(flat), np.int64)
        inverse[np.concatenate(placed)] = np.arange(len(flat))
        return pa.concat_arrays(pieces).take(pa.array(inverse))
