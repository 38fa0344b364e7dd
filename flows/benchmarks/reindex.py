"""``embedpipe bench reindex``: a full run on a collection against ``reindex`` of a run made on the
collection without a ``fraction`` of its files, once those arrive: same config, one process.

The files held back are spread over the collection (every 1/fraction-th in sorted order: new photos of
the kinds already indexed) or, with ``tail``, the last ones (in the Holidays layout: whole new groups).
Both sides run against a Prefect server started before the clock (a scheduled reindex finds one
running); its start-up is reported apart. The reindex is timed twice from the same state, just before
and just after the full run, and the ratio takes their mean: a host whose speed drifts over the hour
(shared VMs) then moves both sides alike."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.flows.benchmarks.common import (
    add_images_argument,
    add_json_argument,
    with_demo_images,
    write_result,
)
from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.workers.ingest.sources import list_inputs

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.bench")


def _copy(files: list[Path], root: Path, into: Path) -> None:
    for f in files:
        target = into / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)


def _stage_seconds(run: Path) -> dict[str, float]:
    """Seconds of each stage of the run's last execution (from its manifest)."""
    stages = RunLayout(run).read_manifest()["stages"]
    return {name: float(state.get("seconds", 0.0)) for name, state in sorted(stages.items())}


def _phase_seconds(run: Path) -> dict[str, float]:
    """Finer seconds of the run's last execution (listing, Ray start, drift, report, ...)."""
    return RunLayout(run).read_manifest().get("timings", {})


def _side(run: Path, images: int) -> dict[str, Any]:
    """Stage and phase seconds of the run's last execution, and the images it extracted per second
    (equal on both sides unless the host's speed changed between them)."""
    stages = _stage_seconds(run)
    return {
        "stage_seconds": stages,
        "phase_seconds": _phase_seconds(run),
        "extract_images_per_s": round(images / max(stages.get("extract", 0.0), 1e-9), 2),
    }


def _settled() -> None:
    """Write the copies just made to disk before a clock starts: the kernel would otherwise flush them
    (after ``vm.dirty_expire_centisecs``) in the middle of the timed side, where it slowed the first
    batches of a reindex timed right after copying a large run."""
    os.sync()


def _timed_reindex(cfg: Config, n_new: int) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """``reindex`` timed: its metrics, its seconds, and its side of the JSON."""
    from embedpipe.flows.pipeline import reindex

    _settled()
    start = time.perf_counter()
    metrics = reindex(cfg)
    seconds = time.perf_counter() - start
    return metrics, seconds, {"seconds": round(seconds, 3), **_side(Path(cfg.out), n_new)}


def _scores(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The result rows without their timings: equal for two runs of the same work."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in metrics["results"]]


def held_back(files: list[Path], fraction: float, how: str) -> list[bool]:
    """Which of ``files`` (sorted) arrive later: ``spread``, every (1/fraction)-th file, the last of each
    run of that length, about ``fraction`` of them; ``tail``, the last ``fraction``."""
    n_new = max(1, round(len(files) * fraction))
    if how == "tail":
        return [i >= len(files) - n_new for i in range(len(files))]
    picks = {int((k + 1) * len(files) / n_new) - 1 for k in range(n_new)}
    return [i in picks for i in range(len(files))]


def _warm_up() -> None:
    """Start the Prefect server both timed sides then use, by calling a flow that does nothing."""
    from prefect import flow

    @flow(name="bench-warm-up", log_prints=False)
    def bench_warm_up() -> None:
        """Nothing: calling it starts the Prefect server."""

    bench_warm_up()


def _best_map(metrics: dict[str, Any]) -> float | None:
    from embedpipe.workers.report.html import map_of

    best = max(metrics["results"], key=map_of)
    return best.get("map")


def bench_reindex(cfg: Config, fraction: float, how: str = "spread") -> dict[str, Any]:
    """Ratio = full-run seconds / reindex seconds (the target is about 1 / fraction)."""
    from embedpipe.flows.pipeline import pipeline

    root = Path(str(cfg.images))
    if not root.is_dir():
        raise InputError(f"bench reindex needs a folder of images, got {cfg.images}")
    if not 0 < fraction < 1:
        raise InputError("--fraction must be between 0 and 1")
    files = sorted(Path(r.uri).resolve() for r in list_inputs(str(root)).refs)
    later = held_back(files, fraction, how)
    n_new = sum(later)
    if n_new >= len(files) or len(files) < 2:
        raise InputError(f"{len(files)} image(s) are too few to hold back {fraction:.0%} of them")
    work = Path(cfg.out)
    shutil.rmtree(work, ignore_errors=True)
    whole, grown = work / "images-all", work / "images-grown"
    _copy(files, root.resolve(), whole)
    _copy([f for f, x in zip(files, later, strict=True) if not x], root.resolve(), grown)

    start = time.perf_counter()
    _warm_up()
    prefect_s = time.perf_counter() - start
    # the untimed run first; then the reindex, the full run and the reindex again from the same state, so
    # that a drift of the host's speed over the hour (shared VMs) weighs on both sides alike
    run, before = work / "incremental", work / "incremental-before"
    pipeline(cfg.model_copy(update={"images": str(grown), "out": run}))
    _copy([f for f, x in zip(files, later, strict=True) if x], root.resolve(), grown)
    shutil.copytree(run, before)
    reindex_cfg = cfg.model_copy(update={"images": str(grown), "out": run})
    updated, first_s, first = _timed_reindex(reindex_cfg, n_new)
    _settled()
    start = time.perf_counter()
    full = pipeline(cfg.model_copy(update={"images": str(whole), "out": work / "full"}))
    full_s = time.perf_counter() - start
    shutil.rmtree(run)
    shutil.copytree(before, run)
    again, second_s, second = _timed_reindex(reindex_cfg, n_new)
    reindex_s = (first_s + second_s) / 2
    result = {
        "name": "reindex",
        "images": len(files),
        "new_images": n_new,
        "fraction": n_new / len(files),
        "held_back": how,
        "prefect_start_s": round(prefect_s, 3),
        "ours": {
            "what": "reindex after the new images arrive (mean of the runs before and after the full run)",
            "seconds": round(reindex_s, 3),
            "refit": updated["reindex"]["refit"],
            "drift": updated["reindex"]["drift"],
            "best_map": _best_map(updated),
            "same_metrics": _scores(updated) == _scores(again),
            "before_full_run": first,
            "after_full_run": second,
        },
        "baseline": {
            "what": "full run on the whole collection",
            "seconds": round(full_s, 3),
            "best_map": _best_map(full),
            **_side(work / "full", len(files)),
        },
        "ratio": round(full_s / reindex_s, 3),
        "ratio_before_after": [round(full_s / first_s, 3), round(full_s / second_s, 3)],
        "target_ratio": round(len(files) / n_new, 3),
    }
    log.info(
        "bench reindex: full run %.1fs, reindex of %d new image(s) %.1fs (%.1fs before, %.1fs after the "
        "full run), ratio %.2f (target ~%.1f)",
        full_s,
        n_new,
        reindex_s,
        first_s,
        second_s,
        result["ratio"],
        result["target_ratio"],
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    add_images_argument(parser)
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="share of the images that arrive later (0.1)"
    )
    parser.add_argument(
        "--held-back",
        choices=("spread", "tail"),
        default="spread",
        help="which files arrive later: every 1/fraction-th in sorted order (spread, default) or the last "
        "ones (tail)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """A folder of images (default: the demo dataset) copied and run under --out (default
    runs/bench-reindex); ``bench_reindex`` logs the summary."""
    from embedpipe.flows.config import config_from_args

    if args.out is None:
        args.out = Path("runs/bench-reindex")
    cfg = with_demo_images(config_from_args(args))
    write_result(bench_reindex(cfg, args.fraction, args.held_back), args.json)
    return 0
