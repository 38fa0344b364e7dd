"""Ground truth of the evaluation protocols, derived from the dataset's own layout (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from embedpipe.storage.errors import InputError

_HOLIDAYS_NAME = re.compile(r"^(\d{6})$")


@dataclass(frozen=True)
class GroundTruth:
    """Queries as database row indices; per query the rows that are positive and the rows ignored."""

    queries: np.ndarray
    positives: list[np.ndarray]
    junk: list[np.ndarray]
    groups: np.ndarray | None = None  # per database row (group / class id, -1 for none), for plots
    group_names: tuple[str, ...] = ()  # name of each group id, when the layout has names


def holidays_imno(path: str) -> int | None:
    match = _HOLIDAYS_NAME.match(PurePath(path).stem)
    return int(match.group(1)) if match else None


def holidays(paths: list[str]) -> GroundTruth:
    """INRIA Holidays: ``NNNNNN.jpg``; query <=> imno % 100 == 0; group = imno // 100.

    Every image is in the database; a query's positives are the other images of its group and the query
    itself is removed from its own ranking (junk). Files not named in the layout stay in the database as
    distractors."""
    imnos = [holidays_imno(p) for p in paths]
    groups = np.array([-1 if n is None else n // 100 for n in imnos])
    queries = np.array([i for i, n in enumerate(imnos) if n is not None and n % 100 == 0], dtype=np.int64)
    if queries.size == 0:
        raise InputError(
            "holidays protocol: no query image (NNNNNN.jpg with NNNNNN % 100 == 0) among the inputs"
        )
    positives, junk = [], []
    for q in queries:
        same = np.flatnonzero(groups == groups[q])
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


def labels(paths: list[str], root: str) -> GroundTruth:
    """Labels from a folder per class (the first folder under ``root``): every image queries its class,
    itself removed from its own ranking."""
    names = []
    for p in paths:
        rel = PurePath(p).relative_to(root)
        if len(rel.parts) < 2:
            raise InputError(f"labels protocol: {p} is not inside a class folder of {root}")
        names.append(rel.parts[0])
    classes = tuple(sorted(set(names)))
    groups = np.array([classes.index(n) for n in names], dtype=np.int64)
    gt = every_image_queries(groups, include_self=False)
    return GroundTruth(gt.queries, gt.positives, gt.junk, groups, classes)


def ground_truth(protocol: str, paths: list[str], root: str | None = None) -> GroundTruth | None:
    """The protocol's ground truth over the database ``paths`` (``root``: the dataset folder)."""
    if protocol == "holidays":
        return holidays(paths)
    if protocol == "ukbench":
        return ukbench(paths)
    if protocol == "labels":
        return labels(paths, root or str(PurePath(paths[0]).parent.parent))
    if protocol == "none":
        return None
    raise InputError(f"unknown protocol '{protocol}'")


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
