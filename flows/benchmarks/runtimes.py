"""``embedpipe bench runtimes``: the extraction trunk on every runtime and precision this machine offers
(torch, ONNX Runtime, OpenVINO at fp32, bf16, int8), each as the pipeline's ``Embedder`` runs it, on the
runtime choice's own probe photos: ms per image of the whole call (preprocess, trunk, the five
poolings), the descriptor cosine of each pooling against eager torch fp32, and whether two passes give
the same bytes. With ``--demo``, also the demo's mAP under each (``embedpipe demo`` in a subprocess with
``extract.runtime`` / ``extract.precision`` set) and its change against torch fp32: how int8 and bf16
are judged (docs/runtimes.md).

``ours`` is what ``auto`` picks at fp32 on this machine, ``baseline`` the eager torch fp32 module
(channels-last); ``ratio`` is the baseline's ms per image over ours, both timed in the same
interleaved passes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from embedpipe.flows.benchmarks.common import add_json_argument, write_result
from embedpipe.storage.contracts.errors import BackboneError, RunFailed

log = logging.getLogger("embedpipe.bench")

# (runtime, precision) in the order rows are written; torch fp32 first: the reference
PAIRS = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("torch", "bf16"),
    ("openvino", "bf16"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    parser.add_argument("--backbone", default="efficientnet_lite0", help="the backbone (default: the demo's)")
    parser.add_argument("--max-side", type=int, default=1024, help="probe photos' longer side (default 1024)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the probes (default 5)")
    parser.add_argument(
        "--only",
        help="comma-separated 'runtime precision' pairs to measure besides torch fp32, e.g. "
        "'openvino fp32,onnxruntime int8' (default: all seven)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="also run the demo under each and record its mAP change"
    )


def _pairs(only: str | None) -> list[tuple[str, str]]:
    if not only:
        return list(PAIRS)
    wanted = [tuple(p.split()) for p in only.split(",") if p.strip()]
    unknown = [" ".join(p) for p in wanted if p not in PAIRS]
    if unknown:
        known = ", ".join(" ".join(p) for p in PAIRS)
        raise BackboneError(f"bench runtimes --only: unknown {', '.join(unknown)} (known: {known})")
    return [PAIRS[0], *(p for p in PAIRS[1:] if p in wanted)]


def _embedder(backbone: str, max_side: int, threads: int, runtime: str, precision: str):
    from embedpipe.storage.contracts.config import ExtractConfig
    from embedpipe.workers.extract.embed import Embedder
    from embedpipe.workers.extract.runtimes import PARITY_POOLS

    cfg = ExtractConfig(
        backbone=backbone,
        max_side=max_side,
        descriptors=PARITY_POOLS,
        runtime=runtime,
        precision=precision,
        device="cpu",
    )
    return Embedder(cfg, threads=threads)


def measure(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per pair: the pairs' embedders are built first, then every timed pass runs each in turn
    over the probes, so that a change in the machine's load weighs on each alike (median over passes)."""
    from embedpipe.workers.extract.runtimes import cosines, probe_images

    probes = probe_images(args.max_side)
    built, rows = [], []
    for runtime, precision in pairs:
        row: dict[str, Any] = {"runtime": runtime, "precision": precision}
        try:
            emb = _embedder(args.backbone, args.max_side, args.threads, runtime, precision)
        except BackboneError as err:
            rows.append({**row, "error": str(err)})
            log.info("bench runtimes: %s %s: %s", runtime, precision, err)
            continue
        got = f"{emb.runtime} {emb.precision}"
        if got != f"{runtime} {precision}":  # a configured runtime is never swapped; say so if it were
            raise RunFailed(f"bench runtimes: asked for {runtime} {precision}, the embedder runs {got}")
        first = [emb(p) for p in probes]  # warm-up and the descriptors
        again = [emb(p) for p in probes]
        same = all(a[k].tobytes() == b[k].tobytes() for a, b in zip(first, again, strict=True) for k in a)
        rows.append({**row, "deterministic": same})
        built.append((rows[-1], emb, first))
    if not built or built[0][0]["runtime"] != "torch":
        raise RunFailed("bench runtimes: eager torch fp32, the reference, failed on the probe photos")
    ref = built[0][2]
    samples: dict[int, list[float]] = {i: [] for i in range(len(built))}
    for _ in range(args.passes):
        for i, (_, emb, _) in enumerate(built):
            for p in probes:
                start = time.perf_counter()
                emb(p)
                samples[i].append(time.perf_counter() - start)
    for i, (row, _, descriptors) in enumerate(built):
        cos = {name: round(c, 6) for name, c in cosines(descriptors, ref).items()}
        row.update(
            ms_per_image=round(1000 * statistics.median(samples[i]), 1),
            cosine_min=min(cos.values()),
            cosine=cos,
        )
    return rows


def demo_map(runtime: str, precision: str, threads: int) -> dict[str, float]:
    """The demo's mAP per result row (``descriptor-post-rerank``) under ``runtime`` / ``precision``."""
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-runtimes-") as tmp:
        out = Path(tmp) / "demo"
        cmd = [
            sys.executable,
            "-m",
            "embedpipe.flows.cli",
            "demo",
            "--out",
            str(out),
            "--set",
            f"extract.runtime={runtime}",
            "--set",
            f"extract.precision={precision}",
            "--set",
            "extract.fp32_reference=false",  # torch fp32's own demo run is the reference here
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0:
            tail = [s for s in done.stderr.splitlines() if s.strip()][-1:] or [f"exit {done.returncode}"]
            raise RunFailed(f"bench runtimes: the demo under {runtime} {precision} failed: {tail[0]}")
        metrics = json.loads((out / "report" / "metrics.json").read_text())
    return {
        f"{r['descriptor']}-{r['post']}-{r['rerank']}": round(float(r["map"]), 6) for r in metrics["results"]
    }


def run(args: argparse.Namespace) -> int:
    from embedpipe.storage.contracts.config import ExtractConfig
    from embedpipe.workers.extract.embed import Embedder

    pairs = _pairs(args.only)
    auto = Embedder(  # auto's fp32 choice on this machine (its cached decision once made): ours
        ExtractConfig(backbone=args.backbone, max_side=args.max_side, runtime="auto", device="cpu"),
        threads=args.threads,
    )
    chosen = f"{auto.runtime} {auto.precision}"
    del auto
    if (auto_pair := (*chosen.split(" "),)) not in pairs:
        pairs.append(auto_pair)
    rows = measure(args, pairs)
    load = round(os.getloadavg()[0], 2)  # right after the timed passes (the demos come after)
    if args.demo:
        reference: dict[str, float] | None = None
        for row in rows:
            if "error" in row:
                continue
            row["demo_map"] = demo_map(row["runtime"], row["precision"], args.threads)
            reference = reference or row["demo_map"]
            row["demo_map_change"] = {k: round(v - reference[k], 6) for k, v in row["demo_map"].items()}
            row["demo_max_abs_change"] = max(abs(v) for v in row["demo_map_change"].values())
    timed = {f"{r['runtime']} {r['precision']}": r for r in rows if "ms_per_image" in r}
    if chosen not in timed:
        raise RunFailed(f"bench runtimes: auto's choice {chosen} failed on the probe photos")
    base, ours = timed["torch fp32"], timed[chosen]
    result = {
        "name": "runtimes",
        "what": (
            f"the Embedder on {args.backbone}'s trunk under each runtime and precision: ms per image of the "
            f"whole call on the probe photos at max_side {args.max_side} (median of {args.passes} "
            f"interleaved passes, {args.threads} threads); descriptor cosine per pooling against eager "
            "torch fp32 (min over the probes); two passes byte-identical"
            + ("; the demo's mAP under each and its change against torch fp32" if args.demo else "")
        ),
        "ours": {"runtime": chosen, "ms_per_image": ours["ms_per_image"], "cosine_min": ours["cosine_min"]},
        "baseline": {"runtime": "torch fp32 (eager, channels-last)", "ms_per_image": base["ms_per_image"]},
        "ratio": round(base["ms_per_image"] / ours["ms_per_image"], 3),
        "threads": args.threads,
        "loadavg_1min_after_timing": load,
        "rows": rows,
    }
    write_result(result, args.json)
    log.info(
        "bench runtimes: auto picks %s at %.0f ms/image, eager torch fp32 %.0f ms/image, ratio %.2f",
        chosen,
        ours["ms_per_image"],
        base["ms_per_image"],
        result["ratio"],
    )
    return 0
