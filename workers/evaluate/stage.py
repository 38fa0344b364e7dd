"""Index and evaluate one descriptor: raw and PCA-whitened variants, exact search, protocol mAP."""

from __future__ import annotations

import functools
import json
import logging
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa

from embedpipe.storage import index_versions
from embedpipe.storage.artifacts import load_npz, save_npy, save_npz
from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.storage.contracts.layout import RunLayout, write_json_atomic
from embedpipe.storage.features import read_features, read_store_manifest
from embedpipe.storage.index_folder import index_layout
from embedpipe.workers.descriptors.local import is_classical
from embedpipe.workers.evaluate.database import read_database
from embedpipe.workers.evaluate.dba_parts import DBA_DIR, augment_sharded
from embedpipe.workers.evaluate.metrics import (
    compute_map,
    few_shot_accuracy,
    few_shot_classes,
    ns_score,
    precision_at_k,
)
from embedpipe.workers.evaluate.probes import linear_probe_scores
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.evaluate.rerank import (
    alpha_qe,
    dba,
    drop_excluded,
    merge_neighbours,
    pair_similarities,
)
from embedpipe.workers.evaluate.search import ShardedIndex, StoreRows
from embedpipe.workers.extract.reference import reference_stores
from embedpipe.workers.extract.runtimes import run_record
from embedpipe.workers.fit.whitening import apply_whitening, learned_whitening_file, subspace_drift
from embedpipe.workers.index.ann import build_index, bytes_per_vector, make_index, search, set_search_params
from embedpipe.workers.index.build import (
    StoreOrderIndex,
    Transform,
    new_rows,
    publish_store_index,
    store_keys,
    update_store_index,
)
from embedpipe.workers.index.choose import choose_index

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, RerankConfig

log = logging.getLogger("embedpipe.evaluate")
KAPPAS = (1, 5, 10)
SHOTS = (1, 5, 10)


def ranking_depth(cfg: Config, n_database: int) -> int:
    """Results ranked per query: ``eval.top_k``, or (0) the whole database up to ``FULL_RANKING_MAX``
    rows and ``AUTO_TOP_K`` beyond."""
    k = cfg.eval.top_k or (n_database if n_database <= FULL_RANKING_MAX else AUTO_TOP_K)
    return max(1, min(k, n_database))


def query_vectors(layout: RunLayout, cfg: Config, descriptor: str, gt: GroundTruth) -> dict[str, np.ndarray]:
    """External (box-cropped) queries' vectors per post-processing; empty when queries are database rows."""
    if not gt.query_keys:
        return {}
    _, vectors = read_features(layout.query_dir(descriptor))
    if len(vectors) != len(gt.queries):
        raise RunFailed(f"{descriptor}: {len(vectors)} query descriptors for {len(gt.queries)} queries")
    return dict(variants(layout, cfg, descriptor, vectors))


THIS_COLLECTION = "this collection"
# eval.top_k 0: whole rankings up to this many database rows (every collection the tests and the demo
# use), the top 1,000 beyond, as revisitop ranks R1M
FULL_RANKING_MAX = 100_000
AUTO_TOP_K = 1000


def provenance(cfg: Config, descriptor: str, post: str, factory: str, dim: int) -> dict[str, Any]:
    """Where a result row's learned models were fitted: ``models`` maps each (``whitening``, ``index``: a
    trained quantiser such as IVF or PQ, ``codebook``) to ``"this collection"`` or the run or folder it was
    learnt on (``fit.from_run``, ``bow.codebook_from``); ``fitted_on`` is ``"this collection"`` when any
    of them was fitted on the evaluated collection (transductive: its queries included), else their
    sources, and null when the row uses no learned model. The document frequencies of BoW rows are
    statistics of the indexed database, as in any inverted file, and not counted."""
    models: dict[str, str] = {}
    if is_classical(descriptor) and descriptor != "hog":
        models["codebook"] = str(cfg.bow.codebook_from) if cfg.bow.codebook_from else THIS_COLLECTION
    if post.startswith(("pcaw", "lw")):
        models["whitening"] = str(cfg.fit.from_run) if cfg.fit.from_run else THIS_COLLECTION
    if factory != "inverted-file" and not make_index(factory, dim).is_trained:
        models["index"] = THIS_COLLECTION
    sources = sorted(set(models.values()))
    if not sources:
        return {"fitted_on": None, "models": models}
    fitted_on = THIS_COLLECTION if THIS_COLLECTION in sources else ", ".join(sources)
    return {"fitted_on": fitted_on, "models": models}


def whitening_name(descriptor: str) -> str:
    return f"pcaw-{descriptor}"


def borrowed_whitening(
    source: Path, descriptor: str, dim: int, backbone: str = ""
) -> tuple[dict[str, np.ndarray], int]:
    """The PCA-whitening another run learnt for ``descriptor`` (``fit.from_run``), checked against this
    run's descriptor dimension, or the learned whitening of a fine-tuned folder for this run's
    ``backbone``. Returns the arrays and the number of vectors it was fitted on."""
    if (Path(source) / "backbone.json").is_file():  # a fine-tuned backbone folder: its learned whitening
        return _learned_whitening(Path(source), descriptor, dim, backbone)
    path = RunLayout(Path(source)).model(whitening_name(descriptor))
    if not path.is_file():
        raise InputError(f"fit.from_run: no PCA-whitening for '{descriptor}' in {source} ({path} missing)")
    arrays, meta = load_npz(path)
    if arrays["mean"].shape[0] != dim:
        raise InputError(
            f"fit.from_run: {source} whitens {arrays['mean'].shape[0]}-dim '{descriptor}' descriptors, "
            f"this run's are {dim}-dim (same backbone and descriptor needed)"
        )
    return {k: arrays[k] for k in ("mean", "proj", "eigvals")}, int(meta.get("n_train", 0))


def _learned_whitening(
    ft_dir: Path, descriptor: str, dim: int, backbone: str
) -> tuple[dict[str, np.ndarray], int]:
    """The learned whitening (Lw) that ``embedpipe finetune`` fitted on its training pairs, for the
    fine-tuned backbone itself or for the off-the-shelf backbone it started from (the seeds' two Lw rows);
    marked with a ``learned`` flag so its rows are named ``lw<dim>``."""
    info = json.loads((ft_dir / "backbone.json").read_text())
    if backbone == info.get("base"):
        path = ft_dir / learned_whitening_file(descriptor, base=True)
    elif not backbone or Path(backbone).resolve() == ft_dir.resolve():
        path = ft_dir / learned_whitening_file(descriptor)
    else:
        raise InputError(
            f"fit.from_run: {ft_dir} learned whitening for its fine-tuned backbone and for "
            f"{info.get('base')}, not for {backbone}"
        )
    if not path.is_file():
        raise InputError(
            f"fit.from_run: no learned whitening for '{descriptor}' in {ft_dir} ({path.name} missing)"
        )
    arrays, meta = load_npz(path)
    if arrays["mean"].shape[0] != dim:
        raise InputError(f"fit.from_run: {path} whitens {arrays['mean'].shape[0]}-dim vectors, not {dim}-dim")
    out = {k: arrays[k] for k in ("mean", "proj", "eigvals")}
    out["learned"] = np.array(1, np.int8)
    return out, int(meta.get("n_train", 0))


def variants(
    layout: RunLayout, cfg: Config, descriptor: str, vectors: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """(post-processing name, vectors) pairs: the raw L2-normalised descriptor, then PCA-whitened."""
    out = [("l2", vectors)]
    if cfg.fit.whiten:
        arrays, _ = load_npz(layout.model(whitening_name(descriptor)))
        out.append((whitened_post(arrays), apply_whitening(vectors, arrays["mean"], arrays["proj"])))
    return out


def whitened_post(arrays: dict[str, np.ndarray]) -> str:
    """The post-processing name of a whitening: ``pcaw<dim>``, or ``lw<dim>`` for a learned one."""
    return f"{'lw' if 'learned' in arrays else 'pcaw'}{arrays['proj'].shape[0]}"


def database_variants(layout: RunLayout, cfg: Config, descriptor: str) -> list[tuple[str, StoreRows]]:
    """(post-processing name, the store's rows under it, read as needed) pairs, as ``variants``."""
    store = layout.feature_dir(descriptor)
    out = [("l2", StoreRows(store, None, int(read_store_manifest(store)["dim"])))]
    if cfg.fit.whiten:
        arrays, _ = load_npz(layout.model(whitening_name(descriptor)))
        transform = arrays["mean"], arrays["proj"]
        out.append((whitened_post(arrays), StoreRows(store, transform, int(arrays["proj"].shape[0]))))
    return out


def variant_transform(layout: RunLayout, descriptor: str, post: str) -> Transform:
    """The transform that makes a variant's vectors from the stored descriptor (None for ``l2``)."""
    if post == "l2":
        return None
    arrays, _ = load_npz(layout.model(whitening_name(descriptor)))
    return arrays["mean"], arrays["proj"]


def exact_scores(queries: np.ndarray, db: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Inner products of each query (n, d) with its neighbours ``idx`` (n, k) of ``db``; -1 pads get -inf.
    Used where the index's own scores are distances (LSH), since αQE and DBA weight by similarity."""
    sims = np.einsum("nd,nkd->nk", queries, db[np.maximum(idx, 0)])
    return np.where(idx >= 0, sims, -np.inf).astype(np.float32)


def neighbours(
    index: faiss.Index, queries: np.ndarray, db: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarities, ids) from ``index`` (among ``allowed`` ids when given), similarities exact
    when the index ranks by distance."""
    sims, idx = search(index, queries, k, allowed)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        sims = exact_scores(queries, db, idx)
    return sims, idx


def protocol_extras(
    cfg: Config, gt: GroundTruth, ranks: np.ndarray, x: np.ndarray | None
) -> dict[str, float]:
    """Scores a protocol adds to mAP: UKBench's N-S score; for labels, precision@k and (on the features
    themselves, ``x``) kNN few-shot classification accuracy at 1, 5 and 10 shots."""
    if cfg.protocol == "ukbench":
        return {"ns_score": ns_score(ranks, gt.groups, gt.queries)}
    if cfg.protocol == "labels":
        out = precision_at_k(ranks, gt.positives, gt.junk, KAPPAS)
        if x is not None:
            labelled = gt.groups >= 0  # distractors have no class
            x, classes = x[labelled], gt.groups[labelled]
            for s in SHOTS:
                out[f"fewshot@{s}"] = few_shot_accuracy(x, classes, s, seed=cfg.seed)
                out[f"fewshot@{s}_classes"] = few_shot_classes(classes, s)
            out.update(linear_probe_scores(x, classes, seed=cfg.seed))
        return out
    return {}


def setup_scores(gt: GroundTruth, ranks: np.ndarray) -> dict[str, float]:
    """Revisited Oxford/Paris: mAP and mP@k of the easy, medium and hard setups (``map`` is medium)."""
    out = {}
    for name, setup in (gt.setups or {}).items():
        result = compute_map(ranks, setup.positives, setup.junk, KAPPAS)
        out[f"map_{name}"] = result["map"]
        out.update({f"mp@{k}_{name}": result[f"mp@{k}"] for k in KAPPAS})
    return out


def dba_neighbours_file(layout: RunLayout, name: str) -> Path:
    return layout.report_dir / f"dba-neighbours-{name}.npz"


def _kept_lists(
    path: Path, keys: np.ndarray, x: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """From a saved neighbour graph: (old, rows, sims, ids): the positions in ``keys`` of the rows it
    was computed on that are still there, and the rows whose lists still hold with those lists (ids
    as positions): the row and all its neighbours are still in the database, and their
    similarities, computed again from ``x``, are the saved ones (so vectors that changed under the
    same key, after a refit say, are never trusted). None when nothing can be kept."""
    try:
        arrays, meta = load_npz(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    old_keys, sims, idx = arrays.get("keys"), arrays.get("sims"), arrays.get("ids")
    if old_keys is None or sims is None or idx is None or meta.get("k") != k or idx.shape[1:] != (k,):
        return None
    position = {key: i for i, key in enumerate(keys.tolist())}
    where = np.array([position.get(key, -1) for key in old_keys.tolist()], np.int64)
    mapped = np.where(idx >= 0, where[np.maximum(idx, 0)], -1)
    keep = (where >= 0) & (idx >= 0).all(axis=1) & (mapped >= 0).all(axis=1)
    rows, sims, mapped = where[keep], sims[keep], mapped[keep]
    if not np.allclose(pair_similarities(x, rows, mapped), sims, rtol=0, atol=1e-4):
        return None
    return where[where >= 0], rows, sims, mapped


def dba_neighbours(
    layout: RunLayout,
    cfg: Config,
    name: str,
    x: np.ndarray,
    index: Any,
    factory: str,
    keys_of: Callable[[], pa.Array],
    reuse: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Each database vector's ``dba_k + 1`` nearest database vectors (itself included), as store
    positions. Under an exact index (``factory`` Flat) the lists are saved in
    report/dba-neighbours-<name>.npz, keyed by input (path + content id: ``keys_of()`` gives the
    store rows' ``input_keys``, read only on this path). With ``reuse`` (a reindex
    that kept the models), a row whose list still holds is searched against the rows new to the
    database alone and the two lists are merged; only new rows and rows that lost a neighbour are
    searched against the whole database: the work grows with the new rows, not with the square of
    the database."""
    k = cfg.rerank.dba_k + 1
    exact = factory == "Flat" and index.metric_type == faiss.METRIC_INNER_PRODUCT
    if not exact or len(x) < k:
        set_search_params(index, cfg.rerank.dba_nprobe or cfg.index.nprobe, cfg.index.efsearch)
        try:
            return neighbours(index, x, x, k)
        finally:
            set_search_params(index, cfg.index.nprobe, cfg.index.efsearch)
    path = dba_neighbours_file(layout, name)
    keys = np.array([key.encode() for key in keys_of().to_pylist()])
    kept = _kept_lists(path, keys, x, k) if reuse and path.exists() else None
    if kept is None:
        sims, idx = neighbours(index, x, x, k)
    else:
        old, rows, kept_sims, kept_ids = kept
        sims, idx = np.empty((len(x), k), np.float32), np.empty((len(x), k), np.int64)
        known = np.zeros(len(x), bool)
        known[old] = True  # the rows the kept lists were chosen among
        added, redo = np.flatnonzero(~known), np.setdiff1d(np.arange(len(x)), rows)
        if redo.size:
            sims[redo], idx[redo] = neighbours(index, x[redo], x, k)
        if added.size:
            s_new, i_new = search(build_index(x[added], "Flat", cfg.seed), x[rows], k)
            i_new = np.where(i_new >= 0, added[np.maximum(i_new, 0)], -1)
            kept_sims, kept_ids = merge_neighbours(kept_sims, kept_ids, s_new, i_new, k)
        sims[rows], idx[rows] = kept_sims, kept_ids
        log.info("dba %s: %d neighbour list(s) kept, %d searched anew", name, len(rows), len(redo))
    save_npz(path, {"k": k}, keys=keys, sims=sims, ids=idx)
    return sims, idx


def augment_database(
    cfg: Config, x: np.ndarray, index: faiss.Index, graph: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, faiss.Index]:
    """DBA over the whole database (``graph``: each vector's neighbours, see ``dba_neighbours``) and
    an index of the result."""
    sims, idx = graph
    db = dba(x, sims, idx, cfg.rerank.dba_alpha)
    db_index = build_index(db, cfg.index.factory, cfg.seed, cfg.index.two_level_nlist)
    set_search_params(db_index, cfg.index.nprobe, cfg.index.efsearch)
    return db, db_index


def augmented_database(
    layout: RunLayout,
    cfg: Config,
    name: str,
    x: StoreRows,
    index: Any,
    factory: str,
    reuse: bool,
) -> tuple[StoreRows | np.ndarray, Any]:
    """The DBA database of a variant and its index. Searched as a sharded index: computed where the
    database lies, part by part on Ray (``dba_parts.augment_sharded``: the driver holds neither the
    vectors nor the neighbour lists). Otherwise in this process, over the whole database
    (``dba_neighbours``, ``augment_database``)."""
    if isinstance(index, ShardedIndex):
        return augment_sharded(layout.index_dir(name) / DBA_DIR, cfg, x, index)
    db = x.all()
    graph = dba_neighbours(layout, cfg, name, db, index, factory, lambda: store_keys(x.directory), reuse)
    return augment_database(cfg, db, index, graph)


def rerank_ranks(
    method: str,
    r: RerankConfig,
    x: np.ndarray | StoreRows,
    index: faiss.Index,
    gt: GroundTruth,
    augmented: Callable[[], tuple[np.ndarray | StoreRows, Any]],
    queries: np.ndarray,
    depth: int,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Top-``depth`` rankings of every query after αQE, DBA or both (DBA first, then αQE on the
    augmented database); ``allowed``: the database rows searched (all when None; not with DBA).

    ``queries``: the query vectors. ``augmented`` gives the DBA database and its index (computed once
    per variant by the caller). The databases (``x``, the DBA one) may be ``StoreRows``: αQE reads the
    top-``aqe_k`` rows of each query alone, by position.
    Queries keep their original vectors under DBA; neighbours used for αQE never include the query's
    own junk (the query itself when it is in the database)."""
    db, db_index = augmented() if method.startswith("dba") else (x, index)
    if method == "none":
        return search(db_index, queries, depth, allowed)[1]
    if method.endswith("aqe"):
        k = r.aqe_k + max((len(j) for j in gt.junk), default=0)
        sims, idx = neighbours(db_index, queries, db, k, allowed)
        sims, idx = drop_excluded(sims, idx, gt.junk, r.aqe_k)
        used = np.unique(idx[idx >= 0])  # the database rows the expansion adds, read once
        local = np.where(idx >= 0, np.searchsorted(used, np.maximum(idx, 0)), -1)
        queries = alpha_qe(queries, db[used], sims, local, r.aqe_alpha)
    return search(db_index, queries, depth, allowed)[1]


def auto_index(layout: RunLayout, cfg: Config, name: str, x: StoreRows, gt: GroundTruth | None) -> Config:
    """``index.factory: auto``: pick a factory and search parameter for this variant under the budget, on
    a seeded sample of at most ``index.train_size`` rows (only those read from the store, part by part)
    with held-out sample queries (never the protocol's queries, whose rows are kept out of them, nor its
    ground truth); the candidates' table goes to report/index-choice-<name>.json."""
    icfg = cfg.index
    exclude = gt.queries if gt is not None and not gt.query_keys else None  # box crops are not rows of x
    budget = icfg.budget_bytes_per_vector or np.iinfo(np.int32).max
    pick, table = choose_index(
        x, budget, icfg.target_recall, seed=cfg.seed, max_rows=icfg.train_size, exclude=exclude
    )
    write_json_atomic(layout.report_dir / f"index-choice-{name}.json", table)
    update: dict[str, Any] = {"factory": pick["index"]}
    if pick.get("param"):
        update[pick["param"]] = pick["value"]
    return cfg.model_copy(update={"index": icfg.model_copy(update=update)})


def _previous_factory(layout: RunLayout, descriptor: str, post: str, default: str) -> str:
    """The index string a finished run recorded for this variant (what its live index was built as)."""
    if layout.metrics.exists():
        for row in json.loads(layout.metrics.read_text())["results"]:
            if row["descriptor"] == descriptor and row["post"] == post:
                return row["index"]
    return default


def variant_index(
    layout: RunLayout, cfg: Config, descriptor: str, post: str, incremental: bool
) -> tuple[faiss.Index, Any, str]:
    """The variant's index as (the live FAISS index, what evaluation searches, its index string).

    ``incremental`` with a live version in ``index.layout``: that index brought up to date with the
    store (gone rows removed, new rows added, no retraining), searched in store order. Otherwise
    trained (on a Dask-drawn sample, on the fit's scheduler) and filled from the store. Either way
    published as a new version."""
    name, store = f"{descriptor}-{post}", layout.feature_dir(descriptor)
    root = layout.index_dir(name)
    transform = variant_transform(layout, descriptor, post)
    live_version = index_versions.current(root)
    if incremental and live_version is not None and index_layout(live_version) != cfg.index.layout:
        log.info("index %s: layout changed to %s, rebuilt", name, cfg.index.layout)
    elif incremental and live_version is not None:
        try:
            live, ids, added, removed = update_store_index(root, store, transform)
        except InputError as err:  # e.g. HNSW cannot remove, on-disk lists are not updated: rebuilt below
            log.warning("index %s: %s", name, err)
        else:
            set_search_params(live, cfg.index.nprobe, cfg.index.efsearch)
            log.info("index %s: %d added, %d removed, no retraining", name, added, removed)
            factory = _previous_factory(layout, descriptor, post, cfg.index.factory)
            return live, StoreOrderIndex(live, ids, store), factory
    icfg = cfg.index
    remote = icfg.layout == "sharded" and icfg.engine == "ray"  # searched where it lies, shard by shard
    index, _, version = publish_store_index(root, store, icfg, cfg.seed, transform, cfg.fit, load=not remote)
    if remote:
        sharded = ShardedIndex(version, icfg.nprobe, icfg.efsearch, cfg.ray.max_retries)
        return sharded.trained, sharded, icfg.factory
    return index, index, icfg.factory


def post_kind(post: str) -> str:
    """A post-processing name without its dimension: ``l2``, ``pcaw``, ``lw``."""
    return post if post == "l2" else post.rstrip("0123456789")


def reference_store(layout: RunLayout, cfg: Config, descriptor: str) -> str | None:
    """The store of ``descriptor``'s fp32 reference (``extract.fp32_reference``) when the run's
    resolved precision is not fp32 and the store is there, else None."""
    record = run_record(layout.root / "models")
    if record is None or record.get("precision", "fp32") == "fp32":
        return None
    store = dict(reference_stores(cfg)).get(descriptor)
    return store if store is not None and layout.feature_dir(store).is_dir() else None


def precision_change(layout: RunLayout, changes: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's ``precision_change`` (beside ``results``): the run's resolved runtime and
    precision and, per result row that has an fp32 reference, its mAP, the reference's and the change
    (reduced minus fp32); empty when no row has one."""
    record = run_record(layout.root / "models")
    if not changes or record is None:
        return {}
    return {
        "precision_change": {"precision": record["precision"], "runtime": record["runtime"], "rows": changes}
    }


def index_and_evaluate(
    layout: RunLayout,
    cfg: Config,
    descriptor: str,
    incremental: bool = False,
    curve: list[dict[str, Any]] | None = None,
    changes: list[dict[str, Any]] | None = None,
    variant_configs: dict[str, Config] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Build (or, ``incremental``, update) and save one index per variant, search every query (plain
    and re-ranked) to ``ranking_depth``, compute the protocol's metrics. Returns the result rows
    (metrics.json contract) and the number of queries; the distractor curve's points below the full
    set of distractors (``eval.distractor_steps``) are appended to ``curve``.

    With ``changes``, a descriptor extracted at a reduced precision with an fp32 reference store
    (``reference_store``) has that store evaluated the same way (its own whitening, the same index
    and search parameters per variant: ``variant_configs``, by ``post_kind``, the same re-ranking),
    and each result row's ``{descriptor, post, rerank, map, map_fp32, change}`` appended to it."""
    directory = layout.feature_dir(descriptor)
    store = read_store_manifest(directory)
    # ground truth, collection rows and the distractors the curve adds: read a part at a time
    database = read_database(layout, cfg, directory, max(cfg.eval.distractor_steps, default=0))
    gt, collection, distractors = database.gt, database.collection, database.distractors
    depth = ranking_depth(cfg, database.rows)
    external = query_vectors(layout, cfg, descriptor, gt) if gt is not None else {}
    rows = []
    run_cfg = cfg
    used: dict[str, Config] = {}
    for post, x in database_variants(layout, run_cfg, descriptor):
        name = f"{descriptor}-{post}"
        start = time.perf_counter()
        live = incremental and index_versions.current(layout.index_dir(name)) is not None
        auto = run_cfg.index.factory == "auto" and not live
        if variant_configs is not None and post_kind(post) in variant_configs:
            cfg = variant_configs[post_kind(post)]
        else:
            cfg = auto_index(layout, run_cfg, name, x, gt) if auto else run_cfg
        used[post_kind(post)] = cfg
        built, index, factory = variant_index(layout, cfg, descriptor, post, incremental)
        base = {
            "descriptor": descriptor,
            "post": post,
            "backbone": store["backbone"],
            "dim": int(x.shape[1]),
            "index": factory,
            "bytes_per_vector": bytes_per_vector(built),
            **provenance(cfg, descriptor, post, factory, int(x.shape[1])),
            "distractors": database.n_distractors,
        }
        if gt is None:
            rows.append({**base, "rerank": "none", "time_s": round(time.perf_counter() - start, 4)})
            continue
        layout.report_dir.mkdir(parents=True, exist_ok=True)
        few_shot = cfg.protocol == "labels"  # classified on the features themselves
        augmented = functools.cache(
            lambda x=x, index=index, cfg=cfg, name=name, factory=factory: augmented_database(
                layout, cfg, name, x, index, factory, incremental
            )
        )
        queries = external[post] if external else x[gt.queries]
        for method in ("none", *cfg.rerank.methods):
            if method != "none":
                start = time.perf_counter()
            ranks = (
                search(index, queries, depth)[1]
                if method == "none"
                else rerank_ranks(method, cfg.rerank, x, index, gt, augmented, queries, depth)
            )
            suffix = "" if method == "none" else f"-{method.replace('+', '-')}"
            save_npy(layout.report_dir / f"ranks-{name}{suffix}.npy", ranks)
            result = compute_map(ranks, gt.positives, gt.junk, KAPPAS)
            rows.append(
                {
                    **base,
                    "rerank": method,
                    "map": result["map"],
                    **{f"mp@{k}": result[f"mp@{k}"] for k in KAPPAS},
                    **protocol_extras(cfg, gt, ranks, x.all() if few_shot and method == "none" else None),
                    **setup_scores(gt, ranks),
                    "ranks_file": f"ranks-{name}{suffix}.npy",
                    "top_k": int(ranks.shape[1]),
                    "time_s": round(time.perf_counter() - start, 4),
                }
            )
            log.info(
                "evaluate: %s%s mAP %.4f over %d queries", name, suffix, result["map"], result["n_queries"]
            )
        if curve is not None and database.n_distractors:
            steps = [s for s in cfg.eval.distractor_steps if s < database.n_distractors]
            for step in steps:
                allowed = np.sort(np.concatenate([collection, distractors[:step]]))
                for method in ("none", *(m for m in cfg.rerank.methods if not m.startswith("dba"))):
                    ranks = rerank_ranks(method, cfg.rerank, x, index, gt, augmented, queries, depth, allowed)
                    point = {"distractors": step, "descriptor": descriptor, "post": post, "rerank": method}
                    curve.append({**point, "map": compute_map(ranks, gt.positives, gt.junk, KAPPAS)["map"]})
    # NaN (e.g. too few images per class for a shot count) is not JSON: write null
    rows = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]
    reference = (
        reference_store(layout, run_cfg, descriptor) if changes is not None and gt is not None else None
    )
    if reference is not None:
        for post in [r["post"] for r in rows if r["rerank"] == "none"]:
            used[post_kind(post)] = _with_factory(used[post_kind(post)], rows, post)
        fp32_rows, _ = index_and_evaluate(layout, run_cfg, reference, incremental, variant_configs=used)
        fp32 = {(post_kind(r["post"]), r["rerank"]): r["map"] for r in fp32_rows}
        for r in rows:
            map_fp32 = fp32.get((post_kind(r["post"]), r["rerank"]))
            if r.get("map") is None or map_fp32 is None:
                continue
            change = {"descriptor": descriptor, "post": r["post"], "rerank": r["rerank"], "map": r["map"]}
            changes.append({**change, "map_fp32": map_fp32, "change": r["map"] - map_fp32})
            log.info(
                "evaluate: %s-%s%s mAP %.4f, at fp32 %.4f",
                descriptor,
                r["post"],
                "" if r["rerank"] == "none" else f"-{r['rerank']}",
                r["map"],
                map_fp32,
            )
    return rows, 0 if gt is None else int(gt.queries.size)


def _with_factory(cfg: Config, rows: list[dict[str, Any]], post: str) -> Config:
    """``cfg`` whose index factory is the one a variant's rows were evaluated with (a live index
    updated in place keeps the factory it was built as)."""
    factory = next(r["index"] for r in rows if r["post"] == post)
    return cfg.model_copy(update={"index": cfg.index.model_copy(update={"factory": factory})})


# old rows the drift check draws: a PCA fitted on half of them, the other half held out. A fixed sample
# estimates the energy shares well enough, and keeps the check's cost the same at any collection size
DRIFT_SAMPLE = 8000


def whitening_drift(layout: RunLayout, cfg: Config, descriptor: str) -> float | None:
    """How much worse the principal subspace of the rows the live whitened index holds (a seeded sample,
    as many components as the run's whitening) describes the store rows it does not hold yet than unseen
    old rows (``whitening.subspace_drift``); None when the descriptor has no whitening or no live
    whitened index, or nothing is new."""
    model = layout.model(whitening_name(descriptor))
    if not cfg.fit.whiten or not model.exists():
        return None
    arrays, _ = load_npz(model)
    root = layout.index_dir(f"{descriptor}-pcaw{arrays['proj'].shape[0]}")
    if index_versions.current(root) is None:
        return None
    store = layout.feature_dir(descriptor)
    fresh = new_rows(root, store)
    if not fresh.size:
        return None
    _, x = read_features(store)
    held = np.setdiff1d(np.arange(len(x)), fresh)
    held = np.random.default_rng(cfg.seed).permutation(held)[:DRIFT_SAMPLE]  # random order: halves alike
    return subspace_drift(x[held], x[fresh], int(arrays["proj"].shape[0]))
