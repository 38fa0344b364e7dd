"""The pipeline on a real two-node Ray cluster and a real Dask scheduler, both started on this machine:
work on both Ray nodes, the fit on the Dask scheduler, and a Ray worker killed mid-stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cluster import dask_cluster, group_processes, ray_two_nodes, scheduler_task_counts
from tests.helpers import demo_subset

pytestmark = pytest.mark.slow

SETS = ["--set", "extract.shard_size=8", "--set", "extract.batch_size=2", "--set", "extract.max_side=256"]
SETS += ["--set", "fit.dim=16", "--set", "rerank.methods=[]"]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clusters")
    with ray_two_nodes(tmp) as ray_cluster, dask_cluster(tmp) as dask:
        yield ray_cluster, dask


@pytest.fixture(scope="module")
def holidays(tmp_path_factory, demo_images) -> Path:
    """The ``small_holidays`` images (three groups of the demo dataset and two distractors), for the
    module's runs."""
    root = tmp_path_factory.mktemp("cluster-holidays") / "holidays"
    return demo_subset(demo_images, root, (1000, 1001, 1002), (200001, 200101))


@pytest.fixture(scope="module")
def reference(clusters, holidays, tmp_path_factory) -> tuple[Path, int]:
    """One uninterrupted run on both clusters: its folder and the Dask scheduler's part_moments tasks
    it added."""
    ray_cluster, dask = clusters
    tmp = tmp_path_factory.mktemp("reference")
    env = {**ray_cluster.env, "PREFECT_HOME": str(tmp / "prefect")}
    before = scheduler_task_counts(dask.address).get("part_moments", 0)
    proc = run_cli(env, *run_args(holidays, tmp / "run", ray_cluster.address, dask.address))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return tmp / "run", scheduler_task_counts(dask.address).get("part_moments", 0) - before


def run_cli(env: dict[str, str], *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedpipe.flows.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_args(images: Path, out: Path, ray_address: str, dask_address: str) -> list:
    engines = ["--ray-address", ray_address, "--dask-address", dask_address]
    return ["run", "--images", images, "--out", out, *engines, *SETS]


def outputs(run: Path) -> dict[str, bytes]:
    """Every feature, model and index file of a run, and metrics.json without its timings."""
    files = {}
    for folder in ("features", "models", "index"):
        for p in sorted((run / folder).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(run))] = p.read_bytes()
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for row in metrics["results"]:
        row.pop("time_s", None)
    metrics["dataset"].pop("path")
    files["metrics"] = json.dumps(metrics, sort_keys=True).encode()
    return files


def test_run_on_two_ray_nodes_and_a_dask_scheduler(clusters, reference):
    _, dask = clusters
    run, moments_tasks = reference
    manifest = json.loads((run / "manifest.json").read_text())
    ips = {n["node_id"]: n["ip"] for n in manifest["ray"]["nodes"]}
    assert sorted(ips.values()) == ["127.0.0.2", "127.0.0.3"]
    work = manifest["ray"]["work"]
    # every image was embedded by a model actor on one of the two nodes, and both nodes took part
    assert sum(work["extract"].values()) == 23
    assert {ips[n] for n in work["extract"]} == {"127.0.0.2", "127.0.0.3"}
    # four indices (gem, spoc; raw and whitened), three parts each: one-CPU tasks spread by Ray
    assert sum(work["index"].values()) == 4 * 3 and set(work["index"]) <= set(ips)
    # the PCA moments were computed by the Dask scheduler's worker: one task per part, gem and spoc
    assert moments_tasks == 2 * 3
    assert manifest["config"]["fit"]["dask_address"] == dask.address
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["dataset"]["n_images"] == 23
    assert min(r["map"] for r in metrics["results"]) >= 0.95  # every row finds every copy here (1.0)


def _kill_actor_when_busy(pgids: list[int], killed: list[int], stop: threading.Event, every: bool) -> None:
    """Kill -9 a model actor's worker process while it is embedding a batch (its process title names
    the method it runs); with ``every``, each one that appears, until ``stop``."""
    while not stop.is_set():
        for pid, cmd in group_processes(pgids):
            if "EmbedActor.embed" in cmd and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                if not every:
                    return
        time.sleep(0.05)


def test_worker_killed_mid_stage_is_retried_with_identical_output(clusters, holidays, reference, tmp_path):
    ray_cluster, dask = clusters
    env = {**ray_cluster.env, "PREFECT_HOME": str(tmp_path / "prefect")}
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_actor_when_busy, args=(ray_cluster.pgids, killed, stop, False))
    killer.start()
    proc = run_cli(env, *run_args(holidays, tmp_path / "killed", ray_cluster.address, dask.address))
    _, err = proc.communicate(timeout=600)
    stop.set()
    killer.join()
    assert proc.returncode == 0, err[-3000:]
    assert len(killed) == 1  # one model actor died while it embedded a batch ...
    assert outputs(tmp_path / "killed") == outputs(reference[0])  # ... and nothing of the output changed


def test_worker_that_keeps_dying_fails_the_run_resumably(clusters, holidays, tmp_path):
    ray_cluster, dask = clusters
    env = {**ray_cluster.env, "PREFECT_HOME": str(tmp_path / "prefect")}
    args = run_args(holidays, tmp_path / "run", ray_cluster.address, dask.address)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_actor_when_busy, args=(ray_cluster.pgids, killed, stop, True))
    killer.start()
    proc = run_cli(env, *args, "--set", "ray.max_retries=1")
    _, err = proc.communicate(timeout=600)
    stop.set()
    killer.join()
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("embedpipe: error:")]
    assert len(lines) == 1 and "extraction failed on the Ray cluster" in lines[0], err[-3000:]
    assert len(killed) >= 2
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    # the stage is recorded as unfinished, so re-running the command redoes it (the pipeline's resume by
    # stage state and fingerprint); nothing after it ran
    assert manifest["stages"]["extract"]["state"] == "running"
    assert set(manifest["stages"]) == {"extract"}
    assert not (tmp_path / "run" / "report" / "metrics.json").exists()
