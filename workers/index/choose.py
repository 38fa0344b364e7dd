"""Index choice under a memory budget (``index.factory: auto``).

The choice is made on a bounded, seeded sample of the database: ``Q`` rows of the sample are held out as
queries and the rest is every candidate's database; the ground truth is exact inner-product search (Flat)
of those queries on that database. The protocol's queries and ground truth are never used (their rows are
kept out of the held-out queries), so the pick's mAP, computed afterwards by the normal evaluation, is
not a best-of-many test score.

Candidates are what a FAISS user would try, sized to the sample (``nlist`` a power of two near
4·sqrt(n) with at least 39 training vectors per list): exact and scalar-quantised flat indices (fp16, SQ8,
SQ4), IVF over flat, SQ8 and fp16 codes, IVF-PQ at the two largest code sizes that fit (OPQ before the
larger), HNSW over flat, SQ8 and PQ codes, and, when a scalar quantiser's full-size code does not fit,
the same after PCA to the dimensions that do. Refinement stages (``RFlat``) are left out: the index
engine's per-part fill and merge cannot build them. Each candidate within the budget is built (IVF
candidates share one k-means) and its search parameter swept (``nprobe`` in powers of two up to
``nlist``, ``efSearch`` 16..512); a row per setting gives recall@k, search work, QPS (every FAISS thread,
best of two timed passes; reported, not used), bytes per vector and build time.

Search work (``search_work``) is what a query reads, counted by FAISS's search statistics: each code it
compares (PQ code bytes ``PQ_LOOKUP`` times: a table lookup each), HNSW's links of each node visited, and
the bytes a matrix product reads for the whole query batch (coarse centroids, codebooks, transforms, an
exact Flat database) at 1 / ``MATRIX_REUSE``. Counts, not timings, so the pick is the same on every run
and machine; timed picks changed between two runs on a loaded host.

Pick: among settings within the budget that reach the target recall, the least search work; settings
within ``WORK_TIE`` of it count as tied, and of those the fewest bytes per vector wins, then the higher
recall, then the name. When none reaches the target, the highest recall within the budget (with a
warning).

Bytes per vector are what each vector adds to the index: its code, its 8-byte id (IVF lists keep ids;
other indices are wrapped in ``IndexIDMap2`` as the pipeline builds them) and, for HNSW, its link slots,
level and offset. Fixed costs (the serialized empty trained index: centroids, codebooks, transforms) are
reported apart.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import faiss
import numpy as np

from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.index import ann

log = logging.getLogger("embedpipe.index")

SAMPLE_ROWS = 50_000  # the choice never looks at more database rows than this (nor than index.train_size)
HELD_OUT = 1_000  # sample rows held out as queries (a fifth of the sample when smaller)
PER_LIST = 39  # training vectors per k-means centroid (FAISS's minimum without a warning)
EFSEARCH = (16, 32, 64, 128, 256, 512)
MATRIX_REUSE = 16  # a matrix product's byte serves the whole query batch: counted 1/16 of a scanned byte
PQ_LOOKUP = 4  # a PQ code byte is a table lookup: counted as 4 scanned bytes
TIMED_PASSES = 2  # timed searches of the held-out queries per setting (the faster one gives QPS)
WORK_TIE = 4 / 3  # settings within this factor of the least search work count as tied
PRUNE = 2.0  # a sweep stops once its work exceeds this factor of the least work already at the target
SATURATED = 0.002  # a sweep stops when doubling the parameter gains less recall than this
OPQ_NITER, OPQ_POINTS = 10, 16_384  # the choice trains OPQ rotations briefly (FAISS: 50 on 65,536)
RECALL = "k-recall@k: mean fraction of the exact top k found in the returned top k"


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` database vectors: the power of two nearest 4·sqrt(n), at least 4, halved
    until every list has PER_LIST training vectors."""
    nlist = 2 ** max(2, round(math.log2(4 * math.sqrt(max(n, 1)))))
    while nlist > 4 and n < PER_LIST * nlist:
        nlist //= 2
    return nlist


def pq_sizes(dim: int, budget: int, count: int = 2) -> list[int]:
    """Up to ``count`` PQ sizes (bytes of code, largest first) whose code plus id fits ``budget``, with
    sub-vectors of at least 8 dimensions (smaller ones take FAISS's k-means many times longer to train)."""
    fit = [m for m in (256, 128, 64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 8 and m + 8 <= budget]
    return fit[:count]


def pq_bits(n: int) -> int:
    """Bits per PQ sub-quantizer ``n`` training vectors can train (256 or 16 centroids; 0: none)."""
    return 8 if n >= PER_LIST * 256 else 4 if n >= PER_LIST * 16 else 0


def pca_dim(dim: int, n: int, code_bytes: float, per_dim: float) -> int | None:
    """PCA output size for a code of at most ``code_bytes`` at ``per_dim`` bytes a dimension: a multiple
    of 8, below ``dim`` and below the ``n`` training vectors; None when under 8."""
    out = min(int(code_bytes / per_dim), dim - 1, n - 1) // 8 * 8
    return out if out >= 8 else None


def auto_candidates(dim: int, n: int, budget: int = 2**31) -> list[str]:
    """The factory strings tried for ``n`` ``dim``-dimensional database vectors under ``budget`` bytes per
    vector (an 8-byte id included), cheapest to search first. Those whose estimated bytes exceed the
    budget are kept (the table lists them, unbuilt). A scalar quantiser whose full-size code does not fit
    is also tried after PCA to the dimensions that fit (IVF too for SQ8)."""
    nlist = nlist_for(n)
    ivf = f"IVF{nlist}"
    bits = pq_bits(n)
    code = budget - 8
    out = [f"{ivf},SQ8", f"{ivf},SQfp16", f"{ivf},Flat"]
    pca8 = pca_dim(dim, n, code, 1) if dim > code else None
    if pca8:
        out.append(f"PCA{pca8},{ivf},SQ8")
    for i, m in enumerate(pq_sizes(dim, budget) if bits else []):
        pq = f"PQ{m}" if bits == 8 else f"PQ{m}x4"
        out += [f"{ivf},{pq}"] + ([f"OPQ{m},{ivf},{pq}"] if i == 0 else [])
    for codec, per_dim in (("SQ8", 1), ("SQ4", 0.5), ("SQfp16", 2)):
        reduced = pca_dim(dim, n, code, per_dim) if dim * per_dim > code else None
        out += [codec] + ([f"PCA{reduced},{codec}"] if reduced else [])
    out += ["Flat", "HNSW32", "HNSW32,SQ8"]
    hnsw = 8 + 4 * 2 * 32 + 12  # id, level-0 links, level and offset
    for m in pq_sizes(dim, budget - hnsw, 1) if bits == 8 else []:
        out.append(f"HNSW32,PQ{m}")
    return out


def estimated_bytes(factory: str, dim: int) -> int:
    """Bytes per vector before building: code, 8-byte id, HNSW level-0 links, level and offset."""
    index = ann.make_index(factory, dim)
    ivf = ann._ivf(index)
    base = ann._base(index)
    if ivf is not None:
        return int(ivf.code_size) + 8
    if isinstance(base, faiss.IndexHNSW):
        links = 4 * int(base.hnsw.nb_neighbors(0))
        return int(faiss.downcast_index(base.storage).sa_code_size()) + 8 + links + 12
    return int(base.sa_code_size()) + 8


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: mean fraction of the exact top-k found in the returned top-k."""
    return float(np.mean([np.intersect1d(f[:k], t[:k]).size / k for f, t in zip(found, truth, strict=True)]))


def split_sample(
    n: int, max_rows: int, seed: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (sorted) of the sample's database and of its held-out queries: a seeded sample of
    at most ``max_rows`` of ``n`` rows, HELD_OUT of them (a fifth when fewer) held out as queries, never
    one of the rows ``exclude`` (e.g. the protocol's queries)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(n, max_rows), replace=False)) if n > max_rows else np.arange(n)
    allowed = rows if exclude is None else np.setdiff1d(rows, exclude)
    n_queries = min(HELD_OUT, max(1, len(rows) // 5), len(allowed))
    if len(rows) - n_queries < 1:
        raise InputError(f"index auto needs at least 2 vectors, got {n}")
    queries = np.sort(rng.choice(allowed, n_queries, replace=False))
    return np.setdiff1d(rows, queries), queries


def serialized_size(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def vector_bytes(index: faiss.Index) -> float:
    """What each vector adds to the index: its code, its 8-byte id (IVF lists keep ids; other indices sit
    in ``IndexIDMap2``) and, for HNSW, its link slots on every level (4 bytes each), level and offset."""
    ivf = ann._ivf(index)
    if ivf is not None:
        return float(ivf.code_size + 8)
    base = ann._base(index)
    if isinstance(base, faiss.IndexHNSW):
        links = 4 * base.hnsw.neighbors.size() / max(base.ntotal, 1)
        return code_bytes(index) + 8 + links + 4 + 8
    return float(base.sa_code_size() + 8)


class _Coarse:
    """IVF coarse centroids shared by the IVF candidates over the same vectors: one k-means per sample.
    OPQ candidates get them rotated by their own (orthogonal) OPQ matrix, which is what k-means on the
    rotated vectors finds, from the same seeded start."""

    def __init__(self) -> None:
        self.centroids: dict[tuple[int, int], np.ndarray] = {}

    def train(self, index: faiss.Index, x: np.ndarray) -> None:
        ivf = ann._ivf(index)
        if ivf is None:
            index.train(x)
            return
        key = (ivf.nlist, x.shape[1])
        outer = faiss.downcast_index(index)
        if not isinstance(outer, faiss.IndexPreTransform):
            if key in self.centroids:
                ivf.quantizer.add(self.centroids[key])
            index.train(x)
            self.centroids.setdefault(key, ivf.quantizer.reconstruct_n(0, ivf.nlist))
            return
        chain = [faiss.downcast_VectorTransform(outer.chain.at(i)) for i in range(outer.chain.size())]
        if len(chain) == 1 and isinstance(chain[0], faiss.OPQMatrix):
            chain[0].niter, chain[0].max_train_points = OPQ_NITER, OPQ_POINTS
            if key in self.centroids:
                chain[0].train(x)
                ivf.quantizer.add(chain[0].apply(self.centroids[key]))
        index.train(x)


def build(factory: str, x: np.ndarray, seed: int, coarse: _Coarse) -> tuple[faiss.Index, int]:
    """``factory`` trained on and filled with ``x`` (ids 0..n-1; non-IVF indices in ``IndexIDMap2``, as
    the pipeline builds them); also its serialized size empty (the fixed bytes). Seeded like the
    pipeline's build; PQ codes under HNSW skip polysemous training (unused by search)."""
    index = ann.make_index(factory, x.shape[1])
    if ann._ivf(index) is None:
        index = ann.make_index(f"IDMap2,{factory}", x.shape[1])
    ann._seed(index, seed)
    base = ann._base(index)
    if isinstance(base, faiss.IndexHNSWPQ):
        faiss.downcast_index(base.storage).do_polysemous_training = False
    if not index.is_trained:
        coarse.train(index, x)
    fixed = serialized_size(index)
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    return index, fixed


def code_bytes(index: faiss.Index) -> int:
    """The code of one vector, as FAISS reports it (HNSW: its storage's code, without the links)."""
    base = ann._base(index)
    if isinstance(base, faiss.IndexHNSW) and ann._ivf(index) is None:
        return int(faiss.downcast_index(base.storage).sa_code_size())
    return ann.bytes_per_vector(index)


def _param(index: faiss.Index) -> tuple[str | None, list[int]]:
    ivf = ann._ivf(index)
    if ivf is not None:
        return "nprobe", [2**i for i in range(int(math.log2(ivf.nlist)) + 1)]
    if isinstance(ann._base(index), faiss.IndexHNSW):
        return "efsearch", list(EFSEARCH)
    return None, [0]


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, float]:
    """Top-k ids of every query, and the queries per second of the faster of two passes."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        best = math.inf
        for _ in range(TIMED_PASSES):
            start = time.perf_counter()
            found = index.search(queries, k)[1]
            best = min(best, time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(before)
    return found, len(queries) / max(best, 1e-9)


def search_work(index: faiss.Index, nq: int, fixed: int) -> float:
    """Work per query of the ``nq`` queries searched since FAISS's search statistics were reset (counts,
    not timings: the same on every run, machine and thread count), in bytes of codes scanned:

    - each code compared: inverted-list entries scanned, HNSW distance computations, every code of a
      scalar-quantised flat index; a PQ code's bytes count PQ_LOOKUP times (a table lookup each);
    - HNSW: the level-0 link list of each node visited;
    - what a matrix product reads for the whole query batch (coarse centroids, codebooks, transforms:
      the trained index's fixed bytes; the database of an exact Flat index) counts 1 / MATRIX_REUSE.
    """
    base = ann._base(index)
    per_code = code_bytes(index) * (PQ_LOOKUP if _is_pq(index) else 1)
    matrix = fixed / MATRIX_REUSE
    if ann._ivf(index) is not None:
        return matrix + faiss.cvar.indexIVF_stats.ndis / nq * per_code
    if isinstance(base, faiss.IndexHNSW):
        stats = faiss.cvar.hnsw_stats
        links = 4 * int(base.hnsw.nb_neighbors(0))
        return matrix + (stats.ndis * per_code + stats.nhops * links) / nq
    if isinstance(base, faiss.IndexFlat):
        return matrix + index.ntotal * per_code / MATRIX_REUSE
    return matrix + index.ntotal * per_code


def _is_pq(index: faiss.Index) -> bool:
    ivf = ann._ivf(index)
    base = ann._base(index)
    if ivf is None and isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    inner = ivf if ivf is not None else base
    return isinstance(inner, (faiss.IndexIVFPQ, faiss.IndexPQ))


def measure(
    factory: str,
    db: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    target: float,
    seed: int,
    least_work: float,
    coarse: _Coarse,
    threads: int,
) -> list[dict[str, Any]]:
    """Build one candidate on ``db`` and sweep its search parameter upwards; one row per setting. The
    sweep stops at the first setting that reaches ``target``, when recall stops growing, or when it is
    its search work exceeds PRUNE × ``least_work`` (the least at the target so far) without reaching it."""
    start = time.perf_counter()
    index, fixed = build(factory, db, seed, coarse)
    build_s = time.perf_counter() - start
    added = vector_bytes(index)
    name, values = _param(index)
    rows: list[dict[str, Any]] = []
    for value in values:
        if name:
            ann.set_search_params(index, value, value)
        faiss.cvar.indexIVF_stats.reset()
        faiss.cvar.hnsw_stats.reset()
        found, qps = timed_search(index, queries, k, threads)
        cost = search_work(index, TIMED_PASSES * len(queries), fixed)
        recall = round(recall_at_k(found, truth, k), 4)
        row = {
            "index": factory,
            "param": name,
            "value": value if name else None,
            "recall": recall,
            "qps": round(qps, 1),
            "search_work": round(cost),
            "bytes_per_vector": round(added, 1),
            "code_bytes": code_bytes(index),
            "fixed_bytes": fixed,
            "build_s": round(build_s, 3),
            "reaches_target": recall >= target,
        }
        rows.append(row)
        if recall >= target or value == values[-1]:
            break
        if len(rows) >= 3 and recall - rows[-2]["recall"] < SATURATED:
            row["note"] = "sweep stopped: recall saturated"
            break
        if cost > PRUNE * least_work:
            row["note"] = "sweep stopped: more work than the best setting at the target"
            break
    return rows


def _pick(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [r for r in rows if r["fits_budget"] and r["reaches_target"]]
    if good:
        least = min(r["search_work"] for r in good)
        tied = [r for r in good if r["search_work"] <= WORK_TIE * least]
        return min(tied, key=lambda r: (r["bytes_per_vector"], -r["recall"], r["index"], r["value"] or 0))
    fits = [r for r in rows if r["fits_budget"] and "recall" in r]
    if not fits:
        return None
    return max(fits, key=lambda r: (r["recall"], -r["search_work"], -r["bytes_per_vector"], r["index"]))


def choose_index(
    x: Any,
    budget: int,
    target: float,
    k: int = 10,
    seed: int = 0,
    max_rows: int = SAMPLE_ROWS,
    exclude: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pick (a row: ``index``, ``param``, ``value``, ``recall``, ``qps``, ``bytes_per_vector``, …) and
    the whole table (settings, the sample it was chosen on, every row). ``budget``: bytes per vector;
    ``target``: recall@k to reach; ``max_rows``: the sample's size cap (SAMPLE_ROWS at most); ``exclude``:
    rows never used as held-out queries. ``x``: the vectors, an array or rows read by position
    (``x[positions]``, e.g. ``StoreRows``): only the sample's rows are read."""
    started = time.perf_counter()
    n_all = len(x)
    db_rows, query_rows = split_sample(n_all, min(max_rows, SAMPLE_ROWS), seed, exclude)
    db, queries = (np.ascontiguousarray(np.asarray(x[r], np.float32)) for r in (db_rows, query_rows))
    dim, n = db.shape[1], len(db)
    k = min(k, n)
    threads = faiss.omp_get_max_threads()
    exact = faiss.IndexFlatIP(dim)
    exact.add(db)
    truth = exact.search(queries, k)[1]
    rows: list[dict[str, Any]] = []
    coarse = _Coarse()
    least_work = math.inf
    for factory in auto_candidates(dim, n, budget):
        try:
            estimate = estimated_bytes(factory, dim)
        except InputError as err:
            log.info("index auto: %s skipped (%s)", factory, err)
            continue
        if estimate > budget:
            rows.append(
                {"index": factory, "bytes_per_vector": estimate, "fits_budget": False, "note": "not built"}
            )
            continue
        try:
            measured = measure(factory, db, queries, truth, k, target, seed, least_work, coarse, threads)
        except (InputError, RuntimeError) as err:
            log.info("index auto: %s skipped (%s)", factory, ann._first_line(err))
            continue
        for row in measured:
            row["fits_budget"] = row["bytes_per_vector"] <= budget
            if row["fits_budget"] and row["reaches_target"]:
                least_work = min(least_work, row["search_work"])
        rows += measured
        log.debug(
            "index auto: %s built in %.1f s, %d settings, best recall %.3f",
            factory,
            measured[0]["build_s"],
            len(measured),
            max(r["recall"] for r in measured),
        )
    pick = _pick(rows)
    if pick is None:
        raise InputError(f"no index candidate fits index.budget_bytes_per_vector={budget}")
    if not pick["reaches_target"]:
        log.warning(
            "index auto: no candidate within budget reaches recall %.2f; best is %.3f", target, pick["recall"]
        )
    for r in rows:
        r["picked"] = r is pick
    seconds = time.perf_counter() - started
    log.info(
        "index auto: picked %s%s (%.1f bytes/vector, recall@%d %.3f, %.0f QPS) among %d candidates in %.1f s",
        pick["index"],
        f" {pick['param']}={pick['value']}" if pick["param"] else "",
        pick["bytes_per_vector"],
        k,
        pick["recall"],
        pick["qps"],
        len({r["index"] for r in rows}),
        seconds,
    )
    table = {
        "chosen_on": f"a seeded sample of {n} database vectors, {len(queries)} held-out sample queries "
        f"(of {n_all} vectors; seed {seed}); never the evaluated queries or their ground truth",
        "ground_truth": "exact inner-product search (Flat) of the held-out queries on the sample database",
        "recall": f"recall = {RECALL}, k = {k}",
        "bytes": "bytes_per_vector: what each vector adds (code, 8-byte id, HNSW link slots, level and "
        "offset); code_bytes: the code alone; fixed_bytes: the serialized empty trained index (centroids, "
        "codebooks, transforms)",
        "criterion": "within the budget and reaching the target recall, the least search_work (bytes of "
        f"code a query scans, counted by FAISS; matrix-product bytes count 1/{MATRIX_REUSE}, PQ code bytes "
        f"{PQ_LOOKUP}x); settings within {WORK_TIE:.3g}x of it tie, then fewest bytes per vector, higher "
        "recall, name; without one reaching the target, the highest recall. Counts, not timings: the same "
        f"pick on every run and machine. qps ({threads} threads, best of {TIMED_PASSES} passes) is "
        "reported, not used",
        "budget_bytes_per_vector": budget,
        "target_recall": target,
        "sample": {"database": n, "queries": len(queries), "of": n_all, "seed": seed, "dim": dim},
        "threads": threads,
        "choice_s": round(seconds, 3),
        "pick": {
            key: pick[key]
            for key in ("index", "param", "value", "recall", "search_work", "qps", "bytes_per_vector")
        },
        "rows": rows,
    }
    return pick, table
