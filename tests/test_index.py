"""FAISS factory indices: sharded Ray build == single-process build, incremental add, removal, versions."""

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
from embedpipe.workers.index import ann
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
