"""``embedpipe bench extract``: the extraction stage as the pipeline runs it (Ray model actors) against
the peers a user would pick, in one run, on the same images and model: the eager PyTorch loop (NCHW and
channels-last), Ray Data batch inference and Daft with the same model in a class UDF (in Daft's own
environment). Every side's descriptors are compared with the eager loop's, image by image; optionally
the stage again for a sweep of model-actor counts.

By default the images are real photographs of 1.5 megapixels or more at their stored resolution, made by
cropping and mirroring the photos of a Debian package (``package_photos``); ``--images`` for yours.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.flows.benchmarks.common import (
    add_json_argument,
    cache_dir,
    check_side_python,
    package_photos,
    peak_rss_mb,
    side_python_over_ours,
    write_result,
)
from embedpipe.storage.contracts.errors import DecodeError, InputError, RunFailed
from embedpipe.workers.ingest.decode import decode_image
from embedpipe.workers.ingest.sources import read_input
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.inputs import InputRef
    from embedpipe.workers.extract.eager import EagerModel

log = logging.getLogger("embedpipe.bench")

PEERS = ("eager", "ray_data", "daft")
DAFT = "daft==0.7.26"
DAFT_TIMEOUT_S = 3600
DECODE_NOTE = (
    "every side decodes with workers/ingest/decode.py decode_image (DCT-domain JPEG downscale to "
    "extract.max_side, then bicubic): the sides differ in the model path and the engine only"
)
TIMING_NOTE = (
    "each side's time includes its model load and first forward passes (no side is warmed); ours' runtime "
    "decision (extract.runtime auto: made once per machine and kept, with the exported model) is made "
    "before the clocks; Ray start-up "
    "is excluded (ours.startup_s), Daft's process start and imports too; every file is read once before "
    "the clocks so the page cache is the same for all; the eager loops run half their images before the "
    "engines and half after; ratio = the faster eager loop's time / ours, each peer's ratio = its time / "
    "ours, ratio_engines = the faster of Ray Data and Daft / ours"
)

Vectors = dict[str, "np.ndarray"]  # descriptor -> (n_images, dim) float32, row i = image i


def _empty(n: int, dims: dict[str, int]) -> Vectors:
    import numpy as np

    return {name: np.zeros((n, dim), np.float32) for name, dim in dims.items()}


def eager_pass(
    refs: list[InputRef], first: int, model: EagerModel, cfg: Config, out: Vectors, label: str
) -> tuple[float, int]:
    """The eager loop over ``refs`` (positions ``first``...): per batch of ``extract.batch_size`` inputs,
    read and decode each, then ``model.embed_many`` (same-shape images stacked); descriptors into
    ``out``. Returns (seconds, failed inputs)."""
    start = time.perf_counter()
    progress = Progress(label, len(refs), log)
    failed, size, ing = 0, cfg.extract.batch_size, cfg.ingest
    for k in range(0, len(refs), size):
        images, rows = [], []
        for j, ref in enumerate(refs[k : k + size]):
            try:
                data = read_input(ref.uri, ref.offset, ref.length, ing.timeout_s, ing.retries, ing.max_bytes)
                images.append(decode_image(data, cfg.extract.max_side, ing.max_pixels)[0])
                rows.append(first + k + j)
            except DecodeError:
                failed += 1
        if images:
            for name, v in model.embed_many(images).items():
                out[name][rows] = v
        progress.update(len(refs[k : k + size]))
    progress.finish()
    return time.perf_counter() - start, failed


def _timed_stream(
    paths: list[InputRef], cfg: Config, label: str, out: Vectors | None = None
) -> dict[str, Any]:
    """One pass of the extraction stage inside a running Ray session; descriptors into ``out``."""
    import numpy as np

    from embedpipe.workers.engines.ray_stages import cluster_cpus, cluster_gpus, pool_size, stream_descriptors

    pool = pool_size(cfg.extract, cluster_cpus(), cluster_gpus())
    seen = np.zeros(len(paths), bool)
    t0 = time.perf_counter()
    progress = Progress(label, len(paths), log)
    failed, first_s, first_n = 0, None, 0
    for batch in stream_descriptors(paths, cfg):
        ok = batch["error"] == ""
        failed += int((~ok).sum())
        pos = np.asarray(batch["pos"], np.int64)
        seen[pos[ok]] = True
        if out is not None:
            for name, v in out.items():
                v[pos] = batch[f"d_{name}"]
        progress.update(len(batch["pos"]))
        if first_s is None:  # actor start-up and model load end with the first batch
            first_s, first_n = time.perf_counter() - t0, progress.done
    progress.finish()
    run = time.perf_counter() - t0
    steady = (len(paths) - first_n) / (run - first_s) if first_s is not None and run > first_s else 0.0
    return {
        "time_s": round(run, 3),
        "first_batch_s": round(first_s or 0.0, 3),
        "steady_images_per_s": round(steady, 3),
        "images_per_s": round(len(paths) / run, 3),
        "failed": failed,
        "images": int(seen.sum()),
        "actors": pool.actors,
        "threads_per_actor": pool.threads,
        "gpus_per_actor": pool.actor_gpus,
    }


def _ray_data(paths: list[InputRef], cfg: Config, out: Vectors) -> dict[str, Any]:
    """The Ray Data peer inside the running Ray session; descriptors into ``out``."""
    import numpy as np

    from embedpipe.workers.engines.ray_data import eager_batch_inference

    items = [{"pos": i, "uri": r.uri, "offset": r.offset, "length": r.length} for i, r in enumerate(paths)]
    seen = np.zeros(len(paths), bool)
    progress = Progress("bench ray_data", len(paths), log)
    t0 = time.perf_counter()
    pool, batches = eager_batch_inference(items, cfg, cfg.extract.batch_size)
    for batch in batches:
        pos = np.asarray(batch["pos"], np.int64)
        seen[pos] = True
        for name, v in out.items():
            v[pos] = batch[f"d_{name}"]
        progress.update(len(pos))
    progress.finish()
    seconds = time.perf_counter() - t0
    return {
        "time_s": round(seconds, 3),
        "images_per_s": round(len(paths) / seconds, 3),
        "failed": len(paths) - int(seen.sum()),
        "images": int(seen.sum()),
        "actors": pool.actors,
        "cpus_per_actor": pool.actor_cpus,
        "threads_per_actor": pool.threads,
        "decode_cpus_per_task": 1,
    }


def _daft(
    paths: list[InputRef], cfg: Config, python: Path, dims: dict[str, int], out: Vectors
) -> dict[str, Any]:
    """The Daft peer: ``extract_daft.py`` run by ``python`` (Daft's environment) on the same files, one
    class-UDF instance on every core; its descriptors into ``out``."""
    import numpy as np

    if any(r.offset >= 0 or "://" in r.uri for r in paths):
        return {"skipped": "the Daft peer reads local image files only (--images holds other inputs)"}
    script = Path(__file__).with_name("extract_daft.py")
    with tempfile.TemporaryDirectory(prefix="bench-extract-daft-") as tmp:
        spec = {
            "paths": [r.uri for r in paths],
            "extract": cfg.extract.model_dump(mode="json"),
            "descriptors": list(dims),
            "dims": dims,
            "threads": os.cpu_count() or 1,
            "stack": cfg.extract.batch_size,
            "batch_size": cfg.extract.batch_size,
            "instances": 1,
            "max_pixels": cfg.ingest.max_pixels,
            "out_npy": str(Path(tmp) / "vectors.npy"),
            "out_json": str(Path(tmp) / "timing.json"),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        log.info("bench daft: %d images in %s", len(paths), python)
        try:
            done = subprocess.run(
                [str(python), str(script), str(Path(tmp) / "spec.json")],
                capture_output=True,
                text=True,
                timeout=DAFT_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RunFailed(f"the Daft peer did not finish: {err}") from None
        if done.returncode != 0:
            lines = [s.strip() for s in done.stderr.splitlines() if s.strip()]
            raise RunFailed(f"the Daft peer failed: {lines[-1] if lines else f'exit {done.returncode}'}")
        timing = json.loads((Path(tmp) / "timing.json").read_text())
        vectors = np.load(Path(tmp) / "vectors.npy")
    at = 0
    for name, dim in dims.items():
        out[name][:] = vectors[:, at : at + dim]
        at += dim
    seconds = timing["time_s"]
    return {
        "time_s": seconds,
        "images_per_s": round(len(paths) / seconds, 3),
        "failed": len(paths) - timing["images"],
        "images": timing["images"] if timing["positions_match"] else 0,
        "instances": timing["instances"],
        "threads": timing["threads"],
        "versions": timing["versions"],
    }


def cosines(ref: Vectors, other: Vectors) -> dict[str, float]:
    """Per descriptor, the smallest cosine between an image's vector in ``ref`` and in ``other``."""
    import numpy as np

    result = {}
    for name, a in ref.items():
        b = other[name]
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        result[name] = float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))
    return result


def _runtime(cfg: Config) -> dict[str, Any]:
    """The runtime and precision ours runs with, resolved by an embedder as the model actors resolve them
    (``extract.runtime`` auto decides once per machine and keeps the decision, with the exported model):
    torch at ``extract.precision`` where the config has no runtime to choose."""
    if not hasattr(cfg.extract, "runtime"):
        return {"runtime": "torch", "precision": cfg.extract.precision, "requested": None, "reason": None}
    from embedpipe.workers.extract.embed import Embedder

    embedder = Embedder(cfg.extract, threads=os.cpu_count() or 1)
    record = getattr(embedder, "runtime_record", {}) or {}
    return {
        "runtime": str(getattr(embedder, "runtime", cfg.extract.runtime)),
        "precision": str(getattr(embedder, "precision", cfg.extract.precision)),
        "requested": {"runtime": cfg.extract.runtime, "precision": cfg.extract.precision},
        "reason": record.get("reason"),
    }


def bench_extract(
    paths: list[InputRef],
    cfg: Config,
    sweep: list[int] | None = None,
    peers: tuple[str, ...] = PEERS,
    daft_python: Path | str | None = None,
) -> dict[str, Any]:
    """Ours and the ``peers`` on the same images in one run (see ``TIMING_NOTE`` for the clocks);
    ``daft_python``: the Python of Daft's environment, or the reason the Daft peer is skipped. Then,
    optionally, the pipeline again for each actor count of ``sweep``."""
    from embedpipe.workers.engines.ray_stages import ray_session
    from embedpipe.workers.extract.eager import EagerModel
    from embedpipe.workers.extract.embed import forward_batch, resolve_device

    for ref in {r.uri: r for r in paths}.values():  # same page-cache state for every side
        if "://" not in ref.uri:
            Path(ref.uri).read_bytes()
    # the runtime decision (and model export) of extract.runtime auto, made once per machine, before the
    # clocks: the actors find it made, as a run's later shards do
    runtime = _runtime(cfg)
    n, threads, stack = len(paths), os.cpu_count() or 1, cfg.extract.batch_size
    half = n // 2
    half -= half % stack  # both halves batched alike
    eager: dict[str, dict[str, Any]] = {}
    models: dict[str, EagerModel] = {}
    vectors: dict[str, Vectors] = {}
    dims: dict[str, int] = {}
    order = []
    if "eager" in peers:
        for name, channels_last in (("eager_nchw", False), ("eager_channels_last", True)):
            t0 = time.perf_counter()
            models[name] = EagerModel(cfg.extract, threads, channels_last, stack)
            load_s = time.perf_counter() - t0
            dims = models[name].dims()
            vectors[name] = _empty(n, dims)
            seconds, failed = eager_pass(
                paths[:half], 0, models[name], cfg, vectors[name], f"bench {name} (1st half)"
            )
            eager[name] = {"model_load_s": load_s, "halves_s": [seconds], "failed": failed}
            order.append(f"{name} (1st half)")
    if not dims:
        dims = EagerModel(cfg.extract, threads, True, stack).dims()
    vectors["ours"] = _empty(n, dims)
    engines: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    with ray_session(cfg.ray):
        startup = time.perf_counter() - start
        ours = {**_timed_stream(paths, cfg, "bench ours", vectors["ours"]), "startup_s": round(startup, 3)}
        order.append("ours")
        if "ray_data" in peers:
            vectors["ray_data"] = _empty(n, dims)
            engines["ray_data"] = _ray_data(paths, cfg, vectors["ray_data"])
            order.append("ray_data")
        runs = []
        for actors in sweep or []:
            swept = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"actors": actors})})
            runs.append(_timed_stream(paths, swept, f"bench sweep actors={actors}"))
    if "daft" in peers:
        if isinstance(daft_python, Path):
            vectors["daft"] = _empty(n, dims)
            engines["daft"] = _daft(paths, cfg, daft_python, dims, vectors["daft"])
            order.append("daft")
        else:
            engines["daft"] = {"skipped": daft_python or "no Python with Daft"}
    else:
        engines["daft"] = {"skipped": "not asked for (--peers)"}
    for name in reversed(list(models)):
        seconds, failed = eager_pass(
            paths[half:], half, models[name], cfg, vectors[name], f"bench {name} (2nd half)"
        )
        eager[name]["halves_s"].append(seconds)
        eager[name]["failed"] += failed
        order.append(f"{name} (2nd half)")

    ours_s = ours["time_s"]
    sides: dict[str, dict[str, Any]] = {}
    for name, e in eager.items():
        total = e["model_load_s"] + sum(e["halves_s"])
        sides[name] = {
            "images_per_s": round(n / total, 3),
            "ratio": round(total / ours_s, 4),
            "time_s": round(total, 3),
            "model_load_s": round(e["model_load_s"], 3),
            "halves_images_per_s": [
                round(k / s, 3) if k else None for k, s in zip((half, n - half), e["halves_s"], strict=True)
            ],
            "failed": e["failed"],
            "images": n - e["failed"],
            "threads": threads,
            "images_per_forward": round((n - e["failed"]) / max(1, models[name].forwards), 3),
        }
    for name, side in engines.items():
        sides[name] = side if "skipped" in side else {"ratio": round(side["time_s"] / ours_s, 4), **side}
    for peer, names in (("eager", ("eager_nchw", "eager_channels_last")), ("ray_data", ("ray_data",))):
        if peer not in peers:
            sides.update({name: {"skipped": "not asked for (--peers)"} for name in names})
    reference = "eager_nchw" if "eager_nchw" in vectors else None
    checks = {}
    if reference:
        for name in ("ours", *sides):
            if name in vectors and name != reference:
                checks[name] = cosines(vectors[reference], vectors[name])
        for name, side in sides.items():
            if name in checks:
                side["cosine_min"] = round(min(checks[name].values()), 6)
    timed = {k: v for k, v in sides.items() if "skipped" not in v}
    same_images = ours["images"] == n and all(v["images"] == n and v["failed"] == 0 for v in timed.values())
    fastest_eager = min(eager, key=lambda k: sides[k]["time_s"]) if eager else None
    fastest_engine = min(
        (k for k in ("ray_data", "daft") if k in timed), key=lambda k: timed[k]["time_s"], default=None
    )
    device = resolve_device(cfg.extract.device)
    return {
        "name": "extract",
        "n_images": n,
        "backbone": cfg.extract.backbone,
        "max_side": cfg.extract.max_side,
        "descriptors": list(cfg.extract.descriptors),
        "cpus": os.cpu_count(),
        "device": device,
        "runtime": runtime["runtime"],
        "precision": runtime["precision"],
        "runtime_requested": runtime["requested"],
        "runtime_reason": runtime["reason"],
        "forward_batch": forward_batch(cfg.extract, device),
        "decode": DECODE_NOTE,
        "ours": ours,
        "baseline": {"side": fastest_eager, **sides[fastest_eager]} if fastest_eager else None,
        "peers": sides,
        "ratio": sides[fastest_eager]["ratio"] if fastest_eager else None,
        "ratio_steady": (
            round(ours["steady_images_per_s"] / sides[fastest_eager]["images_per_s"], 4)
            if fastest_eager
            else None
        ),
        "ratio_engines": timed[fastest_engine]["ratio"] if fastest_engine else None,
        "ratio_note": TIMING_NOTE,
        "cosine_reference": reference,
        "cosine_min": round(min(checks["ours"].values()), 6) if "ours" in checks else None,
        "cosine_min_by_descriptor": {k: round(v, 6) for k, v in checks.get("ours", {}).items()},
        "same_images": same_images,
        "order": order,
        "sweep": runs,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from embedpipe.flows.config import add_config_arguments

    add_json_argument(parser)
    parser.add_argument(
        "--images",
        help="images to use, any input form (default: photos of 1.5 megapixels or more made from the real "
        "photographs of a Debian package, fetched once with apt-get)",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=200,
        help="number of images (distinct default photos, or --images cycled; default 200)",
    )
    parser.add_argument(
        "--sweep", default="", metavar="N,N,...", help="also time the pipeline with these model-actor counts"
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        metavar="P,P,...",
        help=f"peers to time against ours, of {', '.join(PEERS)} (default: all; eager: NCHW + channels-last)",
    )
    parser.add_argument(
        "--baseline-python",
        type=Path,
        help=f"a Python with {DAFT} for the Daft peer (default: its own environment, made once under the "
        "user's cache folder)",
    )
    add_config_arguments(parser)


def _peers(text: str) -> tuple[str, ...]:
    peers = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise InputError(f"--peers: unknown peer '{unknown[0]}' (known: {', '.join(PEERS)})")
    return peers


def _daft_python(args: argparse.Namespace) -> Path | str:
    """The Python for the Daft peer, or the reason it is skipped (Daft cannot be installed)."""
    if args.baseline_python is not None:
        return check_side_python(args.baseline_python, "daft, embedpipe.workers.extract.eager")
    try:
        return side_python_over_ours(DAFT, "daft", cache_dir() / "daft-venv")
    except InputError as err:
        log.warning("bench extract: the Daft peer is skipped: %s", err)
        return str(err)


def run(args: argparse.Namespace) -> int:
    """--n images of --images (cycled), or --n distinct default photos."""
    from embedpipe.flows.config import config_from_args
    from embedpipe.workers.ingest.sources import list_inputs

    if args.n < 1:
        raise InputError("--n must be at least 1")
    try:
        sweep = [int(v) for v in args.sweep.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sweep expects comma-separated actor counts, got '{args.sweep}'") from None
    if any(v < 1 for v in sweep):
        raise InputError("--sweep actor counts must be at least 1")
    peers = _peers(args.peers)
    cfg = config_from_args(args)
    photos = None
    if cfg.images is None:
        folder, photos = package_photos(args.n, cfg.seed)
        cfg = cfg.model_copy(update={"images": str(folder)})
    refs = list(list_inputs(cfg.images).refs)
    if not refs:
        raise InputError(f"no usable inputs at {cfg.images}")
    daft_python = _daft_python(args) if "daft" in peers else None
    paths = [refs[i % len(refs)] for i in range(args.n)]
    result = bench_extract(paths, cfg, sweep, peers, daft_python)
    result = {**result, "images": photos or {"images": str(cfg.images), "distinct": min(len(refs), args.n)}}
    write_result(result, args.json)
    log.info(
        "bench extract: ours %.2f img/s (%s, %s); ratio %s against the faster eager loop, %s against the "
        "faster of Ray Data and Daft; cosine_min %s",
        result["ours"]["images_per_s"],
        result["runtime"],
        result["precision"],
        result["ratio"],
        result["ratio_engines"],
        result["cosine_min"],
    )
    return 0
