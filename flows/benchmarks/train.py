"""``embedpipe bench train``: seconds per fine-tuning step of Ray Train (N workers, as ``finetune`` sizes
them) vs a plain single-process PyTorch loop tuned for the machine, on the same model and the same
tuples. Cheap to import: torch, Ray and the workers are imported where they are used."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.flows.benchmarks.common import (
    add_images_argument,
    add_json_argument,
    with_demo_images,
    write_result,
)
from embedpipe.storage.contracts.errors import InputError, RunFailed

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.inputs import InputRef
    from embedpipe.workers.engines.ray_train import TrainContext

log = logging.getLogger("embedpipe.bench")


def bench_batches(cfg: Config, refs: list[InputRef], groups: np.ndarray, n_steps: int, per_step: int):
    """The tuples of ``n_steps`` steps of ``per_step`` tuples each, identical for both sides of the bench:
    labelled anchors/positives, negatives ranked by a seeded random embedding (what matters here is the
    work per step, not which negatives are hard)."""
    import numpy as np

    from embedpipe.workers.train.finetune import mine_tuples

    rng = np.random.default_rng(cfg.seed)
    vectors = rng.normal(size=(len(refs), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tuples, epoch = [], 0
    while len(tuples) < n_steps * per_step:
        tuples += mine_tuples(vectors, groups, cfg.finetune.negatives, cfg.seed, epoch)
        epoch += 1
    return [tuples[s * per_step : (s + 1) * per_step] for s in range(n_steps)]


def _timed_steps(
    model, opt, images, steps, cfg, spec, device, rank=0, world=1, allreduce=None, step_fn=None
) -> tuple[list[float], list[float]]:
    """Each step's seconds and loss (the mean over all the step's tuples, summed across workers), with
    the pipeline's ``train_step`` or ``step_fn`` (same arguments, no all-reduce)."""
    from embedpipe.workers.train.loop import train_step

    times, losses = [], []
    for step in steps:
        mine = step[rank::world]
        batch = [[images[t.query], images[t.positive], *[images[n] for n in t.negatives]] for t in mine]
        t0 = time.perf_counter()
        if step_fn is None:
            losses.append(train_step(model, opt, batch, len(step), cfg.finetune, spec, device, allreduce))
        else:
            losses.append(step_fn(model, opt, batch, len(step), cfg.finetune, spec, device))
        times.append(time.perf_counter() - t0)
    return times, losses


def batched_step(model, opt, batch, n_total: int, f, spec, device: str) -> float:
    """One optimiser step as a plain PyTorch loop would take it: every image of the step's tuples embedded
    in as few forward passes as their shapes allow (one per shape: BatchNorm is frozen, so an image's
    vector does not depend on its batch), then one backward over the mean tuple loss. Same loss as
    ``train_step`` up to float rounding."""
    import torch

    from embedpipe.workers.extract.embed import shape_buckets
    from embedpipe.workers.train.finetune import freeze_batchnorm, to_input, tuple_loss
    from embedpipe.workers.train.loop import train_autocast

    model.train()
    freeze_batchnorm(model)
    opt.zero_grad(set_to_none=False)
    images = [image for tuple_ in batch for image in tuple_]
    vectors: list = [None] * len(images)
    for group in shape_buckets([image.shape for image in images], len(images)):
        x = torch.cat([to_input(images[i], spec.mean, spec.std) for i in group]).to(device)
        with train_autocast(device, f.precision):
            out = model(x)
        for row, i in enumerate(group):
            vectors[i] = out[row]
    loss, start = torch.zeros((), dtype=torch.float32, device=device), 0
    for tuple_ in batch:
        rows = torch.stack(vectors[start : start + len(tuple_)]).float()
        loss = loss + tuple_loss(f.loss, rows, f.margin) / n_total
        start += len(tuple_)
    loss.backward()
    opt.step()
    return float(loss.detach().double().cpu())


def tune_baseline(cfg: Config, images, step, cpus: int, device: str) -> dict[str, Any]:
    """The baseline's set-up, as a user would tune it on this machine: every (torch threads, batched or
    one image per forward) pair takes the first step on a copy of the fresh model; the fastest wins.
    The copies are thrown away, so the baseline then starts from the same weights as ours."""
    import copy

    import torch

    from embedpipe.workers.train.loop import build_model, optimiser

    torch.manual_seed(cfg.seed)
    model, spec = build_model(cfg)
    model = model.to(device)
    warm = copy.deepcopy(model)  # one untimed step first: the first pass of a process pays for set-up
    _timed_steps(warm, optimiser(warm, cfg.finetune), images, [step], cfg, spec, device)
    del warm
    tried = []
    for threads in (
        sorted({1, max(1, cpus // 2), max(1, cpus)}) if device == "cpu" else [torch.get_num_threads()]
    ):
        for batched in (False, True):
            torch.set_num_threads(threads)
            trial = copy.deepcopy(model)
            opt = optimiser(trial, cfg.finetune)
            fn = batched_step if batched else None
            seconds = _timed_steps(trial, opt, images, [step], cfg, spec, device, step_fn=fn)[0][0]
            tried.append({"threads": threads, "batched": batched, "step_s": round(seconds, 4)})
    best = min(tried, key=lambda t: t["step_s"])
    return {**best, "tried": tried}


# the two sides take the same steps when their losses agree this closely: the workers' gradients are
# summed in another order than one process accumulates them, batched forwards round differently, and Adam
# carries those differences from step to step (other tuples would change a loss by percents)
SAME_LOSS_RTOL = 1e-3


def same_steps(ours: list[float], baseline: list[float]) -> float:
    """The largest relative difference between the two sides' step losses; ``RunFailed`` when it is
    above ``SAME_LOSS_RTOL`` (the sides did not do the same work, so their times cannot be compared)."""
    import numpy as np

    a, b = np.asarray(ours, np.float64), np.asarray(baseline, np.float64)
    diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if len(a) == len(b) else float("inf")
    if diff > SAME_LOSS_RTOL:
        raise RunFailed(
            f"bench train: the two sides' step losses differ (largest relative difference {diff:.2e}): "
            "they did not take the same steps, so their times are not compared"
        )
    return diff


def bench_loop(config: dict, ctx: TrainContext) -> None:
    """Ray Train worker of ``bench_train``: the same steps as the baseline, split over the workers."""
    import torch
    import torch.distributed as dist

    from embedpipe.workers.train.loop import build_model, load_images, optimiser

    cfg = config["cfg"]
    torch.set_num_threads(config["threads"])
    rank, world = ctx.rank, ctx.world
    device = ctx.gpu_device() if config["use_gpu"] else "cpu"
    torch.manual_seed(cfg.seed)
    model, spec = build_model(cfg)
    model = model.to(device)
    opt = optimiser(model, cfg.finetune)
    images = load_images(config["refs"], cfg.finetune.max_side, cfg)

    def allreduce(m, loss):
        if world > 1:
            for p in m.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
            dist.all_reduce(loss)

    times, losses = _timed_steps(
        model, opt, images, config["steps"], cfg, spec, device, rank, world, allreduce
    )
    with tempfile.TemporaryDirectory() as tmp:  # rank 0's step times and losses travel as a checkpoint file
        if rank == 0:
            (Path(tmp) / "steps.json").write_text(json.dumps({"times": times, "losses": losses}))
        ctx.report({"rank": rank}, checkpoint_dir=tmp if rank == 0 else None)


def bench_train(cfg: Config, n_steps: int) -> dict:
    """``embedpipe bench train``: seconds per training step of Ray Train (N workers, as ``finetune`` sizes
    them) vs a plain single-process PyTorch loop tuned for this machine (threads, and batched forwards or
    one image per forward, whichever is faster), on the same model and the same tuples, the baseline's
    steps before and after ours; the first step of each side is a warm-up, reported apart, and both
    sides must compute the same losses."""
    import numpy as np
    import torch

    from embedpipe.workers.engines.ray_stages import cluster_cpus, cluster_gpus, ray_session
    from embedpipe.workers.engines.ray_train import fit_torch
    from embedpipe.workers.train.loop import build_model, load_images, optimiser, training_inputs, worker_plan

    refs, groups, _ = training_inputs(cfg)
    with ray_session(cfg.ray):
        cpus, gpus = cluster_cpus(), cluster_gpus()
        n, use_gpu, threads, cpu_each = worker_plan(cfg.finetune, cpus, gpus)
        per_step = cfg.finetune.tuples_per_step * n
        steps = bench_batches(cfg, refs, groups, n_steps + 1, per_step)
        images_per_step = per_step * (2 + cfg.finetune.negatives)

        # baseline: one process, no Ray, its threads and batching tuned on this machine; its steps are
        # alternated with ours: the first half before Ray Train runs, the second half after
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        old_threads = torch.get_num_threads()
        images = load_images(refs, cfg.finetune.max_side, cfg)
        tuned = tune_baseline(cfg, images, steps[0], cpus, device)
        torch.set_num_threads(tuned["threads"])
        torch.manual_seed(cfg.seed)
        model, spec = build_model(cfg)
        model = model.to(device)
        base_opt = optimiser(model, cfg.finetune)
        step_fn = batched_step if tuned["batched"] else None
        half = 1 + (len(steps) - 1) // 2  # the warm-up step and the first half of the timed ones
        base_times, base_losses = _timed_steps(
            model, base_opt, images, steps[:half], cfg, spec, device, step_fn=step_fn
        )
        torch.set_num_threads(old_threads)

        with tempfile.TemporaryDirectory(prefix="embedpipe-bench-train-") as tmp:
            t0 = time.perf_counter()
            run = fit_torch(
                bench_loop,
                {
                    "cfg": cfg,
                    "refs": refs,
                    "steps": steps,
                    "threads": threads,
                    "use_gpu": use_gpu,
                },
                workers=n,
                use_gpu=use_gpu,
                cpu_each=cpu_each,
                storage_path=tmp,
                name="bench",
            )
            wall = time.perf_counter() - t0
            with run.checkpoint_dir() as d:  # rank 0's; every rank waits on each all-reduce
                ours_steps = json.loads((d / "steps.json").read_text())
        torch.set_num_threads(tuned["threads"])
        more_times, more_losses = _timed_steps(
            model, base_opt, images, steps[half:], cfg, spec, device, step_fn=step_fn
        )
        torch.set_num_threads(old_threads)
        del model
    base_times, base_losses = base_times + more_times, base_losses + more_losses
    ours_times = ours_steps["times"]
    loss_diff = same_steps(ours_steps["losses"], base_losses)

    def side(times: list[float], **extra) -> dict:
        steady = float(np.sum(times[1:]))
        return {
            "warmup_step_s": times[0],
            "steps": len(times) - 1,
            "time_s": steady,
            "step_s": steady / max(1, len(times) - 1),
            "images_per_s": images_per_step * (len(times) - 1) / steady if steady > 0 else None,
            **extra,
        }

    ours = side(ours_times, workers=n, threads_per_worker=threads, device=device, wall_with_startup_s=wall)
    baseline = side(
        base_times,
        workers=1,
        threads=tuned["threads"],
        batched=tuned["batched"],
        tuning=tuned["tried"],
        device=device,
    )
    return {
        "name": "train",
        "ours": ours,
        "baseline": baseline,
        "ratio": baseline["time_s"] / ours["time_s"] if ours["time_s"] > 0 else None,
        "backbone": cfg.extract.backbone,
        "max_side": cfg.finetune.max_side,
        "tuples_per_step": per_step,
        "images_per_step": images_per_step,
        "order": ["baseline (warm-up and first half)", "ours", "baseline (second half)"],
        "loss": cfg.finetune.loss,
        # both sides' loss at each step (warm-up first): the same steps, checked by ``same_steps``
        "losses": {"ours": ours_steps["losses"], "baseline": base_losses},
        "loss_max_rel_diff": loss_diff,
        "n_images": len(refs),
        "cluster": {"cpus": cpus, "gpus": gpus},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    add_images_argument(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after a warm-up (default 10)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Ray Train vs a plain PyTorch loop on the same model and tuples of --images (default: the demo)."""
    from embedpipe.flows.config import config_from_args

    if args.steps < 1:
        raise InputError("--steps must be at least 1")
    cfg = with_demo_images(config_from_args(args))
    result = bench_train(cfg, args.steps)
    write_result(result, args.json)
    log.info(
        "bench train: ours %.2f s/step (%d workers), baseline %.2f s/step, ratio %.2f",
        result["ours"]["step_s"],
        result["ours"]["workers"],
        result["baseline"]["step_s"],
        result["ratio"],
    )
    return 0
