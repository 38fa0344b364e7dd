"""Ground truth of the evaluation protocols, derived from the dataset's own layout (pure)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.storage.contracts.errors import InputError

_HOLIDAYS_NAME = re.compile(r"^(\d{6})$")
# a superset of the stems ``_HOLIDAYS_NAME`` accepts (Python's \d also takes non-ASCII digits, and its $
# a final newline), for Arrow's RE2 to keep the rows that may be Holidays images
_HOLIDAYS_CANDIDATE = r"^[0-9\x{80}-\x{10FFFF}]{6}\n?$"

PathColumn = pa.Array | pa.ChunkedArray


@dataclass(frozen=True)
class GroundTruth:
    """Queries as database row indices; per query the rows that are positive and the rows ignored.

    With ``query_keys`` the queries are external images (Oxford/Paris box crops): ``queries`` then
    numbers them 0..n-1 in the query store, and ``query_keys`` names each query's source image.
    Positives missing from the database are numbered from the database size up, so they count in the
    AP denominator as the reference protocols count them, and are never ranked."""

    queries: np.ndarray
    positives: list[np.ndarray]
    junk: list[np.ndarray]
    groups: np.ndarray | None = None  # per database row (group / class id, -1 for none), for plots
    group_names: tuple[str, ...] = ()  # name of each group id, when the layout has names
    query_keys: tuple[str, ...] = ()
    setups: dict[str, GroundTruth] | None = None  # revisited protocols: easy / medium / hard


def on_positions(
    gt: GroundTruth, positions: np.ndarray, n_total: int, external: bool | None = None
) -> GroundTruth:
    """``gt`` computed over a subset of a database (its row i = row ``positions[i]`` of the whole, of
    ``n_total`` rows), restated over the whole; rows numbered past the subset (positives missing from
    the database) stay past the whole. External queries (``query_keys``, or ``external``) keep their
    numbers."""
    external = bool(gt.query_keys) if external is None else external
    positions = np.asarray(positions, np.int64)
    n = len(positions)

    def move(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        inside = rows < n
        return np.where(inside, positions[np.where(inside, rows, 0)] if n else rows, rows - n + n_total)

    groups = None
    if gt.groups is not None:
        groups = np.full(n_total, -1, np.asarray(gt.groups).dtype)
        groups[positions] = gt.groups
    setups = None
    if gt.setups:
        setups = {name: on_positions(one, positions, n_total, external) for name, one in gt.setups.items()}
    return replace(
        gt,
        queries=gt.queries if external else move(gt.queries),
        positives=[move(p) for p in gt.positives],
        junk=[move(j) for j in gt.junk],
        groups=groups,
        setups=setups,
    )


def string_column(values: PathColumn | Sequence[str]) -> pa.ChunkedArray:
    """``values`` as one Arrow string column: an Arrow array as it is, a list of strings converted once."""
    if isinstance(values, pa.ChunkedArray):
        return values
    if isinstance(values, pa.Array):
        return pa.chunked_array([values])
    return pa.chunked_array([pa.array(list(values), pa.string())])


def flags(mask: PathColumn) -> np.ndarray:
    """A boolean Arrow column as a numpy mask, nulls false."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool).reshape(-1)


def file_stems(paths: PathColumn | Sequence[str]) -> pa.ChunkedArray:
    """``PurePath(p).stem`` of every row, computed by Arrow: the last component that is neither empty
    nor ``.``, less its last suffix (a dot with something before it and after it)."""
    column = string_column(paths)
    trimmed = pc.replace_substring_regex(column, r"(/\.?)*$", "")  # trailing "/" and "/." components
    name = pc.replace_substring_regex(trimmed, r"(?s)^.*/", "")
    name = pc.if_else(pc.equal(name, "."), pa.scalar("", name.type), name)  # "." or "./": no name
    return pc.replace_substring_regex(name, r"(?s)^(.+)\.[^.]+$", r"\1")


def holidays_imno(path: str) -> int | None:
    match = _HOLIDAYS_NAME.match(PurePath(path).stem)
    return int(match.group(1)) if match else None


def holidays_candidates(column: pa.ChunkedArray) -> np.ndarray:
    """Whether each row's file stem may be a Holidays image number (a superset: see ``holidays``)."""
    return flags(pc.match_substring_regex(file_stems(column), _HOLIDAYS_CANDIDATE))


def holidays(paths: PathColumn | Sequence[str]) -> GroundTruth:
    """INRIA Holidays: ``NNNNNN.jpg``; query <=> imno % 100 == 0; group = imno // 100.

    Every image is in the database; a query's positives are the other images of its group and the query
    itself is removed from its own ranking (junk). Files not named in the layout stay in the database as
    distractors. Over an Arrow path column (a list is converted), Arrow keeps the rows whose stem may be
    an image number, and only those become Python strings (``holidays_imno`` decides on them)."""
    column = string_column(paths)
    candidates = np.flatnonzero(holidays_candidates(column))
    imnos = [holidays_imno(p) for p in column.take(candidates).to_pylist()]
    rows = candidates[np.array([n is not None for n in imnos], dtype=bool)]
    numbers = np.array([n for n in imnos if n is not None], dtype=np.int64)
    groups = np.full(len(column), -1, dtype=np.int64)
    groups[rows] = numbers // 100
    queries = rows[numbers % 100 == 0]
    if queries.size == 0:
        raise InputError(
            "holidays protocol: no query image (NNNNNN.jpg with NNNNNN % 100 == 0) among the inputs"
        )
    order = np.argsort(groups[rows], kind="stable")  # each group's rows in database order
    members, member_groups = rows[order], groups[rows][order]
    starts = np.searchsorted(member_groups, groups[queries], side="left")
    ends = np.searchsorted(member_groups, groups[queries], side="right")
    positives, junk = [], []
    for q, a, b in zip(queries, starts, ends, strict=True):
        same = members[a:b]
        positives.append(same[same != q])
        junk.append(np.array([q], dtype=np.int64))
    return GroundTruth(queries, positives, junk, groups)


def every_image_queries(groups: np.ndarray, include_self: bool) -> GroundTruth:
    """Every image is a query whose positives are the other members of its group (and itself when
    ``include_self``, as UKBench scores count it); otherwise the query is junk in its own ranking."""
    rows = np.arange(len(groups), dtype=np.int64)
    positives, junk = [], []
    for q in rows:
        same = np.flatnonzero(groups == groups[q])
        positives.append(same if include_self else same[same != q])
        junk.append(np.empty(0, np.int64) if include_self else np.array([q], dtype=np.int64))
    return GroundTruth(rows, positives, junk, groups)


def ukbench(paths: list[str]) -> GroundTruth:
    """UKBench: groups of four consecutive image numbers; every image queries, itself included."""
    return every_image_queries(ukbench_groups(paths), include_self=True)


def labels(paths: list[str], root: str | None, known: dict[str, str] | None = None) -> GroundTruth:
    """Every image queries its class, itself removed from its own ranking. The class is the input's label
    (``known``: a list's ``label`` column, a shard's ``.cls``/``.json``) or else its class folder: the
    first folder under ``root`` when the input is inside it, otherwise the folder holding the image."""
    names = []
    for p in paths:
        if known and p in known:
            names.append(known[p])
            continue
        path = PurePath(p)
        rel = path.relative_to(root) if root and path.is_relative_to(root) else None
        if rel is not None and len(rel.parts) >= 2:
            names.append(rel.parts[0])
        elif rel is None and path.parent.name:
            names.append(path.parent.name)
        else:
            raise InputError(f"labels protocol: {p} has no label and is not inside a class folder")
    classes = tuple(sorted(set(names)))
    groups = np.array([classes.index(n) for n in names], dtype=np.int64)
    gt = every_image_queries(groups, include_self=False)
    return GroundTruth(gt.queries, gt.positives, gt.junk, groups, classes)


def ground_truth(
    protocol: str,
    paths: PathColumn | Sequence[str],
    root: str | None = None,
    known_labels: dict[str, str] | None = None,
    benchmark: BenchmarkLayout | None = None,
) -> GroundTruth | None:
    """The protocol's ground truth over the database ``paths``, an Arrow string column (a list is
    converted) (``root``: the dataset folder; ``known_labels``: key -> label from the dataset manifest;
    ``benchmark``: the Oxford/Paris layout). Holidays and Oxford/Paris turn only the rows their layout
    may name into Python strings; UKBench and labels, where every row queries, all of them."""
    column = string_column(paths)
    if protocol in BENCHMARK_PROTOCOLS:
        if benchmark is None:
            raise InputError(f"{protocol} protocol: no ground truth given")
        return benchmark_ground_truth(benchmark, column)
    if protocol == "holidays":
        return holidays(column)
    if protocol == "ukbench":
        return ukbench(column.to_pylist())
    if protocol == "labels":
        return labels(column.to_pylist(), root, known_labels)
    if protocol == "none":
        return None
    raise InputError(f"unknown protocol '{protocol}'")


def named_rows(
    protocol: str, column: pa.ChunkedArray, benchmark: BenchmarkLayout | None = None
) -> np.ndarray:
    """Whether each row of the Arrow path column may be a query, positive or junk row of the protocol
    (a superset): ``ground_truth`` over these rows alone, restated over all rows (``on_positions``),
    is its ground truth over all of them. Under UKBench and labels every row is."""
    if protocol in BENCHMARK_PROTOCOLS and benchmark is not None:
        return benchmark_candidates(benchmark, column)
    if protocol == "holidays":
        return holidays_candidates(column)
    return np.ones(len(column), dtype=bool)


def _as_index(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def revisitop_setups(gnd: list[dict]) -> dict[str, GroundTruth]:
    """revisitop's protocols from a ``gnd`` list, exactly as its example evaluation builds them.

    Revisited (easy/hard/junk): easy = ok easy, junk junk+hard; medium = ok easy+hard, junk junk;
    hard = ok hard, junk junk+easy. Classic (ok/junk): one setup, ``classic``. Queries are external
    images, so ``queries`` holds the query numbers 0..n-1."""
    queries = np.arange(len(gnd), dtype=np.int64)
    if all("easy" in g for g in gnd):
        parts = {k: [_as_index(g[k]) for g in gnd] for k in ("easy", "hard", "junk")}
        combos = {
            "easy": (("easy",), ("junk", "hard")),
            "medium": (("easy", "hard"), ("junk",)),
            "hard": (("hard",), ("junk", "easy")),
        }
        return {
            name: GroundTruth(
                queries,
                [np.concatenate([parts[k][i] for k in ok]) for i in range(len(gnd))],
                [np.concatenate([parts[k][i] for k in junk]) for i in range(len(gnd))],
            )
            for name, (ok, junk) in combos.items()
        }
    return {
        "classic": GroundTruth(
            queries, [_as_index(g["ok"]) for g in gnd], [_as_index(g["junk"]) for g in gnd]
        )
    }


_UKBENCH_NAME = re.compile(r"(\d+)$")


def ukbench_groups(paths: list[str]) -> np.ndarray:
    """UKBench: images ``ukbenchNNNNN.jpg`` come in groups of four consecutive numbers."""
    groups = []
    for p in paths:
        match = _UKBENCH_NAME.search(PurePath(p).stem)
        if match is None:
            raise InputError(f"ukbench protocol: '{p}' has no image number")
        groups.append(int(match.group(1)) // 4)
    return np.array(groups, dtype=np.int64)


BENCHMARK_PROTOCOLS = ("oxford5k", "paris6k", "roxford5k", "rparis6k")


@dataclass(frozen=True)
class BenchmarkLayout:
    """Oxford/Paris-style ground truth by image name: queries are box crops of named images.

    ``gnd``: revisitop's list (``easy``/``hard``/``junk`` or ``ok``/``junk`` indices into ``imlist``);
    ``imlist``: the database image names in the protocol's order (``None``: every image of the folder)."""

    protocol: str
    query_names: tuple[str, ...]
    query_images: tuple[str, ...]
    query_boxes: tuple[tuple[float, float, float, float], ...]
    imlist: tuple[str, ...]
    gnd: list[dict]
    database_is_imlist: bool  # revisited: only imlist images are in the database


def benchmark_layout(protocol: str, gt_path: str) -> BenchmarkLayout:
    """Read the ground truth of an Oxford/Paris benchmark: the original ``gt`` folder of ``*_query.txt``
    and ``_good/_ok/_junk`` lists, or a revisitop ``gnd_*.pkl`` (classic or Easy/Medium/Hard)."""
    from embedpipe.storage.groundtruth import load_oxford_gt, load_revisitop_gnd

    if str(gt_path).endswith(".pkl"):
        data = load_revisitop_gnd(gt_path)
        imlist, qimlist = tuple(map(str, data["imlist"])), tuple(map(str, data["qimlist"]))
        boxes = []
        for i, g in enumerate(data["gnd"]):
            box = g.get("bbx")
            if box is None or len(box) != 4:
                raise InputError(f"{gt_path}: gnd[{i}] has no query box 'bbx'")
            boxes.append(tuple(float(v) for v in box))
        return BenchmarkLayout(protocol, qimlist, qimlist, tuple(boxes), imlist, data["gnd"], True)
    entries = load_oxford_gt(gt_path)
    names = sorted(
        {n for e in entries for k in ("good", "ok", "junk") for n in e[k]} | {e["image"] for e in entries}
    )
    index = {n: i for i, n in enumerate(names)}
    gnd = [
        {"ok": [index[n] for n in e["good"] + e["ok"]], "junk": [index[n] for n in e["junk"]]}
        for e in entries
    ]
    return BenchmarkLayout(
        protocol,
        tuple(e["name"] for e in entries),
        tuple(e["image"] for e in entries),
        tuple(e["bbox"] for e in entries),
        tuple(names),
        gnd,
        False,
    )


def benchmark_candidates(layout: BenchmarkLayout, column: pa.ChunkedArray) -> np.ndarray:
    """Whether each row's file stem is one of the layout's image names."""
    value_set = pa.array(sorted(set(layout.imlist)), column.type)
    return flags(pc.is_in(file_stems(column), value_set=value_set))


def benchmark_ground_truth(layout: BenchmarkLayout, paths: PathColumn | Sequence[str]) -> GroundTruth:
    """Map the layout's image names onto database rows (by file stem; the last row of a name). Revisited
    protocols give the medium setup with easy/medium/hard in ``setups``; classic ones their single
    ok/junk setup. Over an Arrow path column (a list is converted), only the rows whose stem is one of
    the layout's image names become Python strings."""
    column = string_column(paths)
    names = set(layout.imlist)
    candidates = np.flatnonzero(benchmark_candidates(layout, column))
    row = {}
    for i, p in zip(candidates.tolist(), column.take(candidates).to_pylist(), strict=True):
        stem = PurePath(p).stem
        if stem in names:
            row[stem] = i  # the last row of a name, as a dict over every row keeps it
    return _benchmark_rows(layout, row, len(column))


def _benchmark_rows(layout: BenchmarkLayout, row: dict[str, int], n: int) -> GroundTruth:
    """The layout's ground truth with image names mapped to database rows by ``row`` (of ``n`` rows)."""
    missing: dict[str, int] = {}

    def rows_of(indices) -> np.ndarray:
        out = []
        for j in _as_index(indices):
            name = layout.imlist[int(j)]
            if name in row:
                out.append(row[name])
            else:
                out.append(missing.setdefault(name, n + len(missing)))
        return np.asarray(out, dtype=np.int64)

    mapped = [
        {k: rows_of(v) for k, v in g.items() if k in ("easy", "hard", "junk", "ok")} for g in layout.gnd
    ]
    setups = revisitop_setups(mapped)
    keys = tuple(layout.query_images)
    setups = {
        name: GroundTruth(gt.queries, gt.positives, gt.junk, query_keys=keys) for name, gt in setups.items()
    }
    main = setups.get("medium", setups.get("classic"))
    return GroundTruth(
        main.queries, main.positives, main.junk, query_keys=keys, setups=setups if len(setups) > 1 else None
    )
