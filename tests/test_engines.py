"""Engine settings without starting clusters: actor pools on several nodes, the Dask scheduler address,
node-work records, the deployment's parameters."""

from __future__ import annotations

import pytest

from embedpipe.flows.config import load_config
from embedpipe.storage.contracts.config import ExtractConfig, FitConfig
from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.workers.engines.dask_jobs import dask_scheduler
from embedpipe.workers.engines.ray_stages import NodeWork, cluster_pool, pool_size, record_work


@pytest.mark.parametrize(
    "nodes",
    [[(1, 0), (1, 0)], [(2, 0), (16, 0)], [(16, 0)] * 4, [(8, 1), (8, 1), (8, 1)], [(3, 0), (3, 0)]],
)
def test_pool_on_several_nodes_fits_every_actor_on_one_node(nodes):
    cfg = ExtractConfig()
    pool = cluster_pool(cfg, nodes)
    smallest = min(c for c, _ in nodes)
    per_node = pool_size(cfg, smallest, int(min(g for _, g in nodes)))
    assert pool.actors == per_node.actors * len(nodes)
    # an actor (plus a decode task, when decode is a stage) fits on the smallest node
    assert pool.actor_cpus + pool.decode_cpus <= smallest
    assert pool.actor_cpus * (pool.actors // len(nodes)) + pool.decode_cpus <= smallest
    assert pool.actor_gpus <= min(g for _, g in nodes) or pool.actor_gpus == 0


def test_pool_on_one_node_is_unchanged_and_actors_override():
    cfg = ExtractConfig()
    assert cluster_pool(cfg, [(2, 0)]) == pool_size(cfg, 2, 0)
    assert cluster_pool(ExtractConfig(actors=3), [(4, 0), (4, 0)]).actors == 3


def test_node_work_counts_rows_per_node():
    work = NodeWork()
    work.add("extract", ["b", "a", "a", ""])
    work.add("index", ["a"])
    assert work.as_dict() == {"extract": {"a": 2, "b": 1}, "index": {"a": 1}}
    record_work("extract", ["a"])  # outside a session: nothing to record on, no error


def test_dask_address_goes_with_the_distributed_scheduler():
    assert FitConfig(scheduler="distributed", dask_address="tcp://127.0.0.1:8786").dask_address
    with pytest.raises(InputError, match="fit.dask_address"):
        load_config(sets=["fit.dask_address=tcp://127.0.0.1:8786"])
    with pytest.raises(InputError, match="fit.dask_address"):
        load_config(sets=["fit.scheduler=distributed"])


def test_unreachable_dask_scheduler_is_one_line():
    from tests.cluster import free_port

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RunFailed, match=f"cannot reach the Dask scheduler at {address}") as err:
        with dask_scheduler("distributed", address):
            pass
    assert "\n" not in str(err.value)


def test_deployment_parameters_are_absolute_and_validate(small_holidays, tmp_path, monkeypatch):
    from embedpipe.flows.deploy import deployment_config, deployment_yaml
    from embedpipe.storage.contracts.config import Config

    monkeypatch.chdir(small_holidays.parent)  # relative paths: a run and its images in this folder
    cfg = load_config(overrides={"images": small_holidays.name, "out": "runs/x"})
    params = deployment_config(cfg)
    assert params["out"] == str(tmp_path / "runs" / "x")
    assert params["images"] == str(small_holidays)
    assert Config.model_validate(params).out == tmp_path / "runs" / "x"
    spec = deployment_yaml(cfg, "nightly", "0 2 * * *", "pool")
    (dep,) = spec["deployments"]
    assert dep["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert dep["work_pool"]["name"] == "pool" and dep["parameters"] == {"config": params}
