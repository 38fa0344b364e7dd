"""Ray engine for the index build and the work on its parts: one Ray task of one CPU per part file
(``workers.index.build``), per shard file (``workers.evaluate.search``) or per store part
(``workers.evaluate.dba_parts``); and one task on every CPU of a node for the index training."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any


def map_parts(fn: Callable[..., Any], jobs: Sequence[tuple], shared: Any, max_retries: int) -> Iterator[Any]:
    """``fn(shared, *job)`` for each job as a Ray task of one CPU (a task whose worker dies is retried
    ``max_retries`` times), ``shared`` (the serialised trained index, the queries, a job description)
    put in the object store once and shared by every task. The tasks are submitted at once; their
    results come back in job order, each fetched when the caller reaches it (and released once used)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
    ref = ray.put(shared)
    pending = [task.remote(ref, *job) for job in jobs]
    return (ray.get(x) for x in pending)


def run_on_node(fn: Callable[..., Any], args: tuple, max_retries: int) -> Any:
    """``fn(cpus, *args)`` as one Ray task holding the CPUs of the largest node (those free now: a CPU
    held by an actor is not waited for; ``cpus``: how many, for the task's own threads), retried
    ``max_retries`` times if its worker dies; returns its result. For one computation that uses a
    node's cores and memory (the index training on its sample) away from the driver. Outside a Ray
    session, ``fn(0, *args)`` in this process."""
    import ray

    if not ray.is_initialized():
        return fn(0, *args)
    from embedpipe.workers.engines.ray_stages import node_resources

    largest = max((c for c, _ in node_resources()), default=1)
    cpus = max(1, int(min(largest, ray.available_resources().get("CPU", 1))))  # never waits on a held CPU
    task = ray.remote(num_cpus=cpus, max_retries=max_retries)(fn)
    return ray.get(task.remote(cpus, *args))
