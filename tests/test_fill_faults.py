"""A Ray worker killed with -9 while it fills its part of an index, or while it searches its shard of a
sharded index (for the queries or for DBA's neighbour lists): Ray runs the task again and the merged
index is the same, code for code and id for id, as one process filling every part; the merged top-k
and the saved neighbour lists the same as an uninterrupted search's."""

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
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import read_features, read_parts
from embedpipe.storage.index_folder import read_version
from embedpipe.workers.engines.ray_stages import ray_session
from embedpipe.workers.evaluate.search import ShardedIndex
from embedpipe.workers.evaluate.stage import dba_neighbours, dba_neighbours_file
from embedpipe.workers.index import ann
from embedpipe.workers.index.build import fill_from_store, publish_store_index

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


def test_worker_killed_during_dba_neighbour_lists_gives_the_same_lists(tmp_path):
    """DBA's neighbour lists over a sharded index are searched by the shards' Ray tasks: a worker killed
    mid-search changes nothing in the saved lists."""
    store = synthetic_store(tmp_path / "store", 20_000, 64, 4)
    meta = read_parts(store, ["id", "path"])
    _, x = read_features(store)
    _, _, version = publish_store_index(
        tmp_path / "index",
        store,
        IndexConfig(factory="Flat", layout="sharded", engine="local"),
        0,
        load=False,
    )
    layout = RunLayout(tmp_path / "run")
    layout.report_dir.mkdir(parents=True)
    cfg = Config()
    killed: list[int] = []
    stop = threading.Event()
    with ray_session(RayConfig(num_cpus=2)):
        sharded = ShardedIndex(version, 1, 16, max_retries=3)
        dba_neighbours(layout, cfg, "plain", x, sharded, "Flat", meta, reuse=False)
        killer = threading.Thread(target=_kill_first, args=("ray::_search_shard", killed, stop))
        killer.start()
        try:
            dba_neighbours(layout, cfg, "killed", x, sharded, "Flat", meta, reuse=False)
        finally:
            stop.set()
            killer.join()
    assert len(killed) == 1
    plain = np.load(dba_neighbours_file(layout, "plain"))
    again = np.load(dba_neighbours_file(layout, "killed"))
    assert plain.files == again.files and all(np.array_equal(plain[k], again[k]) for k in plain.files)
    assert plain["ids"].shape == (20_000, cfg.rerank.dba_k + 1)
    assert (plain["ids"][:, 0] == np.arange(20_000)).mean() > 0.99  # each vector's nearest: itself
