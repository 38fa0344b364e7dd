"""Ray Train binding: data-parallel training loops on a ``TorchTrainer`` of N workers.

A training loop is a plain module-level function ``loop(config, ctx)``: ``config`` is its own dict,
``ctx`` a ``TrainContext`` (rank, world size, the worker's GPU, the checkpoint to resume from, and
``report``). ``fit_torch`` starts N copies of it (gloo on CPU, NCCL on GPUs, one GPU per worker when
``use_gpu``); inside the loop ``torch.distributed`` holds the process group (all-reduce, gather). Ray
Train keeps the reported checkpoints under ``storage_path/name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe.storage.contracts.errors import RunFailed


class TrainContext:
    """What one worker of a training loop sees of Ray Train (only inside a ``fit_torch`` worker)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world: int = ctx.get_world_size()

    def gpu_device(self) -> str:
        """This worker's torch device when the workers have GPUs (``cuda:N``)."""
        import ray.train.torch

        return str(ray.train.torch.get_device())

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        """The folder of the checkpoint Ray Train gives this run to resume from, or None."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """Report ``metrics`` (every worker, every round); ``checkpoint_dir``: a folder Ray Train copies
        into its storage as this round's checkpoint (typically rank 0's only). Call it while the folder
        still exists."""
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)


def run_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point: ``config["loop"](config["config"], TrainContext())``."""
    config["loop"](config["config"], TrainContext())


@dataclass(frozen=True)
class TrainRun:
    """A finished ``fit_torch``."""

    result: Any  # Ray Train's Result

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path]:
        """The folder of the last checkpoint reported."""
        with self.result.checkpoint.as_directory() as d:
            yield Path(d)


def fit_torch(
    loop: Callable[[dict[str, Any], TrainContext], None],
    config: dict[str, Any],
    *,
    workers: int,
    use_gpu: bool,
    cpu_each: float,
    storage_path: str | Path,
    name: str,
    num_to_keep: int | None = None,
    max_failures: int | None = None,
    failure: str | None = None,
) -> TrainRun:
    """Run ``loop(config, ctx)`` on ``workers`` Ray Train workers of ``cpu_each`` CPUs (and one GPU each
    with ``use_gpu``); call it inside ``ray_session``. ``loop`` must be a module-level function (the
    workers import it). ``num_to_keep``: checkpoints kept, ``max_failures``: worker-group restarts (Ray
    Train's defaults when None). ``failure``: when given, an error of the run (Ray wraps worker errors in
    its own types) becomes ``RunFailed("<failure>: <its first line>")``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_options: dict[str, Any] = {}
    if num_to_keep is not None:
        run_options["checkpoint_config"] = CheckpointConfig(num_to_keep=num_to_keep)
    if max_failures is not None:
        run_options["failure_config"] = FailureConfig(max_failures=max_failures)
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"loop": loop, "config": config},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpu_each, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(storage_path=str(storage_path), name=name, **run_options),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors in its own types
        if failure is None:
            raise
        raise RunFailed(f"{failure}: {str(err).splitlines()[0]}") from err
    return TrainRun(result)
