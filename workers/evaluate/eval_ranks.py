"""Score an external ranking file against a benchmark's ground truth (``embedpipe eval-ranks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.groundtruth import load_revisitop_gnd
from embedpipe.workers.evaluate.metrics import compute_map, ns_score
from embedpipe.workers.evaluate.protocols import holidays, revisitop_setups, ukbench_groups

KAPPAS = (1, 5, 10)
REVISITED = ("roxford5k", "rparis6k")
CLASSIC = ("oxford5k", "paris6k")
LISTS = ("holidays", "ukbench")


def load_ranks(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ranks file not found: {path}")
    try:
        ranks = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a .npy array ({str(err).splitlines()[0]})") from None
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise InputError(
            f"{path}: expected an int array (n_queries, n_ranked), got {ranks.dtype} {ranks.shape}"
        )
    return ranks.astype(np.int64, copy=False)


def _check(ranks: np.ndarray, n_queries: int, n_db: int | None, what: str) -> None:
    if ranks.shape[0] != n_queries:
        raise InputError(f"ranks have {ranks.shape[0]} rows but {what} has {n_queries} queries")
    if ranks.size and (ranks.min() < 0 or (n_db is not None and ranks.max() >= n_db)):
        raise InputError(f"ranks hold database indices outside [0, {n_db})")


def _scores(result: dict[str, Any]) -> dict[str, float]:
    return {"map": result["map"], **{f"mp@{k}": result[f"mp@{k}"] for k in KAPPAS}}


def _image_list(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image list not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise InputError(f"{path}: empty image list")
    return names


def eval_ranks(protocol: str, gnd_path: Path, ranks: np.ndarray) -> dict[str, Any]:
    """Metrics as fractions in [0, 1].

    roxford5k / rparis6k: ``{"easy"|"medium"|"hard": {"map", "mp@1", "mp@5", "mp@10"}}`` (revisitop pkl).
    oxford5k / paris6k: ``{"map", "mp@1", ...}`` from a classic revisitop pkl (ok/junk).
    holidays: gnd is the database image list (one name per line, ranks' index order); each query
    (``NNNNNN % 100 == 0``) is a row of ranks, in list order; the query is removed from its own ranking.
    ukbench: gnd is the database image list; every image is a query; adds ``ns_score`` (0-4)."""
    if protocol in REVISITED + CLASSIC:
        data = load_revisitop_gnd(gnd_path)
        setups = revisitop_setups(data["gnd"])
        n_db = len(data["imlist"]) if "imlist" in data else None
        if protocol in REVISITED and "easy" not in setups:
            raise InputError(f"{gnd_path}: {protocol} needs easy/hard/junk ground truth")
        if protocol in CLASSIC and "classic" not in setups:
            raise InputError(f"{gnd_path}: {protocol} needs the classic ok/junk ground truth")
        _check(ranks, len(data["gnd"]), n_db, str(gnd_path))
        out = {
            name: _scores(compute_map(ranks, gt.positives, gt.junk, KAPPAS)) for name, gt in setups.items()
        }
        return out if protocol in REVISITED else out["classic"]
    if protocol in LISTS:
        names = _image_list(gnd_path)
        if protocol == "holidays":
            gt = holidays(names)
            _check(ranks, len(gt.queries), len(names), str(gnd_path))
            return _scores(compute_map(ranks, gt.positives, gt.junk, KAPPAS))
        groups = ukbench_groups(names)
        _check(ranks, len(names), len(names), str(gnd_path))
        positives = [np.flatnonzero(groups == groups[i]) for i in range(len(names))]
        return {**_scores(compute_map(ranks, positives, None, KAPPAS)), "ns_score": ns_score(ranks, groups)}
    raise InputError(f"eval-ranks: unsupported protocol '{protocol}'")
