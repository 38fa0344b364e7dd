"""Dask jobs over the Parquet feature store: out-of-core moments for PCA/whitening, the seeded training
sample of the FAISS index (PQ/OPQ/IVF), codebook samples (codebooks, Fisher vector GMMs, triangulation
embeddings), VLAD vocabulary adaptation and encodings.

The store is read as a Dask array with one block per part file (one delayed Parquet read each), so the
fit never holds more than a few parts in memory. The scheduler is Dask-on-Ray (the run's Ray cluster),
Dask's local threads, or a Dask distributed local cluster.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np

from embedpipe.storage.artifacts import load_npz, save_blob, save_npz
from embedpipe.storage.contracts.errors import RunFailed
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import (
    fit_part_rows,
    part_files,
    part_row_counts,
    read_part,
    read_store_manifest,
    sample_part,
    sample_quotas,
    vectors_of,
)
from embedpipe.storage.local_features import write_manifest
from embedpipe.workers.fit.whitening import pca_whitening_from_moments

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, FitConfig

log = logging.getLogger("embedpipe.fit")


def _read_vectors(path: str) -> np.ndarray:
    return vectors_of(read_part(Path(path), ["descriptor"])).astype(np.float64)


def descriptor_array(directory: Path) -> da.Array:
    """The store's vectors as an (n, dim) float64 Dask array, one block per non-empty part file."""
    dim = int(read_store_manifest(directory)["dim"])
    blocks = []
    for path, rows in part_row_counts(directory):
        if rows:
            blocks.append(
                da.from_delayed(dask.delayed(_read_vectors)(str(path)), shape=(rows, dim), dtype=np.float64)
            )
    if not blocks:
        raise RunFailed(f"feature store {directory} has no rows")
    return da.concatenate(blocks, axis=0)


@contextlib.contextmanager
def dask_scheduler(name: str, address: str | None = None) -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``dask.compute`` that run on the named scheduler ('distributed': the
    running scheduler at ``address``, whose workers must have embedpipe installed)."""
    if name == "distributed":
        from distributed import Client

        if not address:
            raise RunFailed("Dask scheduler 'distributed' needs an address (fit.dask_address)")
        try:
            client = Client(address, timeout=10, set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise RunFailed(f"cannot reach the Dask scheduler at {address}: {err}") from None
        with client:
            log.info("fit: Dask scheduler %s, %d worker(s)", address, len(client.scheduler_info()["workers"]))
            yield {"scheduler": client.get}
    elif name == "ray":
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


def store_moments(
    directory: Path, scheduler: str, address: str | None = None, include_distractors: bool = True
) -> Moments:
    """Column sums and Gram matrix of the store (its distractors' parts left out unless
    ``include_distractors``) in one pass: one Dask task per part file, partial moments summed pairwise
    in a tree, so memory holds a few parts and D×D partial sums at a time."""
    parts = fit_part_rows(directory, include_distractors)
    level = [dask.delayed(_part_moments)(str(p)) for p, rows in parts if rows]
    if not level:
        raise RunFailed(f"feature store {directory} has no rows")
    while len(level) > 1:
        pairs = [dask.delayed(_add_moments)(a, b) for a, b in zip(level[::2], level[1::2], strict=False)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    with dask_scheduler(scheduler, address) as kwargs:
        (moments,) = dask.compute(level[0], **kwargs)
    return moments


def _usable(scheduler: str) -> str:
    """``scheduler``, or local threads in place of Dask-on-Ray when this process runs no Ray session
    (the sample does not depend on the scheduler, so nothing but the place of the work changes)."""
    if scheduler == "ray":
        import ray

        if not ray.is_initialized():
            log.debug("no Ray session: Dask job on local threads")
            return "threads"
    return scheduler


def sample_store(
    directory: Path,
    n: int,
    seed: int,
    scheduler: str,
    address: str | None = None,
    include_distractors: bool = True,
) -> np.ndarray:
    """Dask job: a seeded sample of ``min(n, rows)`` vectors of the store (of its collection's parts
    alone unless ``include_distractors``) -> (n, dim) float32.

    Each part gives rows in proportion to its size (``sample_quotas``), drawn by a generator seeded
    with (``seed``, part number) in one Dask task that reads that part alone and returns only its rows;
    the blocks are concatenated in part order. Same store and seed -> the same bytes, whatever the
    scheduler or the number of workers; memory holds the sample and the parts being read."""
    counts = fit_part_rows(directory, include_distractors)
    quotas = sample_quotas([c for _, c in counts], n)
    tasks = [
        dask.delayed(sample_part)(str(path), take, seed, part)
        for part, ((path, _), take) in enumerate(zip(counts, quotas, strict=True))
        if take
    ]
    if not tasks:
        dim = int(read_store_manifest(directory)["dim"])
        return np.empty((0, dim), np.float32)
    with dask_scheduler(_usable(scheduler), address) as kwargs:
        blocks = dask.compute(*tasks, **kwargs)
    return np.concatenate(blocks)


def fit_pca_whitening(directory: Path, cfg: FitConfig) -> tuple[dict[str, np.ndarray], int]:
    """One pass over the store: column sums and Gram matrix in Dask, then eigh in numpy.

    Returns the whitening arrays and the number of rows it was fitted on."""
    total, gram, n = store_moments(directory, cfg.scheduler, cfg.dask_address, cfg.include_distractors)
    model = pca_whitening_from_moments(total, gram, n, cfg.dim, cfg.shrinkage)
    if cfg.dim and model["proj"].shape[0] < cfg.dim:
        log.warning(
            "fit: %d vectors support only %d whitened dims (asked %d)", n, model["proj"].shape[0], cfg.dim
        )
    return model, n


def sample_local(source: Path, feature: str, cfg: Config) -> np.ndarray:
    """Dask job: descriptors sampled uniformly per image (seeded by run seed and image id) from every
    part of a local-feature store, in store order, capped at ``bow.max_sample`` -> (n, D) float32."""
    from embedpipe.workers.classical.encode import cap_sample, sample_part

    tasks = [
        dask.delayed(sample_part)(str(p), feature, cfg.bow.sample_per_image, cfg.seed)
        for p, _ in fit_part_rows(source, cfg.fit.include_distractors)
    ]
    with dask_scheduler(cfg.fit.scheduler, cfg.fit.dask_address) as kwargs:
        blocks = list(dask.compute(*tasks, **kwargs))
    return cap_sample(blocks, cfg.bow.max_sample, cfg.seed)


def _kept_model(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The meta of the model saved at ``path`` when it was made from what ``fingerprint`` hashes (so it is
    reused), else None."""
    if not path.exists():
        return None
    meta = load_npz(path)[1]
    return meta if meta.get("fingerprint") == fingerprint else None


def _source_label(layout: RunLayout, source: Path) -> str:
    """A model's ``source`` store: this run's own by its relative path, so the file does not depend on
    where the run lives; another run's in full."""
    return str(source.relative_to(layout.root) if source.is_relative_to(layout.root) else source)


def fit_codebook(layout: RunLayout, cfg: Config, feature: str, k: int) -> dict[str, Any]:
    """Sample (Dask), seeded faiss k-means, assignment index; saved as models/codebook-<feature>-k<k>.npz
    (+ .faiss). An existing codebook with the same fingerprint is reused."""
    from embedpipe.workers.classical import codebook as cb
    from embedpipe.workers.classical.encode import (
        NOT_CODEBOOK,
        codebook_fingerprint,
        codebook_name,
        codebook_source,
    )

    source = codebook_source(layout, cfg, feature)
    fingerprint = codebook_fingerprint(cfg, feature, k, source)
    path = layout.model(codebook_name(feature, k))
    kept = _kept_model(path, fingerprint)
    if kept is not None:
        return kept
    sample = sample_local(source, feature, cfg)
    centroids = cb.train_kmeans(sample, k, cfg.bow.iterations, cfg.seed)
    index = cb.assignment_index(centroids, cfg.bow.assign_flat_max, cfg.seed)
    meta = {
        "kind": "codebook",
        "feature": feature,
        "k": k,
        "n_train": int(len(sample)),
        "source": _source_label(layout, source),
        "assignment": type(index).__name__,
        "fingerprint": fingerprint,
        "bow": cfg.bow.model_dump(mode="json", exclude=set(NOT_CODEBOOK)),
        "seed": cfg.seed,
    }
    faiss_path = layout.model(codebook_name(feature, k), ".faiss")
    save_blob(faiss_path, cb.serialize(index))
    save_npz(path, meta, centroids=centroids)
    log.info(
        "fit: codebook %s k=%d on %d sampled descriptors (%s)", feature, k, len(sample), meta["assignment"]
    )
    return meta


def fit_sampled_model(layout: RunLayout, cfg: Config, kind: str, feature: str, k: int) -> dict[str, Any]:
    """Sample (Dask, the codebooks' sample), then fit the model of ``kind``: ``fv`` the GMM
    (models/gmm-<feature>-k<k>.npz), ``temb`` the T-emb codebook and whitening
    (models/temb-<feature>-k<k>.npz). An existing model with the same fingerprint is reused."""
    from embedpipe.workers.classical.encode import codebook_source, model_name
    from embedpipe.workers.classical.models import TRAIN, sampled_fingerprint

    source = codebook_source(layout, cfg, feature)
    fingerprint = sampled_fingerprint(cfg, kind, feature, k, source)
    name = model_name(f"{kind}-{feature}", cfg)
    path = layout.model(name)
    kept = _kept_model(path, fingerprint)
    if kept is not None:
        return kept
    sample = sample_local(source, feature, cfg)
    arrays = TRAIN[kind](sample, k, cfg)
    meta = {
        "kind": {"fv": "gmm", "temb": "temb"}[kind],
        "feature": feature,
        "k": k,
        "n_train": int(len(sample)),
        "source": _source_label(layout, source),
        "fingerprint": fingerprint,
        "bow": cfg.bow.model_dump(mode="json"),
        "seed": cfg.seed,
    }
    save_npz(path, meta, **arrays)
    log.info("fit: %s on %d sampled descriptors", name, len(sample))
    return meta


def adapt_codebook(layout: RunLayout, cfg: Config, feature: str, k: int) -> dict[str, Any]:
    """Dask job: VLAD vocabulary adaptation of models/codebook-<feature>-k<k> to the indexed collection
    (this run's local-feature store): one task per part sums the descriptors assigned to each word and
    counts them, partial sums added pairwise in a tree; each word's centroid becomes the mean of its
    descriptors (a word with none keeps its centroid). Saved as models/codebook-<feature>-k<k>-adapted.npz
    (centroids, counts; ``adapted`` in its meta), reused while its fingerprint holds."""
    from embedpipe.workers.classical.encode import adapted_name, load_codebook, word_sums_part
    from embedpipe.workers.classical.models import adaptation_fingerprint
    from embedpipe.workers.descriptors.bow import adapt_centroids
    from embedpipe.workers.descriptors.local import STORED_FEATURE, local_store

    centroids, blob, codebook = load_codebook(layout, feature, k)
    source = layout.feature_dir(local_store(STORED_FEATURE[feature]))
    fingerprint = adaptation_fingerprint(codebook, source)
    path = layout.model(adapted_name(feature, k))
    kept = _kept_model(path, fingerprint)
    if kept is not None:
        return kept
    shared = dask.delayed(blob)
    level = [
        dask.delayed(word_sums_part)(str(p), feature, shared, k)
        for p, _ in fit_part_rows(source, cfg.fit.include_distractors)
    ]
    if not level:
        raise RunFailed(f"local-feature store {source} has no parts to adapt the codebook to")
    while len(level) > 1:  # same reduction as the moments: (sums, counts, n) added pairwise
        pairs = [dask.delayed(_add_moments)(a, b) for a, b in zip(level[::2], level[1::2], strict=False)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    with dask_scheduler(cfg.fit.scheduler, cfg.fit.dask_address) as kwargs:
        ((sums, counts, n),) = dask.compute(level[0], **kwargs)
    meta = {
        "kind": "codebook",
        "adapted": True,
        "codebook": codebook.get("fingerprint"),
        "feature": feature,
        "k": k,
        "n_descriptors": int(n),
        "empty_words": int((counts == 0).sum()),
        "source": _source_label(layout, source),
        "fingerprint": fingerprint,
    }
    save_npz(path, meta, centroids=adapt_centroids(centroids, sums, counts), counts=counts)
    log.info(
        "fit: codebook %s k=%d adapted to %d descriptors (%d empty words)", feature, k, n, meta["empty_words"]
    )
    return meta


def encode_descriptor(layout: RunLayout, cfg: Config, descriptor: str) -> dict[str, Any]:
    """Dask job: encode every part of the local-feature store into ``features/<descriptor>``."""
    from embedpipe.workers.classical.encode import (
        dense_dim,
        descriptor_info,
        encode_part,
        load_encoding,
        store_meta,
    )
    from embedpipe.workers.descriptors.local import STORED_DIM, STORED_FEATURE, local_store

    kind, feature, k = descriptor_info(descriptor, cfg)
    stored = STORED_FEATURE[feature]
    blob, centroids, model = load_encoding(layout, cfg, descriptor)
    source = layout.feature_dir(local_store(stored))
    out = layout.feature_dir(descriptor)
    shutil.rmtree(out, ignore_errors=True)
    meta = store_meta(descriptor, cfg, STORED_DIM[stored])
    parts = part_files(source)
    shared = (dask.delayed(blob), dask.delayed(centroids), cfg.bow, meta, dask.delayed(model))  # once each
    tasks = [
        dask.delayed(encode_part)(kind, feature, str(p), str(out), i, len(parts), *shared)
        for i, p in enumerate(parts)
    ]
    with dask_scheduler(cfg.fit.scheduler, cfg.fit.dask_address) as kwargs:
        rows = int(sum(dask.compute(*tasks, **kwargs)))
    dim = k if kind == "bow" else dense_dim(kind, centroids, model)
    write_manifest(out, {"dim": dim, "rows": rows, "n_parts": len(parts), **meta})
    log.info("fit: encoded %d images as %s (%d dims)", rows, descriptor, dim)
    return {"descriptor": descriptor, "rows": rows, "dim": dim}
