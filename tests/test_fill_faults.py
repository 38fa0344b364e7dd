"""A Ray worker killed with -9 while it fills its part of an index (or writes its shard file), or while
it searches its shard of a sharded index, or while it computes DBA for its store part: Ray runs the
task again and the merged index is the same, code for code and id for id, as one process filling every
part (the shard files byte for byte); the merged top-k, and DBA's neighbour lists and vectors, the same
as an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from embedpipe.flows.benchmarks.store import synthetic_store
from embedpipe.storage.contracts.config import Config, IndexConfig, RayConfig
from embedpipe.storage.features import read_features
from embedpipe.storage.index_folder import read_ids, read_version
from embedpipe.workers.engines.ray_stages import ray_session
from embedpipe.workers.evaluate.dba_parts import PARTS_DIR, augment_sharded, read_lists
from embedpipe.workers.evaluate.search import ShardedIndex, StoreRows
from embedpipe.workers.index import ann
from embedpipe.workers.index.build import fill_from_store, publish_shards, publish_store_index

pytestmark = pytest.mark.slow


def _kill_first(title: str, killed: list[int], stop: threading.Event) -> None:
    """Kill -9 the first worker process seen running a task of ``title`` (Ray titles the worker
    ``ray::<function>`` while it runs one)."""
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or ())
            if cmd.startswith(title):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.005)


def test_worker_killed_during_the_index_fill_gives_the_same_index(tmp_path):
    store = synthetic_store(tmp_path / "store", 120_000, 64, 4)  # parts big enough to be caught filling
    _, x = read_features(store)
    trained = ann.serialize(ann.train_index("IVF64,PQ16", x[:20_000], seed=0))
    reference, ref_ids = fill_from_store(store, trained, "local")
    killed: list[int] = []
    stop = threading.Event()
    with ray_session(RayConfig(num_cpus=2)):
        killer = threading.Thread(target=_kill_first, args=("ray::_ray_fill", killed, stop))
        killer.start()
        try:
            index, ids = fill_from_store(store, trained, "ray", max_retries=3)
        finally:
            stop.set()
            killer.join()
    assert len(killed) == 1  # one fill task lost its worker mid-task ...
    assert index.ntotal == reference.ntotal == 120_000  # ... was run again, and nothing changed
    for ours, theirs in zip(ann.codes_of(index), ann.codes_of(reference), strict=True):
        assert np.array_equal(ours, theirs)
    assert ids.equals(ref_ids)


def test_worker_killed_during_the_sharded_fill_gives_the_same_shard_files(tmp_path):
    """A sharded index's shards are written by the fill tasks themselves: one killed mid-part is run
    again, and every shard file and the ids are those of one process filling every part."""
    store = synthetic_store(tmp_path / "store", 120_000, 64, 4)
    _, x = read_features(store)
    trained = ann.serialize(ann.train_index("IVF64,PQ16", x[:20_000], seed=0))
    reference = publish_shards(tmp_path / "local", store, trained, "local")
    killed: list[int] = []
    stop = threading.Event()
    with ray_session(RayConfig(num_cpus=2)):
        killer = threading.Thread(target=_kill_first, args=("ray::_ray_fill_shard", killed, stop))
        killer.start()
        try:
            version = publish_shards(tmp_path / "ray", store, trained, "ray", max_retries=3)
        finally:
            stop.set()
            killer.join()
    assert len(killed) == 1
    files = sorted(p.relative_to(version) for p in version.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".faiss"]) == 5  # four shards and the trained index
    for name in files:
        if name.suffix != ".parquet":
            assert (version / name).read_bytes() == (reference / name).read_bytes(), name
    assert read_ids(version).equals(read_ids(reference)) and read_ids(version).num_rows == 120_000


def test_worker_killed_during_the_sharded_search_gives_the_same_ranking(tmp_path):
    store = synthetic_store(tmp_path / "store", 80_000, 64, 4)
    _, x = read_features(store)
    cfg = IndexConfig(factory="Flat", layout="sharded", engine="local")
    _, _, version = publish_store_index(tmp_path / "index", store, cfg, 0, load=False)
    queries = x[::20]  # 4,000 queries: each shard's search takes long enough to be caught
    killed: list[int] = []
    stop = threading.Event()
    with ray_session(RayConfig(num_cpus=2)):
        sharded = ShardedIndex(version, 1, 16, max_retries=3)
        want_scores, want_ids = sharded.search(queries, 50)
        killer = threading.Thread(target=_kill_first, args=("ray::_search_shard", killed, stop))
        killer.start()
        try:
            scores, ids = sharded.search(queries, 50)
        finally:
            stop.set()
            killer.join()
    assert len(killed) == 1  # a shard's search lost its worker, ran again: the same bytes
    assert np.array_equal(ids, want_ids) and np.array_equal(scores, want_scores)
    # and the ranking of one process searching the shards together, up to float rounding and the
    # order of exact ties (broken here by the smaller id)
    local_scores, local_ids = ann.search(read_version(version), queries, 50)
    assert np.allclose(scores, local_scores, rtol=0, atol=1e-5)
    assert (ids == local_ids).mean() > 0.999


def test_worker_killed_during_dba_parts_gives_the_same_lists_and_vectors(tmp_path):
    """DBA over a sharded index runs one Ray task per store part (its rows searched against the
    shards, augmented, written as a part): a worker killed mid-part changes nothing in the neighbour
    lists or the augmented vectors the parts hold."""
    store = synthetic_store(tmp_path / "store", 40_000, 64, 4)  # parts big enough to be caught working
    icfg = IndexConfig(factory="Flat", layout="sharded", engine="local")
    _, _, version = publish_store_index(tmp_path / "index", store, icfg, 0, load=False)
    cfg = Config(index=icfg)
    rows = StoreRows(store, None, 64)
    killed: list[int] = []
    stop = threading.Event()
    with ray_session(RayConfig(num_cpus=2)):
        sharded = ShardedIndex(version, 1, 16, max_retries=3)
        augment_sharded(tmp_path / "plain", cfg, rows, sharded)
        killer = threading.Thread(target=_kill_first, args=("ray::dba_part", killed, stop))
        killer.start()
        try:
            augment_sharded(tmp_path / "killed", cfg, rows, sharded)
        finally:
            stop.set()
            killer.join()
    assert len(killed) == 1
    plain, again = read_lists(tmp_path / "plain" / PARTS_DIR), read_lists(tmp_path / "killed" / PARTS_DIR)
    assert all(np.array_equal(a, b) for a, b in zip(plain, again, strict=True))
    assert plain[1].shape == (40_000, cfg.rerank.dba_k + 1)
    assert (plain[1][:, 0] == np.arange(40_000)).mean() > 0.99  # each vector's nearest: itself
    vectors = [StoreRows(tmp_path / run / PARTS_DIR, None, 64).all() for run in ("plain", "killed")]
    assert np.array_equal(*vectors)
