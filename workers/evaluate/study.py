"""Compression study: mAP against bytes per vector for PCA dimensions and product quantisation.

For each descriptor of a finished run, every candidate index (``PCA<d>,Flat`` for d = 32, 64, …, the
full descriptor ``Flat``, and ``[PCA<d>,]PQ<M>x<nbits>`` at 8, 16, 32 and 64 bytes) is trained on the
run's vectors, searched exhaustively with the run's queries and scored with the run's protocol. Queries
are database rows (Holidays, UKBench, labels) or, for Oxford/Paris, the box-cropped query images' own
descriptors from the run's query store (``queries_of``), passed through the same PCA and codes as the
database. The revisited protocols also get their Easy/Medium/Hard mAP (``map`` is Medium).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.features import read_features
from embedpipe.workers.evaluate.metrics import compute_map
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.index.ann import build_index, bytes_per_vector, search

log = logging.getLogger("embedpipe.study")

PCA_DIMS = (32, 64, 128, 256, 512, 1024, 2048)
PQ_BYTES = (8, 16, 32, 64)
PQ_PCA_DIM = 128  # PQ codes are learnt on PCA-reduced vectors of this size when the data allows


def pq_nbits(n_train: int) -> int:
    """Bits per PQ sub-quantizer: 8 (256 centroids) when k-means has at least 256 training vectors,
    else 4 (16 centroids); 0 when even that cannot be trained."""
    return 8 if n_train >= 256 else 4 if n_train >= 16 else 0


def pca_factories(dim: int, n_train: int) -> list[str]:
    """``PCA<d>,Flat`` for the standard d below what the data supports (min(dim, n - 1)), then ``Flat``."""
    cap = min(dim, n_train - 1)
    return [f"PCA{d},Flat" for d in PCA_DIMS if d <= cap and d < dim] + ["Flat"]


def pq_factory(dim: int, n_train: int, nbytes: int) -> str | None:
    """The PQ candidate whose codes take ``nbytes``: M sub-quantizers of ``pq_nbits`` bits on vectors
    PCA-reduced to a multiple of M (at most ``PQ_PCA_DIM`` unless M is larger), or on the full vectors
    when PCA cannot give enough dimensions. None when no such index can be trained."""
    nbits = pq_nbits(n_train)
    if not nbits:
        return None
    m = nbytes * 8 // nbits
    if m > dim:
        return None
    cap = min(dim, n_train - 1, max(PQ_PCA_DIM, m))
    target = cap - cap % m
    if target >= m and target < dim:
        return f"PCA{target},PQ{m}x{nbits}"
    return f"PQ{m}x{nbits}" if dim % m == 0 else None


def candidates(dim: int, n_train: int) -> list[str]:
    pq = [pq_factory(dim, n_train, b) for b in PQ_BYTES]
    return pca_factories(dim, n_train) + [f for f in pq if f is not None]


def _dim_of(factory: str, dim: int) -> int:
    head = factory.split(",")[0]
    return int(head[3:]) if head.startswith("PCA") else dim


def evaluate_factory(
    x: np.ndarray, gt: GroundTruth, factory: str, seed: int, queries: np.ndarray | None = None
) -> dict[str, Any]:
    """Train, fill and search one candidate; mAP of the exhaustive ranking of every query (``queries``:
    the query vectors when they are not rows of ``x``, e.g. box crops)."""
    start = time.perf_counter()
    index = build_index(x, factory, seed)
    ranks = search(index, x[gt.queries] if queries is None else queries, index.ntotal)[1]
    result = compute_map(ranks, gt.positives, gt.junk)
    setups = {
        f"map_{name}": float(compute_map(ranks, setup.positives, setup.junk)["map"])
        for name, setup in (gt.setups or {}).items()
    }
    return {
        "index": factory,
        "dim": _dim_of(factory, x.shape[1]),
        "bytes_per_vector": bytes_per_vector(index),
        "map": float(result["map"]),
        **setups,
        "time_s": round(time.perf_counter() - start, 4),
    }


QueriesOf = Callable[[str, GroundTruth], np.ndarray]


def compression_study(
    feature_dirs: dict[str, Path], gt_of: Any, seed: int = 0, queries_of: QueriesOf | None = None
) -> list[dict[str, Any]]:
    """Rows {"descriptor", "dim", "index", "bytes_per_vector", "map", "time_s"} (and ``map_easy``,
    ``map_medium``, ``map_hard`` for the revisited protocols) for every descriptor and candidate, sorted by
    descriptor then bytes per vector. ``gt_of(paths)`` gives the ground truth of a store's Arrow ``path``
    column (``run_ground_truth`` takes it as it is); ``queries_of(descriptor, gt)`` the descriptors of
    external (box-cropped) queries, in query order, when the ground truth has them."""
    rows = []
    for descriptor, directory in feature_dirs.items():
        meta, x = read_features(directory)
        gt = gt_of(meta.column("path"))
        queries = None
        if gt.query_keys:
            if queries_of is None:
                raise InputError(f"study compression: {descriptor}'s box-cropped queries were not given")
            queries = np.ascontiguousarray(queries_of(descriptor, gt), dtype=np.float32)
            if queries.shape != (len(gt.queries), x.shape[1]):
                raise InputError(
                    f"study compression: {descriptor}: query descriptors of shape {queries.shape}, "
                    f"expected ({len(gt.queries)}, {x.shape[1]})"
                )
        for factory in candidates(x.shape[1], len(x)):
            row = {"descriptor": descriptor, **evaluate_factory(x, gt, factory, seed, queries)}
            log.info(
                "study: %s %-22s %6d B/vector  mAP %.4f",
                descriptor,
                factory,
                row["bytes_per_vector"],
                row["map"],
            )
            rows.append(row)
    return sorted(rows, key=lambda r: (r["descriptor"], r["bytes_per_vector"], r["index"]))


def plot_compression(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """mAP against bytes per vector (log scale), one line per descriptor and family; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("study: matplotlib not installed, no plot written")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for descriptor in sorted({r["descriptor"] for r in rows}):
        for family, pick in (("PCA", lambda f: "PQ" not in f), ("PQ", lambda f: "PQ" in f)):
            pts = [
                (r["bytes_per_vector"], r["map"])
                for r in rows
                if r["descriptor"] == descriptor and pick(r["index"])
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=f"{descriptor} {family}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel("mAP")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
