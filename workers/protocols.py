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
    return GroundTruth(queries, positives, junk)


def ground_truth(protocol: str, paths: list[str]) -> GroundTruth | None:
    if protocol == "holidays":
        return holidays(paths)
    if protocol == "none":
        return None
    raise InputError(f"unknown protocol '{protocol}'")
