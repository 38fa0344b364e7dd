"""Dask jobs over the Parquet feature store: out-of-core moments for PCA/whitening.

The store is read as a Dask array with one block per part file (one delayed Parquet read each), so the
fit never holds more than a few parts in memory. The scheduler is Dask-on-Ray (the run's Ray cluster),
Dask's local threads, or a Dask distributed local cluster.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import pyarrow.parquet as pq

from embedpipe.storage.errors import RunFailed
from embedpipe.storage.features import part_files, read_part, read_store_manifest, vectors_of
from embedpipe.workers.whitening import pca_whitening_from_moments

if TYPE_CHECKING:
    from embedpipe.flows.config import FitConfig

log = logging.getLogger("embedpipe.fit")


def _read_vectors(path: str) -> np.ndarray:
    return vectors_of(read_part(Path(path), ["descriptor"])).astype(np.float64)


def descriptor_array(directory: Path) -> da.Array:
    """The store's vectors as an (n, dim) float64 Dask array, one block per non-empty part file."""
    dim = int(read_store_manifest(directory)["dim"])
    blocks = []
    for path in part_files(directory):
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows:
            blocks.append(
                da.from_delayed(dask.delayed(_read_vectors)(str(path)), shape=(rows, dim), dtype=np.float64)
            )
    if not blocks:
        raise RunFailed(f"feature store {directory} has no rows")
    return da.concatenate(blocks, axis=0)


@contextlib.contextmanager
def dask_scheduler(name: str) -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``dask.compute`` that run on the named scheduler."""
    if name == "ray":
        from ray.util.dask import ray_dask_get

        yield {"scheduler": ray_dask_get}
    elif name == "threads":
        yield {"scheduler": "threads"}
    elif name == "local-cluster":
        from distributed import Client, LocalCluster

        # in-process cluster: workers talk over inproc://, nothing listens on the network
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            yield {"scheduler": client.get}
    else:
        raise ValueError(f"unknown Dask scheduler '{name}'")


Moments = tuple[np.ndarray, np.ndarray, int]  # column sums (D,), Gram XᵀX (D, D), rows


def _part_moments(path: str) -> Moments:
    x = _read_vectors(path)  # (n, D) float64
    return x.sum(axis=0), x.T @ x, len(x)


def _add_moments(a: Moments, b: Moments) -> Moments:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def store_moments(directory: Path, scheduler: str) -> Moments:
    """Column sums and Gram matrix of the whole store in one pass: one Dask task per part file, partial
    moments summed pairwise in a tree, so memory holds a few parts and D×D partial sums at a time."""
    level = [
        dask.delayed(_part_moments)(str(p))
        for p in part_files(directory)
        if pq.ParquetFile(p).metadata.num_rows
    ]
    if not level:
        raise RunFailed(f"feature store {directory} has no rows")
    while len(level) > 1:
        pairs = [dask.delayed(_add_moments)(a, b) for a, b in zip(level[::2], level[1::2], strict=False)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    with dask_scheduler(scheduler) as kwargs:
        (moments,) = dask.compute(level[0], **kwargs)
    return moments


def fit_pca_whitening(directory: Path, cfg: FitConfig) -> tuple[dict[str, np.ndarray], int]:
    """One pass over the store: column sums and Gram matrix in Dask, then eigh in numpy.

    Returns the whitening arrays and the number of rows it was fitted on."""
    total, gram, n = store_moments(directory, cfg.scheduler)
    model = pca_whitening_from_moments(total, gram, n, cfg.dim, cfg.shrinkage)
    if cfg.dim and model["proj"].shape[0] < cfg.dim:
        log.warning(
            "fit: %d vectors support only %d whitened dims (asked %d)", n, model["proj"].shape[0], cfg.dim
        )
    return model, n
