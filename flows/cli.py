"""``embedpipe`` command line. Exit codes: 0 success, 1 run failed, 2 bad usage or bad input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

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


def _set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set extract.max_side=512 (repeatable)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument(
        "--dask-address",
        help="run the fit stage's Dask jobs on this running Dask scheduler (e.g. tcp://host:8786)",
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset (see 'embedpipe presets')")
    p.add_argument("--out", type=Path, help="run directory; re-running with the same one resumes")
    _set_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedpipe", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="whole pipeline on the bundled demo dataset (no network)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    demo.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable)",
    )

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
    _config_args(run)

    run.add_argument(
        "--backbone",
        help="backbone name, or a folder written by 'embedpipe finetune' (its image size comes along)",
    )

    reindex = sub.add_parser(
        "reindex", help="bring a finished run up to date with a changed collection, without a full rebuild"
    )
    reindex.add_argument("run", type=Path, help="the run directory")
    reindex.add_argument("--images", required=True, help="the collection now (any form `run` takes)")
    _set_args(reindex)

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
    _config_args(deploy)

    ft = sub.add_parser("finetune", help="fine-tune the backbone for retrieval on Ray Train")
    ft.add_argument("config", nargs="?", type=Path, help="YAML config file")
    ft.add_argument("--images", help="training images (labels or Holidays layout), never the evaluation set")
    ft.add_argument(
        "--out", type=Path, required=True, help="FT_DIR: backbone, checkpoints (re-running resumes)"
    )
    ft.add_argument("--loss", choices=("contrastive", "triplet"), help="tuple loss (default contrastive)")
    ft.add_argument("--epochs", type=int, help="epochs (default 5)")
    ft.add_argument("--preset", help="named preset (see 'embedpipe presets')")
    _set_args(ft)

    ingest = sub.add_parser("ingest", help="the ingest stage alone: manifest, shard plan, resized shards")
    ingest.add_argument("images", help="any input form, as for 'run --images'")
    ingest.add_argument("--out", type=Path, required=True, help="output folder (re-running resumes)")
    ingest.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="downscale larger images to this longer side (default 1024)",
    )
    _set_args(ingest)

    ds = sub.add_parser("datasets", help="list, fetch or verify benchmark datasets")
    ds.add_argument("action", choices=("list", "fetch", "verify"))
    ds.add_argument("name", nargs="?", help="dataset name (see 'embedpipe datasets list')")
    ds.add_argument("--root", type=Path, help="folder holding the datasets (fetch, verify)")
    ds.add_argument("--registry", type=Path, help="YAML of extra or overriding dataset entries")
    ds.add_argument("--mirror", help="base URL to fetch the archives from instead of their official URLs")

    bench = sub.add_parser("bench", help="side-by-side benchmarks written as JSON")
    bench.add_argument(
        "what",
        choices=("extract", "decode", "codebook", "pca", "index", "reindex", "train", "ingest"),
        help="what to measure: the extraction pipeline, JPEG decode, faiss k-means vs MiniBatchKMeans, "
        "the PCA fit, index filling, reindex against a full run, fine-tuning steps (Ray Train vs a "
        "plain loop), or the ingest stage against img2dataset over HTTP",
    )
    bench.add_argument("--json", type=Path, help="write the result here (also printed)")
    bench.add_argument("--images", help="images to use, any input form (default: the demo dataset)")
    bench.add_argument(
        "--n", type=int, default=2000, help="number of images, cycling the inputs (default 2000)"
    )
    bench.add_argument(
        "--sweep", default="", metavar="N,N,...", help="also time the pipeline with these model-actor counts"
    )
    bench.add_argument("--rows", type=int, help="pca/index: vectors in the synthetic store (default 1000000)")
    bench.add_argument("--dim", type=int, help="pca/index: vector dimension (default 256 pca, 128 index)")
    bench.add_argument(
        "--parts", type=int, default=16, help="pca/index: part files of the store (default 16)"
    )
    bench.add_argument("--components", type=int, default=128, help="pca: components kept (default 128)")
    bench.add_argument("--factory", default="IVF1024,PQ32", help="index: factory (default IVF1024,PQ32)")
    bench.add_argument(
        "--growth", default="", metavar="N,N,...", help="index: also time the sharded fill at these sizes"
    )
    bench.add_argument(
        "--steps", type=int, default=10, help="train: timed steps after a warm-up (default 10)"
    )
    bench.add_argument("--store", type=Path, help="pca/index: where the synthetic store is written (reused)")
    bench.add_argument(
        "--fraction", type=float, default=0.1, help="reindex: share of the images that arrive later (0.1)"
    )
    bench.add_argument(
        "--max-side", type=int, default=512, help="ingest: longer side of the output images (default 512)"
    )
    bench.add_argument(
        "--baseline-python",
        type=Path,
        metavar="PY",
        help="ingest: a Python with img2dataset installed (default: a virtual environment created once "
        "under ~/.cache/embedpipe)",
    )
    bench.add_argument(
        "--held-back",
        choices=("spread", "tail"),
        default="spread",
        help="reindex: which files arrive later: every 1/fraction-th in sorted order (spread, default) or "
        "the last ones (tail)",
    )
    _config_args(bench)

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

    cmp_ = sub.add_parser("compare", help="side-by-side metrics of two runs")
    cmp_.add_argument("run_a", type=Path)
    cmp_.add_argument("run_b", type=Path)
    cmp_.add_argument("--json", type=Path, help="write the comparison here")

    study = sub.add_parser("study", help="studies over a finished run's feature store")
    study.add_argument("what", choices=("compression",), help="mAP vs bytes/vector for PCA dims and PQ")
    study.add_argument("--run", required=True, type=Path, help="finished run directory")

    sub.add_parser("presets", help="list the named presets")
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


def _run_flow(cfg) -> dict:
    from embedpipe.flows.pipeline import pipeline

    return pipeline(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import load_config
    from embedpipe.workers.ingest.demo_data import generate_demo

    cfg = load_config(preset="demo", overrides={"out": args.out}, sets=args.sets)
    info = generate_demo(cfg.out / "demo-images", seed=cfg.seed)
    log.info("demo dataset: %d images, %d queries in %s", info.n_images, info.n_queries, info.root)
    cfg = cfg.model_copy(update={"images": str(info.root)})
    metrics = _run_flow(cfg)
    _print_table(metrics, cfg.out)
    return 0


def _engine_overrides(args: argparse.Namespace) -> dict:
    """Config overrides of --ray-address and --dask-address."""
    overrides: dict = {}
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
    if args.dask_address:
        overrides["fit"] = {"scheduler": "distributed", "dask_address": args.dask_address}
    return overrides


def _load_run_config(args: argparse.Namespace, check_inputs: bool = True):
    from embedpipe.flows.config import load_config
    from embedpipe.storage.dataset import run_listings
    from embedpipe.workers.descriptors.backbones import check_backbone
    from embedpipe.workers.ingest.sources import list_inputs, read_rotations

    overrides = {
        "images": getattr(args, "images", None),
        "protocol": getattr(args, "protocol", None),
        "ground_truth": getattr(args, "ground_truth", None),
        "out": args.out,
    }
    overrides.update(_engine_overrides(args))
    if getattr(args, "backbone", None):
        overrides["extract"] = _backbone_overrides(args.backbone)
    cfg = load_config(
        preset=args.preset or ("default" if not getattr(args, "config", None) else None),
        path=getattr(args, "config", None),
        overrides=overrides,
        sets=args.sets,
    )
    if cfg.images is not None and check_inputs:
        with run_listings(cfg.out):
            list_inputs(cfg.images)  # fail fast, before any engine starts
    if cfg.ingest.rotations:
        read_rotations(cfg.ingest.rotations)
    check_backbone(cfg.extract.backbone, cfg.extract.weights, cfg.extract.descriptors)
    _check_not_training_set(cfg)
    return cfg


def _check_not_training_set(cfg) -> None:
    """A fine-tuned backbone is never evaluated on the collection it was trained on."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    if cfg.images is None or not is_finetuned(cfg.extract.backbone):
        return
    trained = read_finetuned(cfg.extract.backbone)["training"]["images"]
    if str(Path(trained).resolve()) == str(Path(cfg.images).resolve()):
        raise InputError(
            f"{cfg.images} is the training collection of {cfg.extract.backbone}: evaluate on other images"
        )


def _backbone_overrides(name: str) -> dict:
    """``--backbone``: the name, and for a fine-tuned folder the image size it was trained at
    (``--set extract.max_side=…`` still wins)."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    if is_finetuned(name):
        return {"backbone": str(Path(name).resolve()), "max_side": read_finetuned(name)["max_side"]}
    return {"backbone": name}


def cmd_finetune(args: argparse.Namespace) -> int:
    from embedpipe.workers.ingest.sources import list_inputs, listing_once

    overrides: dict = {"images": args.images}
    ft = {k: v for k, v in (("loss", args.loss), ("epochs", args.epochs)) if v is not None}
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

    with listing_once():
        list_inputs(cfg.images)  # fail fast, before any engine starts
        r = finetune(cfg, args.out)
    losses = ", ".join(f"{v:.4f}" for v in r["losses"])
    sys.stdout.write(
        f"finetune: {r['epochs']} epoch(s) ({r['epochs'] - r['resumed_from']} this run, "
        f"{r['workers']} worker(s), {r['seconds']:.1f} s); loss per epoch: {losses}\n"
        f"backbone: {r['ft_dir']} (use: embedpipe run --backbone {r['ft_dir']} ...)\n"
        f"report: {r['report']}\n"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from embedpipe.workers.ingest.sources import listing_once

    with listing_once():  # the check before the engines start and the run share one listing
        cfg = _load_run_config(args)
        if cfg.images is None:
            raise InputError("no images given (--images PATH or 'images:' in the config)")
        metrics = _run_flow(cfg)
    _print_table(metrics, cfg.out)
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from embedpipe.flows.config import load_config
    from embedpipe.flows.pipeline import reindex
    from embedpipe.storage.contracts.layout import RunLayout
    from embedpipe.storage.dataset import run_listings
    from embedpipe.workers.ingest.sources import list_inputs, listing_once

    saved = RunLayout(args.run).read_manifest().get("config")
    if saved is None:
        raise InputError(f"{args.run} is not a run directory (no manifest.json with a config)")
    saved = {**saved, "images": args.images, "out": str(args.run)}
    for section, values in _engine_overrides(args).items():
        saved[section] = {**saved.get(section, {}), **values}
    cfg = load_config(overrides=saved, sets=args.sets)
    with listing_once():
        with run_listings(cfg.out):
            list_inputs(cfg.images)  # fail fast, before any engine starts
        metrics = reindex(cfg)
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
    cfg = _load_run_config(args, check_inputs=not args.write_yaml)
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
    overrides = {"images": args.images, "out": args.out, **_engine_overrides(args)}
    cfg = load_config(preset="default", overrides=overrides, sets=args.sets)
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
            lines.append(f"{b.name:<11} --protocol {b.protocol:<10} {b.description} [{sizes}]")
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
    sys.stdout.write(f"{bench.name}: ready in {folder} (use --images {folder} --protocol {bench.protocol})\n")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from embedpipe.flows.benchmarks.extract import bench_decode, large_photos

    cfg = _load_run_config(args)
    if cfg.images is None:
        root = Path(tempfile.gettempdir()) / "embedpipe-bench-decode"
        files = large_photos(root, min(args.n, 64))
    else:
        from embedpipe.workers.ingest.sources import list_inputs

        files = [Path(r.uri) for r in list_inputs(cfg.images).refs if r.offset < 0 and "://" not in r.uri]
        files = files[: args.n]
    if not files:
        raise InputError("bench decode needs local image files")
    result = bench_decode(files, cfg)
    _write_json(result, args.json)
    log.info(
        "bench decode: ours %.1f img/s, baseline %.1f img/s, ratio %.2f, descriptor cosine mean %.4f",
        result["ours"]["images_per_s"],
        result["baseline"]["images_per_s"],
        result["ratio"],
        result["cosine"]["mean"],
    )
    return 0


def cmd_bench_ann(args: argparse.Namespace) -> int:
    from embedpipe.flows.benchmarks.ann import bench_index, bench_pca

    rows = args.rows if args.rows is not None else 1_000_000
    dim = args.dim if args.dim is not None else (256 if args.what == "pca" else 128)
    if rows < 2 or dim < 1 or args.parts < 1:
        raise InputError("--rows must be at least 2, --dim and --parts at least 1")
    if args.what == "pca" and not 0 < args.components <= dim:
        raise InputError(f"--components must be in [1, {dim}]")
    try:
        growth = [int(v) for v in args.growth.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--growth expects comma-separated sizes, got '{args.growth}'") from None
    store = args.store or Path(tempfile.gettempdir()) / f"embedpipe-bench-{args.what}"
    store = store / f"{rows}x{dim}-{args.parts}"
    if args.what == "pca":
        result = bench_pca(store, rows, dim, args.parts, args.components)
    else:
        from embedpipe.workers.index.ann import check_factory

        result = bench_index(store, rows, dim, args.parts, check_factory(args.factory), growth)
    _write_json(result, args.json)
    log.info("bench %s: ratio %.3f", args.what, result["ratio"])
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "decode":
        return cmd_bench_decode(args)
    if args.what in ("pca", "index"):
        return cmd_bench_ann(args)
    if args.what == "reindex":
        return cmd_bench_reindex(args)
    if args.what == "ingest":
        return cmd_bench_ingest(args)
    from embedpipe.flows.benchmarks.extract import bench_extract
    from embedpipe.workers.ingest.demo_data import generate_demo
    from embedpipe.workers.ingest.sources import list_inputs

    if args.what == "codebook":
        return cmd_bench_codebook(args)
    if args.what == "train":
        return cmd_bench_train(args)

    if args.n < 1:
        raise InputError("--n must be at least 1")
    try:
        sweep = [int(v) for v in args.sweep.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sweep expects comma-separated actor counts, got '{args.sweep}'") from None
    if any(v < 1 for v in sweep):
        raise InputError("--sweep actor counts must be at least 1")
    cfg = _load_run_config(args)
    if cfg.images is None:
        root = Path(tempfile.gettempdir()) / "embedpipe-bench-demo"
        cfg = cfg.model_copy(update={"images": str(generate_demo(root, seed=cfg.seed).root)})
    refs = list_inputs(cfg.images).refs
    if not refs:
        raise InputError(f"no usable inputs at {cfg.images}")
    result = bench_extract([refs[i % len(refs)] for i in range(args.n)], cfg, sweep)
    _write_json(result, args.json)
    log.info(
        "bench extract: ours %.1f img/s, baseline %.1f img/s, ratio %.3f",
        result["ours"]["images_per_s"],
        result["baseline"]["images_per_s"],
        result["ratio"],
    )
    return 0


def cmd_bench_reindex(args: argparse.Namespace) -> int:
    from embedpipe.flows.benchmarks.reindex import bench_reindex
    from embedpipe.workers.ingest.demo_data import generate_demo

    if args.out is None:
        args.out = Path("runs/bench-reindex")
    cfg = _load_run_config(args)
    if cfg.images is None:
        root = Path(tempfile.gettempdir()) / "embedpipe-bench-demo"
        cfg = cfg.model_copy(update={"images": str(generate_demo(root, seed=cfg.seed).root)})
    _write_json(bench_reindex(cfg, args.fraction, args.held_back), args.json)
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    """Our ingest vs img2dataset on the same photos served from 127.0.0.1 (see flows/benchmarks/ingest.py)."""
    from embedpipe.flows.benchmarks import ingest as bi

    if args.n < 1:
        raise InputError("--n must be at least 1")
    if args.max_side < 32:
        raise InputError("--max-side must be at least 32")
    from embedpipe.flows.config import load_config

    overrides = {"images": args.images, "out": args.out, **_engine_overrides(args)}
    cfg = load_config(preset=args.preset or "default", overrides=overrides, sets=args.sets)
    photos = None
    if cfg.images is not None:
        root = Path(cfg.images)
        if not root.is_dir():
            raise InputError(f"bench ingest: --images must be a folder of image files, got {cfg.images}")
        photos = sorted(p for p in root.iterdir() if p.suffix.lower() in bi.IMAGE_EXTS)[: args.n]
        if len(photos) < args.n:
            raise InputError(f"bench ingest: {root} has {len(photos)} images, --n asks for {args.n}")
    if args.baseline_python is not None:
        python = bi.check_baseline_python(args.baseline_python)
    else:
        python = bi.img2dataset_python()
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-ingest-") as tmp:
        if photos is None:
            cache = Path(tempfile.gettempdir()) / f"embedpipe-bench-ingest-photos-v{bi.PHOTOS_VERSION}"
            photos = bi.bench_photos(cache / f"seed{cfg.seed}", args.n, cfg.seed)
        result = bi.bench_ingest(cfg, args.n, args.max_side, Path(tmp), python, photos)
    _write_json(result, args.json)
    log.info(
        "bench ingest: ours %.1f img/s, img2dataset %.1f img/s, ratio %.3f",
        result["ours"]["images_per_s"],
        result["baseline"]["images_per_s"],
        result["ratio"],
    )
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    """Ray Train vs a plain PyTorch loop on the same model and tuples of --images (default: the demo)."""
    from embedpipe.workers.ingest.demo_data import generate_demo
    from embedpipe.workers.train.loop import bench_train

    if args.steps < 1:
        raise InputError("--steps must be at least 1")
    cfg = _load_run_config(args)
    if cfg.images is None:
        root = Path(tempfile.gettempdir()) / "embedpipe-bench-demo"
        cfg = cfg.model_copy(update={"images": str(generate_demo(root, seed=cfg.seed).root)})
    result = bench_train(cfg, args.steps)
    _write_json(result, args.json)
    log.info(
        "bench train: ours %.2f s/step (%d workers), baseline %.2f s/step, ratio %.2f",
        result["ours"]["step_s"],
        result["ours"]["workers"],
        result["baseline"]["step_s"],
        result["ratio"],
    )
    return 0


def cmd_bench_codebook(args: argparse.Namespace) -> int:
    """Local features of every image of --images (default: the demo dataset) into --out (default: a
    temporary folder), then faiss k-means vs MiniBatchKMeans on one Dask sample of them."""
    from embedpipe.flows.benchmarks.extract import bench_codebook
    from embedpipe.workers.ingest.demo_data import generate_demo

    cfg = _load_run_config(args)
    if cfg.images is None:
        root = Path(tempfile.gettempdir()) / "embedpipe-bench-demo"
        cfg = cfg.model_copy(update={"images": str(generate_demo(root, seed=cfg.seed).root)})
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-codebook-") as tmp:
        if args.out is None:
            cfg = cfg.model_copy(update={"out": Path(tmp)})
        result = bench_codebook(cfg)
    _write_json(result, args.json)
    log.info(
        "bench codebook: k=%d on %d descriptors: faiss %.2fs, MiniBatchKMeans %.2fs, ratio %.2f",
        result["k"],
        result["n_sample"],
        result["ours"]["time_s"],
        result["baseline"]["time_s"],
        result["ratio"],
    )
    return 0


def _write_json(result: dict, path: Path | None, echo: bool = True) -> None:
    """Write ``result`` to ``path`` (when given) and, with ``echo``, to stdout."""
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if echo:
        sys.stdout.write(text + "\n")


def cmd_eval_ranks(args: argparse.Namespace) -> int:
    from embedpipe.workers.evaluate.eval_ranks import eval_ranks, load_ranks

    _write_json(eval_ranks(args.protocol, args.gnd, load_ranks(args.ranks)), args.json)
    return 0


def _finished_run(path: Path):
    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.contracts.layout import RunLayout

    layout = RunLayout(path)
    if not layout.metrics.is_file():
        raise InputError(f"{path} is not a finished run (no report/metrics.json)")
    return layout, Config.model_validate(layout.read_manifest()["config"])


def cmd_report(args: argparse.Namespace) -> int:
    from embedpipe.workers.report.html import write_report

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
    _write_json({"a": str(args.run_a), "b": str(args.run_b), "rows": rows}, args.json, echo=False)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from embedpipe.storage.contracts.layout import write_json_atomic
    from embedpipe.workers.evaluate.protocols import BENCHMARK_PROTOCOLS
    from embedpipe.workers.evaluate.stage import run_ground_truth
    from embedpipe.workers.evaluate.study import compression_study, plot_compression
    from embedpipe.workers.report.html import fmt_metric

    layout, cfg = _finished_run(args.run)
    if cfg.protocol == "none":
        raise InputError(f"{args.run} was run with protocol 'none': no ground truth to score compression")
    if cfg.protocol in BENCHMARK_PROTOCOLS:
        raise InputError(f"study compression: {cfg.protocol}'s box-cropped queries are not supported yet")
    dirs = {d: layout.feature_dir(d) for d in cfg.extract.descriptors if layout.feature_dir(d).is_dir()}
    rows = compression_study(dirs, lambda paths: run_ground_truth(layout, cfg, paths), cfg.seed)
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
    "study": cmd_study,
    "presets": cmd_presets,
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
