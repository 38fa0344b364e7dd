"""The ``pipeline`` Prefect flow: ingest -> extract (Ray) -> fit (Dask) -> index + evaluate -> report.

Tasks are thin wrappers around plain functions from ``embedpipe.workers``. Each stage records a
fingerprint of its inputs and config in ``manifest.json``; a re-run with the same ``--out`` skips every
stage whose fingerprint is unchanged, so an interrupted run resumes and a finished run is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.errors import EmbedpipeError, InputError, WriteFailed
from embedpipe.storage.contracts.layout import STAGES, RunLayout, write_json_atomic
from embedpipe.storage.dataset import previous_shards
from embedpipe.storage.features import kept_store_reads
from embedpipe.storage.inputs import InputRef
from embedpipe.storage.lease import run_lease
from embedpipe.workers.engines.ray_stages import NodeWork, SharedModels, cluster_nodes, ray_session
from embedpipe.workers.evaluate.run import evaluate_run
from embedpipe.workers.extract.stage import (
    config_fingerprint,
    extract_queries,
    extract_shard,
    finish_extract,
    pending_shards,
    record_extract,
    stage_models,
)
from embedpipe.workers.fit.stage import drift_summary, fit_models, needs_fit, should_refit, whitening_drifts
from embedpipe.workers.ingest.inputs import RunInputs, run_inputs
from embedpipe.workers.ingest.plan import run_listings
from embedpipe.workers.progress import Progress
from embedpipe.workers.report.html import fmt_metric, map_of, row_label, write_report


def _chain(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {}
    for dist in ("embedpipe", "torch", "timm", "ray", "prefect", "dask", "faiss-cpu", "pyarrow", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def fingerprints(cfg: Config, inputs: RunInputs) -> dict[str, str]:
    extract = _chain(inputs.fingerprint, config_fingerprint(cfg))
    fit = _chain(extract, cfg.fingerprint("fit", "bow"))
    return {
        "extract": extract,
        "fit": fit,
        "evaluate": _chain(fit, cfg.fingerprint("index", "rerank", "protocol", "verify", "eval")),
    }


class Timings(dict):
    """Seconds of the phases of one execution (listing, Ray start, drift, report, ...): the manifest's
    ``timings``, beside the stages' own seconds."""

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = round(self.get(phase, 0.0) + time.perf_counter() - start, 3)


class LazyRay:
    """Starts the run's Ray session the first time a stage needs it, and only then."""

    def __init__(self, cfg: Config, stack: contextlib.ExitStack, timings: Timings | None = None):
        self.cfg, self.stack, self.started = cfg, stack, False
        self.work: NodeWork | None = None
        self.timings = timings if timings is not None else Timings()

    def ensure(self) -> None:
        if not self.started:
            with self.timings("ray_start"):
                self.work = self.stack.enter_context(ray_session(self.cfg.ray))
            self.started = True

    def record(self, layout: RunLayout) -> None:
        """The manifest's ``ray`` section: the cluster's nodes and, per stage, the rows (extract) or
        parts (index) each node id processed; stages skipped by this run keep their earlier entry."""
        if self.work is None:
            return
        earlier = layout.read_manifest().get("ray", {}).get("work", {})
        layout.update_manifest(
            ray={
                "address": self.cfg.ray.address or "local",
                "nodes": cluster_nodes(),
                "work": {**earlier, **self.work.as_dict()},
            }
        )


@task(
    name="extract-shard",
    cache_policy=NO_CACHE,
    task_run_name="extract-shard-{shard:05d}",
    tags=["embedpipe-extract"],  # a Prefect tag concurrency limit caps shard tasks across runs
)
def extract_shard_task(
    refs: tuple[InputRef, ...],
    shard: int,
    n_shards: int,
    cfg: Config,
    layout: RunLayout,
    models: SharedModels,
    progress: Progress,
) -> dict[str, Any]:
    """One shard of the extraction: its parts and then its record (Ray does the compute). A failed
    attempt drops the model actors, so a retry starts fresh ones."""
    try:
        record = extract_shard(refs, shard, n_shards, cfg, layout, models, progress)
    except Exception:
        models.close()
        raise
    return {"shard": shard, "inputs": len(refs), "reused": record["reused"]}


def _retry_transient(task, task_run, state) -> bool:
    """Retry a shard unless it failed on bad usage or config, or on a full or failing disk (which a
    retry seconds later cannot mend; the same command resumes once there is room)."""
    err = state.result(raise_on_failure=False)
    return not (isinstance(err, WriteFailed) or (isinstance(err, EmbedpipeError) and err.exit_code == 2))


def extract_stage(cfg: Config, inputs: RunInputs, layout: RunLayout, ray: LazyRay) -> dict[str, Any]:
    """One Prefect task per shard not yet up to date (retries with back-off), one after the other on
    model actors they share (Ray spreads each shard's batches over the cluster), then the stores,
    dataset manifest and quarantine."""
    logger = get_run_logger()
    plan, orch = inputs.plan, cfg.orchestration
    sizes = plan.shard_sizes()
    n_shards = len(sizes)
    todo = pending_shards(plan, cfg, layout)
    logger.info("extract: %d of %d shard(s) to do", len(todo), n_shards)
    progress = Progress("extract", sum(sizes[s] for s in todo), logging.getLogger("embedpipe.extract"))
    run = extract_shard_task.with_options(
        retries=orch.retries,
        retry_delay_seconds=exponential_backoff(orch.retry_delay_s) if orch.retries else 0,
        retry_condition_fn=_retry_transient,
    )
    if todo:
        ray.ensure()
        models = stage_models(cfg)
        try:
            for shard in todo:
                run(plan.refs_of(shard), shard, plan.n_shards, cfg, layout, models, progress)
        finally:
            models.close()
    result = finish_extract(plan, cfg, layout, progress)
    record_extract(plan, cfg, layout, result)
    if inputs.query_refs:
        ray.ensure()
        extract_queries_task(cfg, inputs, layout)
    return {
        "n_ok": result.n_ok,
        "n_quarantined": len(result.quarantined),
        "shards": n_shards,
        "shards_done": len(todo),
        "summary": result.summary,
    }


@task(name="extract-queries", cache_policy=NO_CACHE)
def extract_queries_task(cfg: Config, inputs: RunInputs, layout: RunLayout) -> str:
    return extract_queries(inputs.query_refs, inputs.query_boxes, cfg, layout)


@task(name="fit", cache_policy=NO_CACHE)
def fit_task(cfg: Config, layout: RunLayout, ray: LazyRay) -> dict[str, Any]:
    if cfg.fit.scheduler == "ray":
        ray.ensure()
    return fit_models(cfg, layout, get_run_logger())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: Config, layout: RunLayout, n_images: int, ray: LazyRay, incremental: bool = False
) -> dict[str, Any]:
    """Index and evaluate every descriptor (``incremental``: update the live indices, no retraining)."""
    if cfg.index.engine == "ray":
        ray.ensure()
    return evaluate_run(cfg, layout, n_images, incremental)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """The metrics table as Markdown, best mAP first (the flow run's artifact in the Prefect UI)."""
    rows = sorted(metrics["results"], key=lambda r: -map_of(r))
    lines = [
        "| descriptor | post | rerank | dim | bytes/vector | mAP | mP@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['descriptor']} | {r['post']} | {r['rerank']} | {r['dim']} | {r['bytes_per_vector']} | "
            f"{fmt_metric(r.get('map'))} | {fmt_metric(r.get('mp@10'))} |"
        )
    ds = metrics["dataset"]
    head = (
        f"**{metrics['protocol']}** on `{ds['path']}`: {ds['n_images']} images, {ds['n_queries']} queries\n\n"
    )
    return head + "\n".join(lines)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: Config, layout: RunLayout, metrics: dict[str, Any]) -> None:
    write_json_atomic(layout.metrics, metrics)
    write_report(layout, cfg)
    create_table_artifact(
        key="metrics", table=metrics["results"], description=f"embedpipe metrics, {layout.root}"
    )
    create_markdown_artifact(
        key="metrics-summary", markdown=metrics_markdown(metrics), description="embedpipe results, best first"
    )


def _run_stage(layout: RunLayout, stage: str, fp: str, fn, logger) -> Any:
    if layout.stage_done(stage, fp):
        logger.info("%s: up to date, skipped", stage)
        return layout.read_manifest()["stages"][stage].get("result")
    layout.mark_stage(stage, fp, "running")
    start = time.perf_counter()
    result = fn()
    layout.mark_stage(stage, fp, "done", seconds=round(time.perf_counter() - start, 3), result=result)
    return result


def _listed_inputs(cfg: Config, layout: RunLayout) -> RunInputs:
    """The run's inputs, planned against its earlier plan (tar shards unchanged since it are not read
    again)."""
    with run_listings(layout.root):
        return run_inputs(cfg, previous_shards(layout.dataset))


def _start(layout: RunLayout, cfg: Config, inputs: RunInputs, logger) -> None:
    plan = inputs.plan
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.update_manifest(
        config=cfg.model_dump(mode="json"),
        versions=versions(),
        input={
            "path": plan.source,
            "n_files": len(plan),
            "n_rejected_at_listing": len(plan.problems),
            "fingerprint": plan.fingerprint,
            "n_shards": plan.n_shards,
        },
    )
    logger.info("run %s: %d inputs in %d shard(s)", layout.root, len(plan), plan.n_shards)


def _extract(
    layout: RunLayout, cfg: Config, inputs: RunInputs, fp: str, ray: LazyRay, logger
) -> dict[str, Any]:
    return _run_stage(layout, "extract", fp, lambda: extract_stage(cfg, inputs, layout, ray), logger)


def _fit(layout: RunLayout, cfg: Config, fp: str, ray: LazyRay, logger) -> None:
    if needs_fit(cfg):
        _run_stage(layout, "fit", fp, lambda: fit_task(cfg, layout, ray), logger)
    else:
        layout.mark_stage("fit", fp, "done", seconds=0.0, result={})


def _finish(
    cfg: Config,
    layout: RunLayout,
    metrics: dict[str, Any],
    extracted: dict[str, Any],
    logger,
    timings: Timings,
) -> None:
    with timings("report"):
        report_task(cfg, layout, metrics)
    layout.update_manifest(timings=dict(timings))
    best = max(metrics["results"], key=map_of)
    logger.info(
        "done: %s; best %s; mAP %s; report %s",
        extracted["summary"],
        row_label(best),
        fmt_metric(best.get("map")),
        layout.report_html,
    )


def run_dir_lease(cfg: Config, command: str, wait: bool) -> contextlib.AbstractContextManager:
    """The lease of the run directory ``cfg.out`` (see ``storage.lease``): one writer at a time; a no-op
    when this process holds it already."""
    orch = cfg.orchestration
    return run_lease(cfg.out, command, wait, orch.lease_heartbeat_s, orch.lease_stale_s)


@flow(name="pipeline", log_prints=False, validate_parameters=False)
def pipeline(cfg: Config, wait: bool = False) -> dict[str, Any]:
    """Run every stage for ``cfg`` into ``cfg.out``; returns the metrics.json content. The run directory's
    lease is held throughout: another writer holding it raises ``RunBusy``, or with ``wait`` is waited
    for."""
    with run_dir_lease(cfg, "run", wait):
        return _pipeline(cfg)


def _pipeline(cfg: Config) -> dict[str, Any]:
    logger = get_run_logger()
    layout, timings = RunLayout(cfg.out), Timings()
    with timings("list"):
        inputs = _listed_inputs(cfg, layout)
        fps = fingerprints(cfg, inputs)
    if all(layout.stage_done(s, fps[s]) for s in STAGES) and layout.metrics.exists():
        logger.info("run %s is complete and up to date: nothing to do", layout.root)
        return layout.read_manifest()["stages"]["evaluate"]["result"]
    _start(layout, cfg, inputs, logger)
    with kept_store_reads():  # evaluation and report read the same stores
        with contextlib.ExitStack() as stack:
            ray = LazyRay(cfg, stack, timings)
            extracted = _extract(layout, cfg, inputs, fps["extract"], ray, logger)
            _fit(layout, cfg, fps["fit"], ray, logger)
            metrics = _run_stage(
                layout,
                "evaluate",
                fps["evaluate"],
                lambda: evaluate_task(cfg, layout, extracted["n_ok"], ray),
                logger,
            )
            ray.record(layout)
        _finish(cfg, layout, metrics, extracted, logger, timings)
    return metrics


def _check_finished(layout: RunLayout) -> None:
    if not layout.metrics.exists():
        raise InputError(f"{layout.root} is not a finished run (no report/metrics.json): run it first")


@flow(name="reindex", log_prints=False, validate_parameters=False)
def reindex(cfg: Config, wait: bool = False) -> dict[str, Any]:
    """Bring the finished run at ``cfg.out`` up to date with ``cfg.images``: extract only new and changed
    inputs (shards of unchanged inputs are kept), keep the fitted whitening unless the new vectors drift
    past ``reindex.drift_threshold``, add the new vectors to the live indices and remove the gone ones
    without retraining, publish each as a new version, and evaluate again. Holds the run directory's
    lease throughout (``wait``: as for ``pipeline``)."""
    _check_finished(RunLayout(cfg.out))  # before the lease, which would make a missing folder
    with run_dir_lease(cfg, "reindex", wait):
        return _reindex(cfg)


def _reindex(cfg: Config) -> dict[str, Any]:
    logger = get_run_logger()
    layout = RunLayout(cfg.out)
    _check_finished(layout)  # again: a writer waited for may have changed it
    timings = Timings()
    with timings("list"):
        inputs = _listed_inputs(cfg, layout)
        fps = fingerprints(cfg, inputs)
    if all(layout.stage_done(s, fps[s]) for s in STAGES):
        logger.info("run %s is up to date with %s: nothing to do", layout.root, cfg.images)
        return layout.read_manifest()["stages"]["evaluate"]["result"]
    _start(layout, cfg, inputs, logger)
    with kept_store_reads():  # drift check, evaluation and report read the same stores
        with contextlib.ExitStack() as stack:
            ray = LazyRay(cfg, stack, timings)
            extracted = _extract(layout, cfg, inputs, fps["extract"], ray, logger)
            with timings("drift"):
                drift = whitening_drifts(layout, cfg)
            refit = should_refit(cfg, drift)
            logger.info("%s", drift_summary(cfg, drift, refit))
            if refit:
                _fit(layout, cfg, fps["fit"], ray, logger)
            else:
                layout.mark_stage("fit", fps["fit"], "done", seconds=0.0, result={"kept": True})
            metrics = _run_stage(
                layout,
                "evaluate",
                fps["evaluate"],
                lambda: {
                    **evaluate_task(cfg, layout, extracted["n_ok"], ray, incremental=not refit),
                    "reindex": {
                        "drift": drift,
                        "refit": refit,
                        "shards_extracted": extracted.get("shards_done"),
                    },
                },
                logger,
            )
            ray.record(layout)
        _finish(cfg, layout, metrics, extracted, logger, timings)
    return metrics


def _saved_config(layout: RunLayout) -> dict[str, Any] | None:
    """The run's saved config as JSON, with the defaults of keys added since it was written."""
    saved = layout.read_manifest().get("config")
    if saved is None:
        return None
    try:
        return Config.model_validate(saved).model_dump(mode="json")
    except ValueError:  # a config of another version of the schema: compared as it is
        return saved


def update(cfg: Config, wait: bool = False) -> dict[str, Any]:
    """Bring the run at ``cfg.out`` up to date with ``cfg.images`` (what scheduled runs execute, with
    ``wait``: a scheduled run waits for a writer holding the run directory): a finished run made with
    the same config apart from its images is reindexed; anything else (a new, unfinished or reconfigured
    run) goes through the pipeline, which resumes what it can. The decision is made under the lease."""
    with run_dir_lease(cfg, "update", wait):
        layout = RunLayout(cfg.out)
        saved = _saved_config(layout)
        now = cfg.model_dump(mode="json")
        same = saved is not None and {k: v for k, v in saved.items() if k not in ("images", "out")} == {
            k: v for k, v in now.items() if k not in ("images", "out")
        }
        return reindex(cfg, wait=wait) if same and layout.metrics.exists() else pipeline(cfg, wait=wait)
