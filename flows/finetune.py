"""The ``finetune`` Prefect flow: a thin wrapper over ``workers.train.run_finetune`` (Ray Train) and the
fine-tuning report, so training runs are tracked like pipeline runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from embedpipe.storage.contracts.config import Config
from embedpipe.workers.train.loop import run_finetune
from embedpipe.workers.train.report import write_finetune_report


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: Config, ft_dir: Path) -> dict[str, Any]:
    r = run_finetune(cfg, ft_dir)
    return {
        "ft_dir": str(r.ft_dir),
        "epochs": r.epochs,
        "resumed_from": r.resumed_from,
        "losses": r.losses,
        "workers": r.workers,
        "seconds": r.seconds,
        "validation": r.validation,
        "best_epoch": r.best_epoch,
    }


@flow(name="finetune", log_prints=False, validate_parameters=False)
def finetune(cfg: Config, ft_dir: Path) -> dict[str, Any]:
    """Fine-tune ``cfg.extract.backbone`` on ``cfg.images`` into ``ft_dir`` (resuming), then its report."""
    result = train_task(cfg, ft_dir)
    result["report"] = str(write_finetune_report(Path(result["ft_dir"])))
    losses = ", ".join(f"{v:.4f}" for v in result["losses"])
    get_run_logger().info("finetune: %d epochs, loss per epoch %s", result["epochs"], losses)
    if result["validation"]:
        curve = ", ".join(
            f"{c['epoch']}: {c['map']:.4f}"
            + (f" (base at the fine-tuning size: {c['map_at_size']:.4f})" if "map_at_size" in c else "")
            for c in result["validation"]
        )
        kept = result["best_epoch"]
        get_run_logger().info(
            "finetune: validation mAP per epoch (0: base) %s; kept %s",
            curve,
            f"epoch {kept}" if kept else "the base model (no epoch beat it)",
        )
    create_markdown_artifact(
        key="finetune-summary",
        markdown=f"Fine-tuned `{cfg.extract.backbone}` on `{cfg.images}`: {result['epochs']} epochs, "
        f"loss per epoch {losses}; backbone `{result['ft_dir']}`.",
    )
    return result
