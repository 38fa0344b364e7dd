"""Ray engine for the index build and the work on its parts: one Ray task of one CPU per part file
(``workers.index.build``), per shard file (``workers.evaluate.search``) or per store part
(``workers.evaluate.dba_parts``)."""

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
