"""``embedpipe`` command line. Exit codes: 0 success, 1 run failed, 2 bad usage or bad input."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from embedpipe.flows.benchmarks import BENCHES
from embedpipe.flows.benchmarks.common import write_json
from embedpipe.flows.config import (
    add_config_arguments,
    add_set_argument,
    add_set_arguments,
    config_from_args,
    engine_overrides,
)
from embedpipe.storage.contracts.errors import EmbedpipeError, InputError

log = logging.getLogger("embedpipe")

PROTOCOLS = ("holidays", "oxford5k", "paris6k", "roxford5k", "rparis6k", "ukbench", "labels", "none")
EVAL_PROTOCOLS = ("holidays", "oxford5k", "paris6k", "roxford5k", "rparis6k", "ukbench")

# Prefect runs on its ephemeral local server unless the user points PREFECT_API_URL elsewhere;
# Ray and Dask stay on loopback. Users' own settings win.
ENV_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def add_wait_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another writer holds the run directory, wait for it instead of exiting",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedpipe", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="whole pipeline on the bundled demo dataset (no network)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    add_set_argument(demo)
    add_wait_argument(demo)

    run = sub.add_parser("run", help="whole pipeline on your images")
    run.add_argument("config", nargs="?", type=Path, help="YAML config file")
    run.add_argument(
        "--images",
        help="folder, glob, list (.txt/.csv/.parquet), tar/WebDataset shards ({000..009}) or URL",
    )
    run.add_argument("--protocol", choices=PROTOCOLS, help="evaluation protocol (default holidays)")
    run.add_argument(
        "--ground-truth",
        help="Oxford/Paris ground truth: gt/ folder or revisitop gnd_*.pkl (default: in the images folder)",
    )
    run.add_argument(
        "--distractors",
        help="extra database images, any input form (never queries or positives): e.g. Flickr100k, R1M",
    )
    add_config_arguments(run)

    run.add_argument(
        "--backbone",
        help="backbone name, or a folder written by 'embedpipe finetune' (its image size comes along)",
    )
    add_wait_argument(run)

    reindex = sub.add_parser(
        "reindex", help="bring a finished run up to date with a changed collection, without a full rebuild"
    )
    reindex.add_argument("run", type=Path, help="the run directory")
    reindex.add_argument("--images", required=True, help="the collection now (any form `run` takes)")
    add_set_arguments(reindex)
    add_wait_argument(reindex)

    deploy = sub.add_parser(
        "deploy", help="serve a Prefect deployment that keeps a run up to date with its images on a schedule"
    )
    deploy.add_argument("config", nargs="?", type=Path, help="YAML config file")
    deploy.add_argument("--cron", required=True, help='schedule (UTC), e.g. "0 2 * * *" for 02:00 daily')
    deploy.add_argument("--images", help="the inputs to follow (any form, as for 'run --images')")
    deploy.add_argument("--protocol", choices=PROTOCOLS, help="evaluation protocol (default holidays)")
    deploy.add_argument("--ground-truth", help="Oxford/Paris ground truth, as for 'run'")
    deploy.add_argument("--name", help="deployment name (default update-<name of --out>)")
    deploy.add_argument(
        "--write-yaml",
        type=Path,
        metavar="PATH",
        help="write a prefect.yaml-style deployment file for 'prefect deploy' instead of serving",
    )
    deploy.add_argument(
        "--work-pool", default="embedpipe", help="process work pool named in --write-yaml (default embedpipe)"
    )
    add_config_arguments(deploy)

    ft = sub.add_parser("finetune", help="fine-tune the backbone for retrieval on Ray Train")
    ft.add_argument("config", nargs="?", type=Path, help="YAML config file")
    ft.add_argument("--images", help="training images (labels or Holidays layout), never the evaluation set")
    ft.add_argument(
        "--out", type=Path, required=True, help="FT_DIR: backbone, checkpoints (re-running resumes)"
    )
    ft.add_argument("--loss", choices=("contrastive", "triplet"), help="tuple loss (default contrastive)")
    ft.add_argument("--epochs", type=int, help="epochs (default 5)")
    ft.add_argument(
        "--validate",
        help="validation collection (finetune.validation_protocol, default holidays), never training "
        "images: the best epoch is kept, the base model when none beats it",
    )
    ft.add_argument("--preset", help="named preset (see 'embedpipe presets')")
    add_set_arguments(ft)
    add_wait_argument(ft)

    ingest = sub.add_parser("ingest", help="the ingest stage alone: manifest, shard plan, resized shards")
    ingest.add_argument("images", help="any input form, as for 'run --images'")
    ingest.add_argument("--out", type=Path, required=True, help="output folder (re-running resumes)")
    ingest.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="downscale larger images to this longer side (default 1024)",
    )
    add_set_arguments(ingest)
    add_wait_argument(ingest)

    ds = sub.add_parser("datasets", help="list, fetch or verify benchmark datasets")
    ds.add_argument("action", choices=("list", "fetch", "verify"))
    ds.add_argument("name", nargs="?", help="dataset name (see 'embedpipe datasets list')")
    ds.add_argument("--root", type=Path, help="folder holding the datasets (fetch, verify)")
    ds.add_argument("--registry", type=Path, help="YAML of extra or overriding dataset entries")
    ds.add_argument("--mirror", help="base URL to fetch the archives from instead of their official URLs")

    bench = sub.add_parser(
        "bench",
        help="side-by-side benchmarks written as JSON",
        description="side-by-side benchmarks, each written as JSON stamped with the date and the machine; "
        "'embedpipe bench WHAT --help' lists a bench's flags",
    )
    bench_sub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, text in BENCHES.items():
        _bench_module(name).add_arguments(bench_sub.add_parser(name, help=text, description=text))

    ev = sub.add_parser("eval-ranks", help="score a ranking file against a benchmark's ground truth")
    ev.add_argument("--protocol", required=True, choices=EVAL_PROTOCOLS)
    ev.add_argument(
        "--gnd",
        required=True,
        type=Path,
        help="revisitop gnd_*.pkl (oxford/paris), or the database image list (holidays, ukbench)",
    )
    ev.add_argument(
        "--ranks",
        required=True,
        type=Path,
        help=".npy int array (n_queries, n_ranked): database indices per query, best first",
    )
    ev.add_argument("--json", type=Path, help="write the metrics here (also printed)")

    rep = sub.add_parser("report", help="rebuild RUN/report/index.html from the run directory")
    rep.add_argument(
        "run", type=Path, help="run directory, or a finetune FT_DIR (rebuilds FT_DIR/report.html)"
    )
    rep.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=[],
        help="with an FT_DIR: finished runs (off-the-shelf, adapted, ...) to show side by side",
    )
    add_wait_argument(rep)

    cmp_ = sub.add_parser("compare", help="side-by-side metrics of two runs")
    cmp_.add_argument("run_a", type=Path)
    cmp_.add_argument("run_b", type=Path)
    cmp_.add_argument("--json", type=Path, help="write the comparison here")

    table = sub.add_parser("table", help="one comparison table across finished runs (datasets as columns)")
    table.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished run directories")
    table.add_argument("--dim", type=int, help="keep the rows of this dimension (after post-processing)")
    table.add_argument("--metric", choices=("map", "mp@10"), default="map", help="cell values (default map)")
    table.add_argument("--format", choices=("md", "csv", "html", "json"), default="md", help="default md")
    table.add_argument("--out", type=Path, help="write the table here instead of printing it")

    study = sub.add_parser("study", help="studies over a finished run's feature store")
    study.add_argument("what", choices=("compression",), help="mAP vs bytes/vector for PCA dims and PQ")
    study.add_argument("--run", required=True, type=Path, help="finished run directory")
    add_wait_argument(study)

    sub.add_parser("presets", help="list the named presets")

    cfg = sub.add_parser("config", help="the effective config, or the configuration reference")
    cfg_sub = cfg.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = cfg_sub.add_parser("show", help="print the effective config as YAML")
    show.add_argument("config", nargs="?", type=Path, help="YAML config file")
    show.add_argument("--preset", help="named preset (see 'embedpipe presets'; default: 'default')")
    add_set_argument(show)
    docs = cfg_sub.add_parser("docs", help="print docs/configuration.md, generated from the config schema")
    docs.add_argument("--out", type=Path, help="write it here instead of printing it")
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class _TypedErrorsInOneLine(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; for our typed errors the message already
    says it all (and the CLI ends with it), so the traceback is dropped unless ``--debug``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EmbedpipeError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_typed_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_TypedErrorsInOneLine())


def _lease(root: Path, command: str, args: argparse.Namespace, orchestration=None):
    """The lease of the directory ``root`` a command writes (see ``storage.lease``), taken before any
    engine or Prefect starts, so a second writer is refused at once (exit 2, one line) or, with --wait,
    waits; the flows' own acquisition inside it is a no-op."""
    from embedpipe.storage.contracts.config import OrchestrationConfig
    from embedpipe.storage.lease import run_lease

    orch = orchestration or OrchestrationConfig()
    return run_lease(root, command, args.wait, orch.lease_heartbeat_s, orch.lease_stale_s)


def _run_flow(cfg) -> dict:
    from embedpipe.flows.pipeline import pipeline

    return pipeline(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import load_config
    from embedpipe.workers.ingest.demo_data import generate_demo

    cfg = load_config(preset="demo", overrides={"out": args.out}, sets=args.sets)
    with _lease(cfg.out, "demo", args, cfg.orchestration):
        info = generate_demo(cfg.out / "demo-images", seed=cfg.seed)
        log.info("demo dataset: %d images, %d queries in %s", info.n_images, info.n_queries, info.root)
        cfg = cfg.model_copy(update={"images": str(info.root)})
        metrics = _run_flow(cfg)
    _print_table(metrics, cfg.out)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from embedpipe.workers.ingest.sources import list_inputs, listing_once, remote_shard_limits

    overrides: dict = {"images": args.images}
    ft = {
        k: v
        for k, v in (("loss", args.loss), ("epochs", args.epochs), ("validation", args.validate))
        if v is not None
    }
    if ft:
        overrides["finetune"] = ft
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
    from embedpipe.flows.config import load_config
    from embedpipe.workers.descriptors.backbones import check_backbone, is_finetuned

    cfg = load_config(
        preset=args.preset or ("default" if not args.config else None),
        path=args.config,
        overrides=overrides,
        sets=args.sets,
    )
    if cfg.images is None:
        raise InputError("no training images given (--images PATH)")
    if is_finetuned(cfg.extract.backbone):
        raise InputError("finetune starts from a registry backbone, not a fine-tuned folder")
    check_backbone(cfg.extract.backbone, cfg.extract.weights)
    from embedpipe.flows.finetune import finetune

    with _lease(args.out, "finetune", args, cfg.orchestration), listing_once():
        with remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries):
            list_inputs(cfg.images)  # fail fast, before any engine starts
            if cfg.finetune.validation:
                from embedpipe.workers.train.validate import check_validation

                check_validation(cfg)
        r = finetune(cfg, args.out)
    losses = ", ".join(f"{v:.4f}" for v in r["losses"])
    sys.stdout.write(
        f"finetune: {r['epochs']} epoch(s) ({r['epochs'] - r['resumed_from']} this run, "
        f"{r['workers']} worker(s), {r['seconds']:.1f} s); loss per epoch: {losses}\n"
        f"backbone: {r['ft_dir']} (use: embedpipe run --backbone {r['ft_dir']} ...)\n"
        f"report: {r['report']}\n"
    )
    if r.get("validation"):
        curve = ", ".join(
            f"{c['epoch']}: {c['map']:.4f}"
            + (f" (base at the fine-tuning size: {c['map_at_size']:.4f})" if "map_at_size" in c else "")
            for c in r["validation"]
        )
        kept = f"epoch {r['best_epoch']}" if r["best_epoch"] else "the base model (no epoch beat it)"
        sys.stdout.write(f"validation mAP per epoch (0: base): {curve}; kept {kept}\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from embedpipe.workers.ingest.plan import run_listings
    from embedpipe.workers.ingest.sources import list_inputs, listing_once, remote_shard_limits

    cfg = config_from_args(args, check_inputs=False)
    if cfg.images is None:
        raise InputError("no images given (--images PATH or 'images:' in the config)")
    # the inputs are listed under the lease (a writer waited for may have changed the run's plan); the
    # check before the engines start and the run share one listing
    with _lease(cfg.out, "run", args, cfg.orchestration), listing_once():
        with run_listings(cfg.out), remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries):
            list_inputs(cfg.images)  # fail fast, before any engine starts
            if cfg.distractors:
                list_inputs(cfg.distractors)
        metrics = _run_flow(cfg)
    _print_table(metrics, cfg.out)
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import load_config
    from embedpipe.flows.pipeline import reindex
    from embedpipe.storage.contracts.layout import RunLayout
    from embedpipe.workers.ingest.plan import run_listings
    from embedpipe.workers.ingest.sources import list_inputs, listing_once, remote_shard_limits

    def run_config():
        saved = RunLayout(args.run).read_manifest().get("config")
        if saved is None:
            raise InputError(f"{args.run} is not a run directory (no manifest.json with a config)")
        saved = {**saved, "images": args.images, "out": str(args.run)}
        for section, values in engine_overrides(args).items():
            saved[section] = {**saved.get(section, {}), **values}
        return load_config(overrides=saved, sets=args.sets)

    cfg = run_config()
    with _lease(cfg.out, "reindex", args, cfg.orchestration):
        cfg = run_config()  # again, under the lease: a writer waited for may have changed the run
        with listing_once():
            with run_listings(cfg.out), remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries):
                list_inputs(cfg.images)  # fail fast, before any engine starts
            metrics = reindex(cfg, wait=args.wait)
    _print_table(metrics, cfg.out)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from embedpipe.flows import deploy

    cron = deploy.check_cron(args.cron)
    if not args.write_yaml and not deploy.api_url():
        raise InputError(
            "deploy needs a Prefect server: start one (prefect server start) and set PREFECT_API_URL, "
            "e.g. http://127.0.0.1:4200/api"
        )
    # a deployment file may be for another machine: its --images need not exist here
    cfg = config_from_args(args, check_inputs=not args.write_yaml)
    if cfg.images is None:
        raise InputError("no images given (--images PATH or 'images:' in the config)")
    name = args.name or deploy.default_name(cfg)
    if args.write_yaml:
        path = deploy.write_deployment_yaml(args.write_yaml, cfg, name, cron, args.work_pool)
        hint = f"register it with: prefect deploy --all --prefect-file {path}"
        sys.stdout.write(f"{path}: deployment {name} ({hint})\n")
        return 0
    deploy.serve(cfg, name, cron)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import load_config
    from embedpipe.workers.ingest.stage import run_ingest

    if args.max_side < 32:
        raise InputError("--max-side must be at least 32")
    overrides = {"images": args.images, "out": args.out, **engine_overrides(args)}
    cfg = load_config(preset="default", overrides=overrides, sets=args.sets)
    with _lease(args.out, "ingest", args, cfg.orchestration):
        result = run_ingest(args.images, args.out, cfg, args.max_side)
    sys.stdout.write(result.summary + "\n")
    return 0 if result.n_ok else 1


def cmd_datasets(args: argparse.Namespace) -> int:
    from embedpipe.workers.ingest import datasets as benchmarks
    from embedpipe.workers.progress import Progress

    if args.action == "list":
        lines = []
        for b in benchmarks.registry(args.registry).values():
            sizes = ", ".join(f"{n} {pattern}" for pattern, n in b.counts.items())
            use = "--distractors" if b.protocol == benchmarks.DISTRACTORS else f"--protocol {b.protocol:<10}"
            lines.append(f"{b.name:<11} {use:<21} {b.description} [{sizes}]")
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    if not args.name or args.root is None:
        raise InputError(f"datasets {args.action} needs a dataset name and --root DIR")
    bench = benchmarks.lookup(args.name, args.registry)
    if args.action == "verify":
        result = benchmarks.verify(bench, args.root)
        counts = ", ".join(f"{found} {pattern}" for pattern, (found, _) in result["counts"].items())
        sys.stdout.write(
            f"{bench.name}: OK ({counts}; {result['archives_checked']} archive checksum(s) checked)\n"
        )
        return 0
    bar: dict[str, Progress] = {}

    def progress(total: int | None, n: int) -> None:
        if total is not None:
            bar["p"] = Progress(f"fetch {bench.name}", total // 1024, log, unit="kB")
        bar["p"].update(n // 1024)

    folder = benchmarks.fetch(bench, args.root, args.mirror, progress)
    use = (
        f"--distractors {folder}"
        if bench.protocol == benchmarks.DISTRACTORS
        else f"--images {folder} --protocol {bench.protocol}"
    )
    sys.stdout.write(f"{bench.name}: ready in {folder} (use {use})\n")
    return 0


def _bench_module(name: str):
    """``embedpipe.flows.benchmarks.<name>``: its ``add_arguments(parser)`` and ``run(args)``."""
    return importlib.import_module(f"embedpipe.flows.benchmarks.{name}")


def cmd_bench(args: argparse.Namespace) -> int:
    return _bench_module(args.what).run(args)


def cmd_eval_ranks(args: argparse.Namespace) -> int:
    from embedpipe.workers.evaluate.eval_ranks import eval_ranks, load_ranks

    write_json(eval_ranks(args.protocol, args.gnd, load_ranks(args.ranks)), args.json)
    return 0


def _finished_run(path: Path):
    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.contracts.layout import RunLayout

    layout = RunLayout(path)
    if not layout.metrics.is_file():
        raise InputError(f"{path} is not a finished run (no report/metrics.json)")
    return layout, Config.model_validate(layout.read_manifest()["config"])


def _existing_dir(path: Path) -> Path:
    """``path``, checked before its lease is taken (which would make a missing folder)."""
    if not path.is_dir():
        raise InputError(f"{path} is not a finished run (no report/metrics.json)")
    return path


def cmd_report(args: argparse.Namespace) -> int:
    from embedpipe.workers.report.html import write_report

    # the lease first, then the checks: a run being written is waited for (--wait) or named as busy,
    # rather than reported as unfinished
    with _lease(_existing_dir(args.run), "report", args):
        if (args.run / "backbone.json").is_file():
            from embedpipe.workers.train.report import write_finetune_report

            runs = {str(r): _finished_run(r)[0].root for r in args.runs}
            sys.stdout.write(f"{write_finetune_report(args.run, runs)}\n")
            return 0
        layout, cfg = _finished_run(args.run)
        sys.stdout.write(f"{write_report(layout, cfg)}\n")
    return 0


def compare_runs(metrics_a: dict, metrics_b: dict) -> list[dict]:
    """Rows of both runs matched by (descriptor, post, rerank), with B - A differences."""

    def key(r: dict) -> tuple[str, str, str]:
        return (r["descriptor"], r["post"], r.get("rerank", "none"))

    a = {key(r): r for r in metrics_a["results"]}
    b = {key(r): r for r in metrics_b["results"]}
    rows = []
    for k in list(a) + [k for k in b if k not in a]:
        ra, rb = a.get(k, {}), b.get(k, {})
        row = {"descriptor": k[0], "post": k[1], "rerank": k[2]}
        for m in ("map", "mp@10", "bytes_per_vector"):
            va, vb = ra.get(m), rb.get(m)
            row[f"{m}_a"], row[f"{m}_b"] = va, vb
            row[f"{m}_delta"] = vb - va if va is not None and vb is not None else None
        rows.append(row)
    return rows


def cmd_compare(args: argparse.Namespace) -> int:
    from embedpipe.workers.report.html import fmt_metric

    (layout_a, _), (layout_b, _) = _finished_run(args.run_a), _finished_run(args.run_b)
    rows = compare_runs(json.loads(layout_a.metrics.read_text()), json.loads(layout_b.metrics.read_text()))

    def delta(v):
        return "—" if v is None else f"{v:+.4f}"

    lines = [
        f"A = {args.run_a}",
        f"B = {args.run_b}",
        f"{'descriptor':<16}{'post':<12}{'rerank':<9}{'mAP A':>9}{'mAP B':>9}{'Δ':>9}{'mP@10 Δ':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['descriptor']:<16}{r['post']:<12}{r['rerank']:<9}{fmt_metric(r['map_a']):>9}"
            f"{fmt_metric(r['map_b']):>9}{delta(r['map_delta']):>9}{delta(r['mp@10_delta']):>10}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    write_json({"a": str(args.run_a), "b": str(args.run_b), "rows": rows}, args.json, echo=False)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from embedpipe.storage.contracts.layout import atomic_path
    from embedpipe.workers.report.table import build_table, render

    text = render(build_table(args.runs, args.metric, args.dim), args.format)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    sys.stdout.write(f"written: {args.out}\n")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    with _lease(_existing_dir(args.run), "study", args):
        return _study(args)


def _study(args: argparse.Namespace) -> int:
    from embedpipe.storage.contracts.layout import write_json_atomic
    from embedpipe.workers.evaluate.database import run_ground_truth
    from embedpipe.workers.evaluate.stage import query_vectors
    from embedpipe.workers.evaluate.study import compression_study, plot_compression
    from embedpipe.workers.report.html import fmt_metric

    layout, cfg = _finished_run(args.run)
    if cfg.protocol == "none":
        raise InputError(f"{args.run} was run with protocol 'none': no ground truth to score compression")
    dirs = {d: layout.feature_dir(d) for d in cfg.extract.descriptors if layout.feature_dir(d).is_dir()}
    rows = compression_study(
        dirs,
        lambda paths: run_ground_truth(layout, cfg, paths),
        cfg.seed,
        lambda descriptor, gt: query_vectors(layout, cfg, descriptor, gt)["l2"],  # box-cropped queries
    )
    write_json_atomic(layout.report_dir / "compression.json", rows)
    plot = plot_compression(rows, layout.report_dir / "compression.png")
    lines = [f"{'descriptor':<12}{'index':<22}{'dim':>6}{'bytes/vector':>14}{'mAP':>9}"]
    for r in rows:
        lines.append(
            f"{r['descriptor']:<12}{r['index']:<22}{r['dim']:>6}{r['bytes_per_vector']:>14}"
            f"{fmt_metric(r['map']):>9}"
        )
    lines.append(f"written: {layout.report_dir / 'compression.json'}" + (f", {plot}" if plot else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import config_docs, config_yaml, load_config

    if args.action == "docs":
        text = config_docs()
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    preset = args.preset or ("default" if args.config is None else None)
    sys.stdout.write(config_yaml(load_config(preset=preset, path=args.config, sets=args.sets)))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import preset_names

    sys.stdout.write("\n".join(preset_names()) + "\n")
    return 0


def _print_table(metrics: dict, out: Path) -> None:
    from embedpipe.workers.report.html import fmt_metric

    lines = [f"{'descriptor':<16}{'post':<12}{'rerank':<9}{'dim':>6}{'mAP':>9}{'mP@10':>9}"]
    for r in metrics["results"]:
        head = f"{r['descriptor']:<16}{r['post']:<12}{r['rerank']:<9}{r['dim']:>6}"
        lines.append(f"{head}{fmt_metric(r.get('map')):>9}{fmt_metric(r.get('mp@10')):>9}")
    lines.append(f"report: {out / 'report' / 'index.html'}")
    sys.stdout.write("\n".join(lines) + "\n")


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "reindex": cmd_reindex,
    "deploy": cmd_deploy,
    "finetune": cmd_finetune,
    "ingest": cmd_ingest,
    "datasets": cmd_datasets,
    "bench": cmd_bench,
    "eval-ranks": cmd_eval_ranks,
    "report": cmd_report,
    "compare": cmd_compare,
    "table": cmd_table,
    "study": cmd_study,
    "presets": cmd_presets,
    "config": cmd_config,
}


def main(argv: list[str] | None = None) -> int:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    if not args.debug:
        _quiet_typed_tracebacks()
    try:
        return COMMANDS[args.command](args)
    except EmbedpipeError as err:
        if args.debug:
            raise
        sys.stderr.write(f"embedpipe: error: {err}\n")
        return err.exit_code
    except OSError as err:  # a write error outside the run's atomic outputs (a folder, a log)
        if args.debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        sys.stderr.write(f"embedpipe: error: {err.strerror or err}{where}; re-run the command to resume\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("embedpipe: interrupted; re-run the same command to resume\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
