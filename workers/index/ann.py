"""FAISS indices from factory strings: build, train once, fill per shard, merge, search.

Vectors are L2-normalised, so inner product = cosine; LSH (binary codes, Hamming distance) is built
with the L2 metric, which ranks normalised vectors the same way. Database vectors carry the feature
store's row numbers as FAISS ids: index types without their own id storage (Flat, PQ, LSH, HNSW, …)
are wrapped in ``IndexIDMap2``; IVF indices store ids in their inverted lists.

Sharded build (faiss contrib style): ``train_index`` once on a sample, ``serialize`` the empty trained
index, ``fill`` one copy per shard with that shard's rows and ids, then ``merge`` the copies in shard
order; the result equals a single-process build that adds the rows in the same order.

Layouts of a built index: one merged index; the IVF lists of every shard merged into one on-disk file
(``write_ondisk``, faiss's ``OnDiskInvertedLists``; the ``.ivfdata`` file next to the index file); or
the shard indices kept apart and searched together (``storage.index_folder.shards_of``, a
``faiss.IndexShards`` that keeps each shard's ids and merges the per-shard top-k). Index files and version
folders are written and read by ``storage.index_folder``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.index_folder import write_index

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import IndexConfig

log = logging.getLogger("embedpipe.index")

# below this many vectors (or query x database pairs) FAISS runs on one thread: OpenMP start-up and
# spinning cost more than they save on small problems, and much more on a busy machine
SMALL_WORK = 20_000

ONDISK_NEEDS_IVF = "index.layout 'ondisk' needs an IVF factory (e.g. IVF1024,PQ32): its lists go on disk"

# a dimension divisible by every usual PQ/PCA/OPQ size, used to check a factory string's syntax
CHECK_DIM = 3840


@contextlib.contextmanager
def threads_for(work: int) -> Iterator[None]:
    """One FAISS thread for small problems (``work`` < SMALL_WORK), the default otherwise."""
    before = faiss.omp_get_max_threads()
    if work < SMALL_WORK:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def metric_for(factory: str) -> int:
    return faiss.METRIC_L2 if "LSH" in factory else faiss.METRIC_INNER_PRODUCT


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return text.split(": ", 1)[-1] if "Error in" in text else text


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index from ``factory`` for ``dim``-dimensional vectors; a bad string is one InputError."""
    try:
        return faiss.index_factory(int(dim), factory, metric_for(factory))
    except RuntimeError as err:
        raise InputError(f"bad index factory '{factory}' for {dim}-dim vectors: {_first_line(err)}") from None


def check_factory(factory: str) -> str:
    """Validate a factory string by building it (config time: the real dimension is not known yet)."""
    make_index(factory, CHECK_DIM)
    return factory


def check_index_config(index: IndexConfig) -> None:
    """The index section checked at start, before any engine starts: the factory string builds, and the
    on-disk layout has an IVF factory. Each problem is one ``InputError`` line."""
    if index.factory == "auto":
        return
    try:
        check_factory(index.factory)
    except InputError as err:
        raise InputError(f"bad config value for 'index.factory': {err}") from None
    if index.layout == "ondisk" and not is_ivf(index.factory):
        raise InputError(f"bad config value for 'index.layout': {ONDISK_NEEDS_IVF}")


def is_ivf(factory: str) -> bool:
    """Whether ``factory`` builds an inverted-file index."""
    return _ivf(make_index(factory, CHECK_DIM)) is not None


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def _base(index: faiss.Index) -> faiss.Index:
    """The index under the id map and the pre-transforms (PCA, OPQ, …)."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def is_mergeable(index: faiss.Index) -> bool:
    """HNSW graphs cannot be merged: their shards are filled in one index instead."""
    return not isinstance(_base(index), faiss.IndexHNSW)


def _seed(index: faiss.Index, seed: int) -> None:
    """Seed every k-means the training will run (coarse quantizer, product quantizers). Flat PQ skips
    polysemous training: it only serves Hamming-filtered search, which we do not use, and is slow."""
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf.cp.min_points_per_centroid = 1  # small samples are reported once, by train_index
    base = _base(index)
    for owner in (base, ivf):
        if hasattr(owner, "do_polysemous_training"):  # IndexPQ, IndexIVFPQ
            owner.do_polysemous_training = False
    for owner in (base, ivf):
        if owner is not None and hasattr(owner, "pq"):
            owner.pq.cp.seed = seed
            owner.pq.cp.min_points_per_centroid = 1
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        outer = faiss.downcast_index(outer.index)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            vt = faiss.downcast_VectorTransform(outer.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix) and vt.pq is not None:
                vt.pq.cp.seed = seed


def _centroids(index: faiss.Index) -> int:
    """The largest k-means the training runs (IVF lists or PQ centroids); 0 when there is none."""
    ivf = _ivf(index)
    base = _base(index)
    sizes = [ivf.nlist] if ivf is not None else []
    sizes += [o.pq.ksub for o in (base, ivf) if o is not None and hasattr(o, "pq")]
    return max(sizes, default=0)


def _flat(dim: int, metric: int) -> faiss.Index:
    return faiss.IndexFlatIP(dim) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)


def _kmeans(x: np.ndarray, k: int, cp: faiss.ClusteringParameters, metric: int, seed: int) -> np.ndarray:
    """``k`` centroids of ``x`` by FAISS's k-means with ``cp`` (an IVF's own parameters) and ``seed``,
    points assigned by exact search under ``metric``: what an IVF with a flat quantiser trains."""
    dim = x.shape[1]
    clustering = faiss.Clustering(dim, int(k), cp)
    clustering.seed = seed
    clustering.train(x, _flat(dim, metric))
    return faiss.vector_to_array(clustering.centroids).reshape(int(k), dim)


def two_level_centroids(x: np.ndarray, nlist: int, cp: faiss.ClusteringParameters, metric: int) -> np.ndarray:
    """``nlist`` coarse centroids of ``x`` in two levels (FAISS's two-level clustering, rebalanced):
    k-means of about sqrt(nlist) clusters, then each cluster's rows split into lists in proportion to
    its size. About n x 2 sqrt(nlist) distance computations per iteration instead of n x nlist; needs
    ``len(x) >= 2 * nlist`` (so that no cluster gets more lists than rows). Seeded by ``cp.seed``."""
    top_k = max(2, int(round(np.sqrt(nlist))))
    top = _kmeans(x, top_k, cp, metric, cp.seed)
    flat = _flat(x.shape[1], metric)
    flat.add(top)
    assign = flat.search(x, 1)[1].ravel()
    sizes = np.bincount(assign, minlength=top_k)
    ends = np.cumsum(sizes) * nlist // len(x)
    lists = np.diff(ends, prepend=0)  # at most ceil(size / 2) each, as len(x) >= 2 * nlist
    order, starts = np.argsort(assign, kind="stable"), np.concatenate([[0], np.cumsum(sizes)])
    out = [
        _kmeans(x[order[starts[c] : starts[c + 1]]], lists[c], cp, metric, cp.seed + 1 + c)
        for c in range(top_k)
        if lists[c]
    ]
    return np.concatenate(out)


def _train_coarse(ivf: faiss.IndexIVF, sample: np.ndarray, two_level_nlist: int) -> None:
    """Train ``ivf``'s coarse quantiser here where FAISS's own training would not do: an HNSW quantiser
    (k-means assigns with exact search, and the centroids are added to the graph on one thread, so the
    graph, and with it every list assignment, is the same run to run), or ``nlist`` of at least
    ``two_level_nlist`` (``two_level_centroids``). A flat quantiser below it trains as FAISS does."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    hnsw = isinstance(quantizer, faiss.IndexHNSW)
    two_level = 0 < two_level_nlist <= ivf.nlist and len(sample) >= 2 * ivf.nlist
    if not (hnsw or two_level) or quantizer.ntotal or len(sample) < ivf.nlist:
        return
    if two_level:
        centroids = two_level_centroids(sample, ivf.nlist, ivf.cp, ivf.metric_type)
    else:
        centroids = _kmeans(sample, ivf.nlist, ivf.cp, ivf.metric_type, ivf.cp.seed)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if hnsw else before)
    try:
        quantizer.train(centroids)
        quantizer.add(centroids)
    finally:
        faiss.omp_set_num_threads(before)


def train_index(factory: str, sample: np.ndarray, seed: int = 0, two_level_nlist: int = 0) -> faiss.Index:
    """An empty index trained on ``sample`` (n, dim), ready for ``add_with_ids``. An IVF of at least
    ``two_level_nlist`` lists (0: never) trains its coarse quantiser in two levels; see ``_train_coarse``
    for HNSW quantisers."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = make_index(factory, sample.shape[1])
    if _ivf(index) is None:
        index = make_index(f"IDMap2,{factory}", sample.shape[1])
    _seed(index, seed)
    centroids = max(_centroids(index), 1)
    if not index.is_trained and len(sample) < 39 * centroids:
        log.warning(
            "index %s: %d training vectors for k-means of %d centroids (39 per centroid recommended)",
            factory,
            len(sample),
            centroids,
        )
    if not index.is_trained:
        try:
            _train(index, sample, two_level_nlist)
        except RuntimeError as err:
            raise InputError(
                f"index '{factory}' cannot be trained on {len(sample)} vectors: {_first_line(err)}"
            ) from None
    return index


def _train(index: faiss.Index, sample: np.ndarray, two_level_nlist: int) -> None:
    """``index.train(sample)``, an IVF's coarse quantiser first trained by ``_train_coarse`` (after
    the pre-transforms, trained in turn on the sample as FAISS trains them)."""
    outer = faiss.downcast_index(index)
    ivf = _ivf(index)
    if ivf is None:
        index.train(sample)
        return
    if isinstance(outer, faiss.IndexPreTransform):
        x = sample
        for i in range(outer.chain.size()):
            transform = outer.chain.at(i)
            if not transform.is_trained:
                transform.train(x)
            x = transform.apply(x)
        _train_coarse(ivf, x, two_level_nlist)
    else:
        _train_coarse(ivf, sample, two_level_nlist)
    index.train(sample)


def serialize(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def deserialize(blob: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))


def fill(trained: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """A copy of the trained empty index (serialised) with ``vectors`` (n, dim) added under ``ids`` (n,)."""
    index = deserialize(trained)
    if len(vectors):
        with threads_for(len(vectors)):
            index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
    return index


def merge(parts: list[faiss.Index]) -> faiss.Index:
    """Merge shard indices in order into the first one (codes and ids appended, lists kept sorted by
    shard). HNSW cannot merge; use ``fill`` on the gathered vectors instead."""
    merged = parts[0]
    for other in parts[1:]:
        if other.ntotal:
            merged.merge_from(other, 0)
    return merged


def build_index(
    vectors: np.ndarray, factory: str = "Flat", seed: int = 0, two_level_nlist: int = 0
) -> faiss.Index:
    """In-memory build: train on ``vectors`` and add them with ids 0..n-1."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    with threads_for(len(x)):
        trained = train_index(factory, x, seed, two_level_nlist)
        return fill(serialize(trained), x, np.arange(len(x), dtype=np.int64))


def members(index: faiss.Index) -> list[faiss.Index]:
    """The shards of an ``IndexShards``, or the index itself."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


def write_ondisk(parts: list[faiss.Index], path: Path, ivfdata: Path) -> None:
    """Merge the inverted lists of the filled IVF shard indices ``parts`` (same trained index, shard
    order) into one on-disk file ``ivfdata`` and write the index that reads them to ``path``. Lists keep
    the shard order, so the result searches like ``merge(parts)``."""
    ivfs = [_ivf(p) for p in parts]
    if any(ivf is None for ivf in ivfs):
        raise InputError(ONDISK_NEEDS_IVF)
    out = deserialize(serialize(parts[0]))
    out.reset()  # trained, empty; the lists come from every shard
    out_ivf = _ivf(out)
    lists = faiss.OnDiskInvertedLists(out_ivf.nlist, out_ivf.code_size, str(ivfdata))
    sources = faiss.InvertedListsPtrVector()
    for ivf in ivfs:
        sources.push_back(ivf.invlists)
    ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False)
    out_ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by out_ivf now
    out.ntotal = out_ivf.ntotal = ntotal
    write_index(out, path)


def set_search_params(index: faiss.Index, nprobe: int, efsearch: int) -> None:
    """nprobe for IVF indices, efSearch for HNSW (every shard of an ``IndexShards``); other index types
    have neither."""
    if isinstance(index, faiss.IndexShards):
        for part in members(index):
            set_search_params(part, nprobe, efsearch)
        return
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
        set_quantizer_search(ivf, efsearch)
    base = _base(index)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = efsearch


def set_quantizer_search(ivf: faiss.IndexIVF, efsearch: int) -> None:
    """An HNSW coarse quantiser searches with efSearch ``efsearch``, and never fewer than the lists
    probed (``ivf.nprobe``)."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(int(efsearch), int(ivf.nprobe))


def bytes_per_vector(index: faiss.Index) -> int:
    """Storage of one database vector in the index: its code (HNSW: plus its level-0 links; ids and
    IVF list overhead not counted)."""
    index = members(index)[0]
    ivf = _ivf(index)
    if ivf is not None:
        return int(ivf.code_size)
    base = _base(index)
    if isinstance(base, faiss.IndexHNSW):
        return int(faiss.downcast_index(base.storage).code_size) + 4 * int(base.hnsw.nb_neighbors(0))
    if isinstance(base, faiss.IndexFlatCodes):
        return int(base.code_size)
    return int(base.sa_code_size())


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove the vectors with these ids; returns how many were removed."""
    if not is_mergeable(index):
        raise InputError("HNSW indices do not support removal; rebuild the index instead")
    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64))))


def search(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, database ids) per query, best first; -1 pads where the index returns fewer.
    ``allowed`` (ids): search among those alone, with the index's own nprobe/efSearch, as though the
    others were not there (FAISS ID selectors; a full ranking filtered where an index type has none)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if allowed is not None and not isinstance(index, faiss.Index):  # a wrapper with its own ids
        return index.search(queries, k, allowed)
    if allowed is None:
        with threads_for(len(queries) * index.ntotal):
            return index.search(queries, min(k, index.ntotal))
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    k = min(k, len(allowed))
    selector = faiss.IDSelectorBatch(allowed)
    params = _search_params(index, selector)
    with threads_for(len(queries) * index.ntotal):
        try:
            return index.search(queries, k, params=params)
        except RuntimeError:  # no selector support (e.g. LSH): the whole ranking, filtered
            scores, ids = index.search(queries, index.ntotal)
    keep = np.isin(ids, allowed)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _search_params(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters of ``index``'s type (every shard's alike) carrying ``selector`` and the index's
    own nprobe / efSearch (a parameter object's defaults would replace them)."""
    first = members(index)[0]
    ivf, base = _ivf(first), _base(first)
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = ivf.nprobe
    elif isinstance(base, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = base.hnsw.efSearch
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    params.keep_selector = selector  # the Python object lives as long as the parameters
    return params


def codes_of(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, codes) of an index in storage order (inverted list by list for IVF): for comparing two
    builds code for code."""
    if isinstance(index, faiss.IndexShards):
        got = [codes_of(part) for part in members(index)]
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    ivf = _ivf(index)
    if ivf is not None:
        invlists = ivf.invlists
        ids, codes = [], []
        for lst in range(ivf.nlist):
            n = invlists.list_size(lst)
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            codes.append(faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size).copy())
        return np.concatenate(ids), np.concatenate(codes)
    outer = faiss.downcast_index(index)
    ids = faiss.vector_to_array(outer.id_map) if hasattr(outer, "id_map") else np.arange(index.ntotal)
    base = _base(index)
    if isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    return ids, faiss.vector_to_array(base.codes)
