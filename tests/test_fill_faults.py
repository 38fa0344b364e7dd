"""A Ray worker killed with -9 while it fills its part of an index: Ray runs the task again and the merged
index is the same, code for code and id for id, as one process filling every part."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from embedpipe.flows.benchmarks.store import synthetic_store
from embedpipe.storage.contracts.config import RayConfig
from embedpipe.storage.features import read_features
from embedpipe.workers.engines.ray_stages import ray_session
from embedpipe.workers.index import ann
from embedpipe.workers.index.build import fill_from_store

pytestmark = pytest.mark.slow


def _kill_first_fill(killed: list[int], stop: threading.Event) -> None:
    """Kill -9 the first worker process seen running a fill task (Ray titles it ``ray::_ray_fill``)."""
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or ())
            if cmd.startswith("ray::_ray_fill"):
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
        killer = threading.Thread(target=_kill_first_fill, args=(killed, stop))
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
