"""FAISS factory indices: sharded Ray build == single-process build, incremental add, removal, versions."""

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe.flows.config import load_config
from embedpipe.storage import index_versions
from embedpipe.storage.contracts.config import IndexConfig, RayConfig
from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.features import FeatureWriter, part_files
from embedpipe.storage.index_folder import read_index, save_version
from embedpipe.workers.engines.dask_jobs import sample_store
from embedpipe.workers.engines.ray_stages import ray_session
from embedpipe.workers.index import ann, build
from embedpipe.workers.index.build import (
    add_part,
    build_store_index,
    load_current,
    remove_content_ids,
)

DIM, PARTS, PER_PART = 32, 4, 300
FACTORIES = [
    "Flat",
    "IVF16,Flat",
    "IVF16,PQ8x4",
    "OPQ4,IVF16,PQ4x4",
    "PCA16,IVF8,PQ4x4",
    "IVF16_HNSW8,PQ8x4",
    "OPQ4,IVF16_HNSW8,PQ4x4",
    "PQ8x4",
    "LSH",
    "HNSW16",
]


def _write_store(directory, x, parts):
    writer = FeatureWriter(directory, x.shape[1], parts, {"descriptor": "gem"})
    per = len(x) // parts
    for shard in range(parts):
        rows = np.arange(shard * per, (shard + 1) * per)
        writer.write(shard, [f"id{i}" for i in rows], [f"p{i}.jpg" for i in rows], rows, rows, x[rows])
    writer.close()
    return directory


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, DIM))
    x = centres[rng.integers(0, 20, PARTS * PER_PART)] + 0.3 * rng.standard_normal((PARTS * PER_PART, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    return _write_store(tmp_path_factory.mktemp("store") / "gem", data, PARTS)


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(RayConfig(num_cpus=2, object_store_mb=256)):
        yield


def _single_process(store, data, cfg, seed=0):
    """Reference: train on the same seeded sample, add every vector at once in one process."""
    index = ann.train_index(cfg.factory, sample_store(store, cfg.train_size, seed, "threads"), seed)
    index.add_with_ids(data, np.arange(len(data), dtype=np.int64))
    ann.set_search_params(index, cfg.nprobe, cfg.efsearch)
    return index


@pytest.mark.parametrize("factory", FACTORIES)
def test_sharded_ray_build_equals_single_process(store, data, ray_cluster, factory):
    cfg = IndexConfig(factory=factory, train_size=1000, nprobe=4, efsearch=64)
    index, ids = build_store_index(store, cfg, seed=0, engine="ray")
    ref = _single_process(store, data, cfg)
    assert index.ntotal == ref.ntotal == len(data)
    assert ids.column("row").to_pylist() == list(range(len(data)))
    assert ids.column("id").to_pylist() == [f"id{i}" for i in range(len(data))]
    got_ids, got_codes = ann.codes_of(index)
    ref_ids, ref_codes = ann.codes_of(ref)
    assert np.array_equal(got_ids, ref_ids) and np.array_equal(got_codes, ref_codes)
    queries = data[::97]
    d1, i1 = ann.search(index, queries, 10)
    d2, i2 = ann.search(ref, queries, 10)
    if factory.startswith("HNSW"):  # graphs built in parts vs at once differ; both find the query itself
        assert (i1[:, 0] == np.arange(0, len(data), 97)).all() and (i2[:, 0] == i1[:, 0]).all()
    else:
        assert np.array_equal(i1, i2) and np.allclose(d1, d2)


def test_local_engine_matches_ray(store, ray_cluster):
    cfg = IndexConfig(factory="IVF16,PQ8x4", train_size=1000)
    a, ids_a = build_store_index(store, cfg, seed=3, engine="ray")
    b, ids_b = build_store_index(store, cfg, seed=3, engine="local")
    assert ids_a.equals(ids_b)
    assert all(np.array_equal(u, v) for u, v in zip(ann.codes_of(a), ann.codes_of(b), strict=True))


@pytest.mark.parametrize(
    "factory, expected",
    [("Flat", DIM * 4), ("PQ8x4", 4), ("IVF16,PQ8x4", 4), ("LSH", DIM // 8), ("PCA16,Flat", 64)],
)
def test_bytes_per_vector(data, factory, expected):
    assert ann.bytes_per_vector(ann.build_index(data, factory)) == expected


def test_flat_search_is_exact(data):
    index = ann.build_index(data, "Flat")
    sims, idx = ann.search(index, data[:5], 7)
    brute = data[:5] @ data.T
    assert np.array_equal(idx, np.argsort(-brute, axis=1, kind="stable")[:, :7])
    assert np.allclose(sims, np.take_along_axis(brute, idx, axis=1), atol=1e-5)


@pytest.mark.parametrize("factory", ["IVFx,Flat", "Foo", "PQ7"])
def test_bad_factory_is_one_line(factory):
    with pytest.raises(InputError, match="bad index factory") as err:
        load_config(sets=[f"index.factory={factory}"])
    assert "\n" not in str(err.value)


def test_untrainable_factory_is_one_line(data):
    with pytest.raises(InputError, match="cannot be trained on 50 vectors"):
        ann.train_index("IVF256,Flat", data[:50])


def test_incremental_add_remove_and_versions(tmp_path, data, ray_cluster):
    """Index the first three parts, add the fourth without retraining, remove some ids; every step is a
    new version and CURRENT moves atomically; the result equals a build over all four parts."""
    store = _write_store(tmp_path / "all", data, PARTS)
    first = tmp_path / "first"
    first.mkdir()
    for part in part_files(store)[:3]:  # same part names; the fourth arrives later
        (first / part.name).write_bytes(part.read_bytes())
    (first / "_manifest.json").write_text((store / "_manifest.json").read_text())
    cfg = IndexConfig(factory="IVF16,PQ8x4", train_size=1000)
    root = tmp_path / "index" / "gem-l2"
    index, ids = build_store_index(first, cfg, seed=0, engine="ray")
    v1 = save_version(root, index, ids)
    assert index_versions.current(root) == v1 and v1.name == "v0001"

    # the added part is encoded by the index trained on the first three parts' sample: no retraining
    trained_on_3 = ann.codes_of(load_current(root)[0])
    v2 = add_part(root, part_files(store)[3])
    assert index_versions.current(root) == v2 and v2.name == "v0002"
    grown, grown_ids, _ = load_current(root)
    assert grown.ntotal == len(data) and grown_ids.column("row").to_pylist() == list(range(len(data)))
    ref = ann.deserialize(ann.serialize(load_current(root)[0]))
    ref.reset()
    ref.add_with_ids(data, np.arange(len(data), dtype=np.int64))
    assert all(np.array_equal(u, v) for u, v in zip(ann.codes_of(grown), ann.codes_of(ref), strict=True))
    assert len(trained_on_3[0]) == 3 * PER_PART
    # the first version is untouched
    assert read_index(v1 / "index.faiss").ntotal == 3 * PER_PART

    gone = [f"id{i}" for i in (5, 400, 1100)]
    v3, removed = remove_content_ids(root, gone)
    assert removed == 3 and index_versions.current(root) == v3
    shrunk, shrunk_ids, _ = load_current(root, cfg)
    assert shrunk.ntotal == len(data) - 3
    assert not set(gone) & set(shrunk_ids.column("id").to_pylist())
    _, idx = ann.search(shrunk, data[[5, 400, 1100]], 20)
    assert not {5, 400, 1100} & set(idx.ravel().tolist())
    assert pq.read_table(v3 / "ids.parquet").num_rows == len(data) - 3
    assert [p.name for p in index_versions.versions(root)] == ["v0001", "v0002", "v0003"]
    assert (root / "CURRENT").read_text().strip() == "v0003"


def test_hnsw_refuses_removal(data):
    index = ann.build_index(data, "HNSW16")
    with pytest.raises(InputError, match="HNSW"):
        ann.remove_ids(index, np.array([1]))


def test_training_sample_on_dask_on_ray(store, ray_cluster):
    """The index's training sample drawn on the run's Ray cluster (fit.scheduler 'ray') is the one
    local threads draw."""
    on_ray = sample_store(store, 700, 4, "ray")
    assert on_ray.shape == (700, DIM) and on_ray.tobytes() == sample_store(store, 700, 4, "threads").tobytes()


def _recall(index, data, queries, k=10):
    exact = data @ queries.T
    want = np.argsort(-exact, axis=0, kind="stable")[:k].T
    got = ann.search(index, queries, k)[1]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want, strict=True)])


def test_two_level_training_is_seeded_and_as_good_as_one_kmeans():
    """Coarse centroids trained in two levels: nlist of them, the same bytes for the same seed, other
    bytes for another, and the index finds what the one-k-means index finds (same recall +- 0.02)."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((60, DIM))
    x = centres[rng.integers(0, 60, 8000)] + 0.4 * rng.standard_normal((8000, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ivf = faiss.extract_index_ivf(ann.make_index("IVF64,Flat", DIM))
    centroids = ann.two_level_centroids(x, 64, ivf.cp, ivf.metric_type)
    assert centroids.shape == (64, DIM) and np.isfinite(centroids).all()
    one, two, again = (
        ann.train_index("IVF64,Flat", x, seed, level) for seed, level in ((0, 0), (0, 64), (0, 64))
    )
    assert ann.serialize(two).tobytes() == ann.serialize(again).tobytes() != ann.serialize(one).tobytes()
    assert ann.serialize(ann.train_index("IVF64,Flat", x, 1, 64)).tobytes() != ann.serialize(two).tobytes()
    recalls = []
    for trained in (one, two):
        index = ann.fill(ann.serialize(trained), x, np.arange(len(x), dtype=np.int64))
        ann.set_search_params(index, 4, 64)
        recalls.append(_recall(index, x, x[::40]))
    assert recalls[1] >= recalls[0] - 0.02, recalls


def test_hnsw_quantiser_is_the_same_graph_run_to_run_and_probes_at_least_nprobe(data):
    """An IVF with an HNSW coarse quantiser: trained twice, the same bytes (its centroids added on one
    thread); its quantiser searches with efSearch >= nprobe."""
    a, b = (ann.serialize(ann.train_index("IVF32_HNSW8,Flat", data, 0)) for _ in range(2))
    assert a.tobytes() == b.tobytes()
    index = ann.fill(a, data, np.arange(len(data), dtype=np.int64))
    ann.set_search_params(index, 24, 4)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert quantizer.hnsw.efSearch == 24
    assert _recall(index, data, data[::50]) > 0.95


def test_a_large_training_sample_trains_in_a_ray_task(store, ray_cluster, monkeypatch):
    """With engine 'ray' a training sample of TASK_SAMPLE_MB or more trains in one Ray task on the
    node's CPUs, not in the driver: the same trained index as in this process."""
    import os

    from embedpipe.workers.engines.ray_index import run_on_node

    pid, cpus = run_on_node(lambda cpus: (os.getpid(), cpus), (), 0)
    assert pid != os.getpid() and cpus == 2
    cfg = IndexConfig(factory="IVF16_HNSW8,PQ8x4", train_size=1000)
    here, _ = build_store_index(store, cfg, seed=2, engine="local")
    monkeypatch.setattr(build, "TASK_SAMPLE_MB", 0)
    in_task, _ = build_store_index(store, cfg, seed=2, engine="ray")
    assert all(np.array_equal(u, v) for u, v in zip(ann.codes_of(here), ann.codes_of(in_task), strict=True))
