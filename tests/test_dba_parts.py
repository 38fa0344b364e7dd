"""DBA computed part by part on Ray against a sharded index (``dba_parts``): on an exact index the
neighbour lists, the augmented vectors and the DBA / DBA+αQE rankings are those of the in-driver
computation over the whole database, byte for byte; on an approximate one the lists are the sharded
search's. Parts written for the same inputs are kept when the stage runs again, others recomputed."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from embedpipe.flows.benchmarks.scale import write_collection
from embedpipe.flows.benchmarks.store import synthetic_store
from embedpipe.storage.contracts.config import Config, IndexConfig, RayConfig, RerankConfig
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import FeatureWriter, read_parts
from embedpipe.workers.engines.ray_stages import ray_session
from embedpipe.workers.evaluate.database import run_ground_truth
from embedpipe.workers.evaluate.dba_parts import (
    DBA_DIR,
    GROUPS_DIR,
    PARTS_DIR,
    ROWS_DIR,
    _group_files,
    augment_sharded,
    read_lists,
    read_state,
    shard_groups,
)
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.evaluate.search import ShardedIndex, StoreRows
from embedpipe.workers.evaluate.stage import (
    augment_database,
    dba_neighbours,
    index_and_evaluate,
    neighbours,
    rerank_ranks,
)
from embedpipe.workers.index.ann import build_index, set_search_params
from embedpipe.workers.index.build import publish_store_index, store_keys

pytestmark = pytest.mark.slow
ROWS, DIM = 2400, 32


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(RayConfig(num_cpus=2, object_store_mb=256)):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four parts of clustered vectors and parts with no rows (as of only quarantined inputs)."""
    path = synthetic_store(tmp_path_factory.mktemp("dba") / "store", ROWS, DIM, 4)
    empty = FeatureWriter(path, DIM, 5, {"descriptor": "synthetic"})
    empty.write(4, [], [], np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, DIM), np.float32))
    empty.close()
    return path


def _transform(whiten: bool):
    if not whiten:
        return None
    rng = np.random.default_rng(5)
    mean = rng.standard_normal(DIM).astype(np.float32) * 0.01
    return mean, rng.standard_normal((24, DIM)).astype(np.float32)


def _setup(
    tmp_path, store, factory: str, whiten: bool, alpha: float = 3.0, nprobe: int = 16, efsearch: int = 64
):
    transform = _transform(whiten)
    cfg = Config(
        index=IndexConfig(
            factory=factory, layout="sharded", engine="ray", train_size=2000, nprobe=nprobe, efsearch=efsearch
        ),
        rerank=RerankConfig(dba_k=3, dba_alpha=alpha, aqe_k=2),
    )
    cfg = cfg.model_copy(update={"fit": cfg.fit.model_copy(update={"scheduler": "threads"})})
    _, _, version = publish_store_index(tmp_path / "ix", store, cfg.index, 0, transform, cfg.fit, load=False)
    rows = StoreRows(store, transform, 24 if whiten else DIM)
    sharded = ShardedIndex(version, cfg.index.nprobe, cfg.index.efsearch)
    return cfg, rows, sharded


@pytest.mark.parametrize("whiten", [False, True], ids=["l2", "whitened"])
def test_dba_per_part_equals_the_in_driver_dba_on_an_exact_index(tmp_path, store, ray_cluster, whiten):
    cfg, rows, sharded = _setup(tmp_path, store, "Flat", whiten)
    db_rows, db_index = augment_sharded(tmp_path / "dba", cfg, rows, sharded)

    # the reference: today's in-driver path over the whole database
    x = rows.all()
    layout = RunLayout(tmp_path / "run")
    layout.report_dir.mkdir(parents=True)
    graph = dba_neighbours(layout, cfg, "ref", x, sharded, "Flat", lambda: store_keys(store), reuse=False)
    db, index = augment_database(cfg, x, sharded, graph)

    sims, ids = read_lists(tmp_path / "dba" / PARTS_DIR)
    assert ids.shape == (ROWS, cfg.rerank.dba_k + 1)
    assert np.array_equal(ids, graph[1]) and np.array_equal(sims, graph[0])
    assert (ids[:, 0] == np.arange(ROWS)).mean() > 0.99  # each row's nearest: itself
    assert np.array_equal(db_rows.all(), db)  # the augmented vectors, bit for bit
    assert db_index.ntotal == ROWS

    queries = x[::53]
    positions = np.arange(0, ROWS, 53)
    gt = GroundTruth(positions, [np.array([p]) for p in positions], [np.array([p]) for p in positions])
    reference = TiesById(index)
    # read by position: αQE reads its queries' top-k rows, never the whole database
    lazy, lazy_db = StoreRows(store, rows.transform, rows.dim), StoreRows(db_rows.directory, None, rows.dim)
    for method in ("aqe", "dba", "dba+aqe"):
        ours = rerank_ranks(method, cfg.rerank, lazy, sharded, gt, lambda: (lazy_db, db_index), queries, 100)
        theirs = rerank_ranks(method, cfg.rerank, x, sharded, gt, lambda: (db, reference), queries, 100)
        assert np.array_equal(ours, theirs), method
    assert lazy._all is None and lazy_db._all is None


def _groups_of_two(cfg: Config, sharded: ShardedIndex) -> Config:
    """``cfg`` with DBA's shard groups sized for two of ``sharded``'s largest shard files."""
    group_mb = 2.5 * max(Path(f).stat().st_size for f in sharded.files) / 2**20
    return cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"dba_group_mb": group_mb})})


class TiesById:
    """An in-process index whose exact ties are ranked by smaller id, as the sharded search ranks them
    (FAISS's own order of equal scores is its heap's)."""

    def __init__(self, index):
        self.index, self.ntotal, self.d, self.metric_type = index, index.ntotal, index.d, index.metric_type

    def search(self, queries, k, allowed=None):
        scores, ids = self.index.search(queries, self.ntotal)
        order = np.lexsort((ids, -scores), axis=1)[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


@pytest.mark.parametrize(
    ("factory", "groups"),
    [
        ("IVF16,PQ8", "one"),
        ("IVF16,PQ8", "pairs"),
        ("IVF16,Flat", "pairs"),
        ("PCA16,IVF16,SQ8", "one"),
        ("IVF16_HNSW4,PQ8", "pairs"),
        ("LSH", "one"),
    ],
)
def test_dba_lists_per_part_are_the_sharded_search_elsewhere(tmp_path, store, ray_cluster, factory, groups):
    """An inverted file's coarse assignment computed once per part, the shards merged into groups
    (all in one, or two shards each) each scanned with it: the sharded search's lists; under a
    distance (LSH) the similarities are the exact inner products. An HNSW coarse quantiser searches
    with the sharded search's efSearch (3 here: an approximate assignment, which FAISS's default of 16
    would not give)."""
    cfg, rows, sharded = _setup(tmp_path, store, factory, whiten=False, nprobe=3, efsearch=3)
    if groups == "pairs":
        cfg = _groups_of_two(cfg, sharded)
        assert [len(g) for g in shard_groups(sharded.files, cfg.rerank.dba_group_mb)] == [2, 2]
    augment_sharded(tmp_path / "dba", cfg, rows, sharded)
    x = rows.all()
    want_sims, want_ids = neighbours(sharded, x, x, cfg.rerank.dba_k + 1)
    sims, ids = read_lists(tmp_path / "dba" / PARTS_DIR)
    assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    # an inverted file's groups were merged once into files the part tasks read, removed once done
    ivf = isinstance(sharded.trained, faiss.IndexIVF)
    groups = _group_files(tmp_path / "g", sharded, cfg.rerank.dba_group_mb)
    assert len(groups) == (len(shard_groups(sharded.files, cfg.rerank.dba_group_mb)) if ivf else 0)
    assert ivf == factory.startswith("IVF") and not (tmp_path / "dba" / GROUPS_DIR).exists()


def test_dba_nprobe_sets_the_neighbour_search_apart_from_the_queries(tmp_path, store, ray_cluster):
    """``rerank.dba_nprobe``: DBA's neighbour lists probe that many lists (here all 16: exact), the
    queries keep ``index.nprobe`` (1); per part on Ray and in the driver alike, and a changed value
    recomputes the parts."""
    cfg, rows, sharded = _setup(tmp_path, store, "IVF16,Flat", whiten=False, nprobe=1)
    cfg = cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"dba_nprobe": 16})})
    augment_sharded(tmp_path / "dba", cfg, rows, sharded)
    x = rows.all()
    k = cfg.rerank.dba_k + 1
    sims, ids = read_lists(tmp_path / "dba" / PARTS_DIR)
    exact_sims, exact_ids = neighbours(ShardedIndex(sharded.version, 16, 64), x, x, k)
    assert np.array_equal(ids, exact_ids) and np.array_equal(sims, exact_sims)
    assert not np.array_equal(ids, neighbours(sharded, x, x, k)[1])  # one list is not enough here

    merged = build_index(x, "IVF16,Flat", 0)
    set_search_params(merged, 16, 64)
    want = neighbours(merged, x, x, k)
    set_search_params(merged, 1, 64)
    graph = dba_neighbours(RunLayout(tmp_path / "run"), cfg, "merged", x, merged, "IVF16,Flat", None, False)
    assert np.array_equal(graph[1], want[1]) and not np.array_equal(graph[1], neighbours(merged, x, x, k)[1])
    assert faiss.extract_index_ivf(merged).nprobe == 1  # the queries' setting is back

    state = read_state(tmp_path / "dba")["fingerprint"]
    cfg = cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"dba_nprobe": 2})})
    augment_sharded(tmp_path / "dba", cfg, rows, sharded)
    assert read_state(tmp_path / "dba")["fingerprint"] != state


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8"])
def test_exact_ties_rank_by_id_across_shards_and_groups(tmp_path, ray_cluster, factory):
    """A store where every vector appears in four parts (exact ties at every rank): the sharded
    search ranks equal scores by smaller id, as one full ranking sorted by (score, id) does, and DBA's
    per-part lists (the shards merged two by two) are that search's."""
    base = synthetic_store(tmp_path / "base", 150, DIM, 1)
    x = StoreRows(base, None, DIM).all()
    path = tmp_path / "ties"
    writer = FeatureWriter(path, DIM, 4, {"descriptor": "synthetic"})
    for part in range(4):
        ids = [f"{part}-{i:04d}" for i in range(len(x))]
        zeros = np.zeros(len(x), np.int32)
        writer.write(part, ids, ids, zeros, zeros, x)
    writer.close()
    cfg, rows, sharded = _setup(tmp_path, path, factory, whiten=False, nprobe=3)
    cfg = cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"dba_k": 5})})
    cfg = _groups_of_two(cfg, sharded)
    db = rows.all()
    sims, ids = sharded.search(db, 6)
    assert (np.diff(sims, axis=1) == 0).mean() > 0.5  # ties across the rank cut, most of them
    if factory == "Flat":  # exact: one full ranking of the whole database, ties by id
        whole = faiss.IndexFlat(DIM, sharded.metric_type)
        whole.add(db)
        want_sims, want_ids = TiesById(whole).search(db, 6)
        assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    augment_sharded(tmp_path / "dba", cfg, rows, sharded)
    got_sims, got_ids = read_lists(tmp_path / "dba" / PARTS_DIR)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_sims, sims)
    order = np.lexsort((ids, -sims), axis=1)
    assert (order == np.arange(6)).all()  # equal scores: smaller id first
    assert (ids[:, 0] % 150 == np.arange(len(db)) % 150).all()  # a vector's own copies rank first


def test_parts_are_kept_for_the_same_inputs_and_recomputed_for_others(tmp_path, store, ray_cluster):
    cfg, rows, sharded = _setup(tmp_path, store, "Flat", whiten=False)
    augment_sharded(tmp_path / "dba", cfg, rows, sharded)
    parts = sorted((tmp_path / "dba" / PARTS_DIR).glob("part-*.parquet"))
    assert len(parts) == len(rows.parts)  # one per store part, the empty ones too
    before = [p.stat().st_mtime_ns for p in parts]
    first = StoreRows(tmp_path / "dba" / PARTS_DIR, None, DIM).all()
    parts[1].unlink()  # a run stopped before this part was written
    db_rows, _ = augment_sharded(tmp_path / "dba", cfg, rows, sharded)
    after = [p.stat().st_mtime_ns for p in parts]
    assert [a == b for a, b in zip(before, after, strict=True)] == [i != 1 for i in range(len(parts))]
    assert np.array_equal(db_rows.all(), first)
    assert not (tmp_path / "dba" / ROWS_DIR).exists()  # the mapped rows go once every part is written
    versions = sorted(p.name for p in (tmp_path / "dba").glob("v*"))
    assert versions == ["v0002"]  # the augmented index of the earlier run replaced
    cfg, rows, sharded = _setup(tmp_path / "other", store, "Flat", whiten=False, alpha=1.0)
    db_rows, _ = augment_sharded(tmp_path / "dba", cfg, rows, sharded)  # another α: every part again
    assert all(p.stat().st_mtime_ns != b for p, b in zip(parts, before, strict=True))
    assert not np.array_equal(db_rows.all(), first)


def test_a_run_on_the_sharded_index_ranks_as_a_run_on_the_merged_one(tmp_path, ray_cluster):
    """A Holidays-style run evaluated on a merged Flat index (DBA in this process) and on a sharded one
    searched on Ray (DBA part by part): the same mAP for every re-ranking, and DBA rankings that differ
    only in the order of tied scores (equal up to float rounding; the sharded search ranks exact ties by
    id, one FAISS index by its heap)."""
    results, ranks = {}, {}
    for layout_name, engine in (("merged", "local"), ("sharded", "ray")):
        run = tmp_path / layout_name
        write_collection(run, 3000, 32)
        cfg = Config.model_validate(
            {
                "protocol": "holidays",
                "out": str(run),
                "extract": {"descriptors": ["gem"]},
                "fit": {"whiten": False, "scheduler": "threads"},
                "index": {"factory": "Flat", "layout": layout_name, "engine": engine},
                "rerank": {"methods": ["aqe", "dba", "dba+aqe"]},
                "eval": {"top_k": 0},
            }
        )
        rows, _ = index_and_evaluate(RunLayout(run), cfg, "gem")
        results[layout_name] = [(r["rerank"], r["map"], r["mp@10"]) for r in rows]
        ranks[layout_name] = np.load(run / "report" / "ranks-gem-l2-dba.npy")
    assert [r for r, _, _ in results["merged"]] == ["none", "aqe", "dba", "dba+aqe"]
    assert results["sharded"] == results["merged"]
    assert not (tmp_path / "merged" / "index" / "gem-l2" / DBA_DIR).exists()  # in this process
    db = StoreRows(tmp_path / "sharded" / "index" / "gem-l2" / DBA_DIR / PARTS_DIR, None, 32).all()
    store = tmp_path / "sharded" / "features" / "gem"
    paths = read_parts(store, ["path"])["path"].to_pylist()
    gt = run_ground_truth(RunLayout(tmp_path / "sharded"), cfg, paths)
    queries = StoreRows(store, None, 32)[gt.queries]
    ours, theirs = ranks["sharded"], ranks["merged"]
    assert (ours == theirs).mean() > 0.999 and (np.sort(ours, axis=1) == np.sort(theirs, axis=1)).all()
    row, col = np.nonzero(ours != theirs)
    tied = np.einsum("nd,nd->n", queries[row], db[ours[row, col]] - db[theirs[row, col]])
    assert np.abs(tied).max(initial=0) < 1e-6  # the two searches' float rounding of equal scores
