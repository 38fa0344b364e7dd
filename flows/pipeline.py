"""The ``pipeline`` Prefect flow: ingest -> extract (Ray) -> fit (Dask) -> index + evaluate -> report.

Tasks are thin wrappers around plain functions from ``embedpipe.workers``. Each stage records a
fingerprint of its inputs and config in ``manifest.json``; a re-run with the same ``--out`` skips every
stage whose fingerprint is unchanged, so an interrupted run resumes and a finished run is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from embedpipe.flows.config import Config
from embedpipe.storage.artifacts import save_npz
from embedpipe.storage.dataset import manifest_rows, previous_shards, write_manifest
from embedpipe.storage.errors import RunFailed
from embedpipe.storage.features import read_store_manifest
from embedpipe.storage.layout import STAGES, RunLayout, write_json_atomic
from embedpipe.storage.quarantine import read_quarantine, write_quarantine
from embedpipe.workers.bow_eval import evaluate_bow
from embedpipe.workers.dask_jobs import encode_descriptor, fit_codebook, fit_pca_whitening
from embedpipe.workers.descriptors.local import encoding_of
from embedpipe.workers.encode import descriptor_info
from embedpipe.workers.evaluate import borrowed_whitening, index_and_evaluate, whitening_name
from embedpipe.workers.extract import extract_queries, run_extract
from embedpipe.workers.inputs import RunInputs, run_inputs
from embedpipe.workers.ray_stages import NodeWork, cluster_nodes, ray_session
from embedpipe.workers.report import fmt_metric, map_of, row_label, write_report


def _chain(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {}
    for dist in ("embedpipe", "torch", "timm", "ray", "prefect", "dask", "faiss-cpu", "pyarrow", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def fingerprints(cfg: Config, inputs: RunInputs) -> dict[str, str]:
    extract = _chain(inputs.fingerprint, cfg.fingerprint("extract", "local", "ingest"))
    fit = _chain(extract, cfg.fingerprint("fit", "bow"))
    return {
        "extract": extract,
        "fit": fit,
        "evaluate": _chain(fit, cfg.fingerprint("index", "rerank", "protocol", "verify")),
    }


class LazyRay:
    """Starts the run's Ray session the first time a stage needs it, and only then."""

    def __init__(self, cfg: Config, stack: contextlib.ExitStack):
        self.cfg, self.stack, self.started = cfg, stack, False
        self.work: NodeWork | None = None

    def ensure(self) -> None:
        if not self.started:
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


@task(name="extract", cache_policy=NO_CACHE)
def extract_task(cfg: Config, inputs: RunInputs, layout: RunLayout, ray: LazyRay) -> dict[str, Any]:
    ray.ensure()
    plan = inputs.plan
    result = run_extract(plan, cfg, layout)
    write_manifest(layout.dataset, manifest_rows(plan, result.inputs))
    listed = [{"path": k, "id": None, "stage": "ingest", "reason": r} for k, r in plan.problems]
    write_quarantine(layout.quarantine, result.quarantined + listed)
    if result.n_ok == 0:
        raise RunFailed(f"no usable image among {result.n_inputs} inputs (reasons in {layout.quarantine})")
    if inputs.query_refs:
        extract_queries(inputs.query_refs, inputs.query_boxes, cfg, layout)
    return {"n_ok": result.n_ok, "n_quarantined": len(result.quarantined), "summary": result.summary}


@task(name="fit", cache_policy=NO_CACHE)
def fit_task(cfg: Config, layout: RunLayout, ray: LazyRay) -> dict[str, Any]:
    logger = get_run_logger()
    if cfg.fit.scheduler == "ray":
        ray.ensure()
    fitted: dict[str, Any] = {}
    encoded = [d for d in cfg.extract.descriptors if encoding_of(d)[0] in ("bow", "vlad")]
    for name in encoded:  # codebooks, then the descriptor's store (bow-*: words; vlad-*: dense vectors)
        _, feature, k = descriptor_info(name, cfg)
        fit_codebook(layout, cfg, feature, k)
        fitted[name] = encode_descriptor(layout, cfg, name)["dim"]
    dense = [d for d in cfg.extract.descriptors if encoding_of(d)[0] != "bow"]
    for name in dense if cfg.fit.whiten else ():
        if cfg.fit.from_run is not None:  # learnt on another dataset
            dim = int(read_store_manifest(layout.feature_dir(name))["dim"])
            model, n = borrowed_whitening(cfg.fit.from_run, name, dim)
        else:
            model, n = fit_pca_whitening(layout.feature_dir(name), cfg.fit)
        meta = {
            "kind": "pca-whitening",
            "descriptor": name,
            "n_train": n,
            "fit": cfg.fit.model_dump(mode="json"),
        }
        save_npz(layout.model(whitening_name(name)), meta, **model)
        fitted[name] = int(model["proj"].shape[0])
        logger.info(
            "fit: PCA-whitening %s %d -> %d dims on %d vectors", name, model["mean"].shape[0], fitted[name], n
        )
    return fitted


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: Config, layout: RunLayout, n_images: int, ray: LazyRay) -> dict[str, Any]:
    if cfg.index.engine == "ray":
        ray.ensure()
    results, n_queries = [], 0
    for name in cfg.extract.descriptors:
        evaluate = evaluate_bow if encoding_of(name)[0] == "bow" else index_and_evaluate
        rows, n_queries = evaluate(layout, cfg, name)
        results.extend(rows)
    n_quarantined = read_quarantine(layout.quarantine).num_rows
    return {
        "protocol": cfg.protocol,
        "dataset": {
            "path": str(cfg.images),
            "n_images": n_images,
            "n_queries": n_queries,
            "n_quarantined": n_quarantined,
        },
        "results": results,
    }


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


@flow(name="pipeline", log_prints=False, validate_parameters=False)
def pipeline(cfg: Config) -> dict[str, Any]:
    """Run every stage for ``cfg`` into ``cfg.out``; returns the metrics.json content."""
    logger = get_run_logger()
    layout = RunLayout(cfg.out)
    inputs = run_inputs(cfg, previous_shards(layout.dataset))
    plan = inputs.plan
    fps = fingerprints(cfg, inputs)
    if all(layout.stage_done(s, fps[s]) for s in STAGES) and layout.metrics.exists():
        logger.info("run %s is complete and up to date: nothing to do", layout.root)
        return layout.read_manifest()["stages"]["evaluate"]["result"]
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.update_manifest(
        config=cfg.model_dump(mode="json"),
        versions=versions(),
        input={
            "path": plan.source,
            "n_files": len(plan.refs),
            "n_rejected_at_listing": len(plan.problems),
            "fingerprint": plan.fingerprint,
            "n_shards": plan.n_shards,
        },
    )
    logger.info("run %s: %d inputs in %d shard(s)", layout.root, len(plan.refs), plan.n_shards)
    with contextlib.ExitStack() as stack:
        ray = LazyRay(cfg, stack)
        extracted = _run_stage(
            layout, "extract", fps["extract"], lambda: extract_task(cfg, inputs, layout, ray), logger
        )
        if cfg.fit.whiten or any(encoding_of(d)[0] in ("bow", "vlad") for d in cfg.extract.descriptors):
            _run_stage(layout, "fit", fps["fit"], lambda: fit_task(cfg, layout, ray), logger)
        else:
            layout.mark_stage("fit", fps["fit"], "done", seconds=0.0, result={})
        metrics = _run_stage(
            layout,
            "evaluate",
            fps["evaluate"],
            lambda: evaluate_task(cfg, layout, extracted["n_ok"], ray),
            logger,
        )
        ray.record(layout)
    report_task(cfg, layout, metrics)
    best = max(metrics["results"], key=map_of)
    logger.info(
        "done: %s; best %s; mAP %s; report %s",
        extracted["summary"],
        row_label(best),
        fmt_metric(best.get("map")),
        layout.report_html,
    )
    return metrics
