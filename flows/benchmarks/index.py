"""``embedpipe bench index``: one trained IVF-PQ index filled (a) in one process with every FAISS thread
(the baseline), (b) in one process on one thread, (c) as W one-CPU Ray tasks (one per part file) then
merged (ours), each warmed alike and timed in alternation; QPS at recall@10 >= 0.9 on held-out queries
and the growth of build time and size with the number of vectors.

``--baseline autofaiss``: our ``index.factory: auto`` (the choice, then the build) against autofaiss on
the same vectors under the same memory budget. autofaiss runs in a virtual environment of its own
(created once under the user's cache folder, or any Python given with ``--baseline-python``) as a
subprocess that writes its index to a file; that file is read back here and both indices are measured by
the same code on the same held-out queries with the same threads: recall@10 against exact search, QPS,
bytes per vector, build seconds."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.flows.benchmarks.common import (
    add_json_argument,
    add_store_arguments,
    cache_dir,
    check_side_python,
    peak_rss_mb,
    side_python,
    write_result,
)
from embedpipe.flows.benchmarks.store import store_dir, synthetic_queries, synthetic_store
from embedpipe.storage.contracts.errors import InputError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger("embedpipe.bench")

REPEATS = 2  # timed passes of each side, after one untimed warm-up pass
AUTOFAISS = "autofaiss==2.18.0"
AUTOFAISS_PINS = ("faiss-cpu==1.13.2", "pyarrow<21")  # what autofaiss 2.18 runs with (numpy < 2)
BASELINE_ROWS, BASELINE_DIM, QUERIES = 200_000, 256, 1000


def recall_at(found: np.ndarray, nearest: np.ndarray, k: int) -> float:
    """1-recall@k (FAISS benchmarks' R@k): fraction of queries whose exact nearest neighbour is among
    the k returned."""
    return float(np.mean([nearest[i] in found[i, :k] for i in range(len(nearest))]))


def qps_at_recall(
    index: faiss.Index, x: np.ndarray, queries: np.ndarray, k: int, target: float
) -> dict[str, Any]:
    """Sweep nprobe (powers of two); the first setting whose recall@k against exact search reaches
    ``target``. ``queries``: held out (drawn from the collection's distribution, not from its vectors)."""
    import faiss

    n_queries = len(queries)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(queries, 1)[1][:, 0]
    ivf = faiss.extract_index_ivf(index)
    sweep = []
    nprobe = 1
    while nprobe <= ivf.nlist:
        ivf.nprobe = nprobe
        start = time.perf_counter()
        found = index.search(queries, k)[1]
        seconds = time.perf_counter() - start
        sweep.append(
            {
                "nprobe": nprobe,
                "recall": round(recall_at(found, truth, k), 4),
                "qps": round(n_queries / seconds, 1),
            }
        )
        if sweep[-1]["recall"] >= target:
            break
        nprobe *= 2
    hit = next((s for s in sweep if s["recall"] >= target), None)
    return {"k": k, "target_recall": target, "reached": hit, "sweep": sweep}


def _fill_all(trained: np.ndarray, directory: Path, threads: int) -> tuple[faiss.Index, float]:
    """One process: read every vector, add them all with ``threads`` FAISS threads."""
    import faiss

    from embedpipe.storage.features import read_features
    from embedpipe.workers.index import ann

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        start = time.perf_counter()
        _, x = read_features(directory)
        index = ann.deserialize(trained)
        index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
        return index, time.perf_counter() - start
    finally:
        faiss.omp_set_num_threads(before)


def bench_index(
    directory: Path, rows: int, dim: int, parts: int, factory: str, growth: list[int]
) -> dict[str, Any]:
    """(a) one process all threads, (b) one process one thread, (c) one-CPU Ray tasks per part + merge."""
    import faiss

    from embedpipe.storage.contracts.config import RayConfig
    from embedpipe.storage.features import read_features
    from embedpipe.workers.engines.ray_stages import cluster_cpus, ray_session
    from embedpipe.workers.index import ann
    from embedpipe.workers.index.build import fill_from_store

    synthetic_store(directory, rows, dim, parts)
    _, x = read_features(directory)
    start = time.perf_counter()
    sample = x[np.random.default_rng(0).choice(len(x), min(len(x), 50_000), replace=False)]
    trained = ann.serialize(ann.train_index(factory, sample))
    train_s = time.perf_counter() - start
    cores = faiss.omp_get_max_threads()
    with ray_session(RayConfig()):
        workers = cluster_cpus()

        def ours() -> tuple[faiss.Index, float]:
            start = time.perf_counter()
            index, _ = fill_from_store(directory, trained, "ray", label="bench")
            return index, time.perf_counter() - start

        sides = {
            "ours": ours,
            "all_cores": lambda: _fill_all(trained, directory, cores),
            "one_core": lambda: _fill_all(trained, directory, 1),
        }
        # every side warmed alike by one untimed pass (the first Ray pass also starts Ray's workers), then
        # REPEATS timed passes alternated between the sides; each side's time is its mean
        cold = {name: round(fill()[1], 3) for name, fill in sides.items()}
        runs: dict[str, list[float]] = {name: [] for name in sides}
        built: dict[str, faiss.Index] = {}
        for _ in range(REPEATS):
            for name, fill in sides.items():
                built[name], seconds = fill()
                runs[name].append(round(seconds, 3))
        a_s, b_s, c_s = (float(np.mean(runs[name])) for name in ("all_cores", "one_core", "ours"))
        sharded, all_cores = built["ours"], built["all_cores"]
        del built
        grown = []
        for n in growth:
            sub = synthetic_store(directory.parent / f"growth-{n}", n, dim, parts)
            start = time.perf_counter()
            idx, _ = fill_from_store(sub, trained, "ray", label=f"bench {n}")
            grown.append(
                {
                    "vectors": n,
                    "fill_s": round(time.perf_counter() - start, 3),
                    "index_mb": round(faiss.serialize_index(idx).nbytes / 2**20, 2),
                }
            )
            del idx
    same = all(
        np.array_equal(u, v) for u, v in zip(ann.codes_of(sharded), ann.codes_of(all_cores), strict=True)
    )
    return {
        "name": "index",
        "rows": rows,
        "dim": dim,
        "parts": parts,
        "factory": factory,
        "train_s": round(train_s, 3),
        "bytes_per_vector": ann.bytes_per_vector(sharded),
        "ours": {
            "time_s": round(c_s, 3),
            "cold_s": cold["ours"],
            "runs_s": runs["ours"],
            "way": f"{workers} one-CPU Ray tasks, one per part, then merge",
        },
        "baseline": {
            "time_s": round(a_s, 3),
            "cold_s": cold["all_cores"],
            "runs_s": runs["all_cores"],
            "way": f"one process, every FAISS thread ({cores})",
        },
        "one_core": {
            "time_s": round(b_s, 3),
            "cold_s": cold["one_core"],
            "runs_s": runs["one_core"],
            "way": "one process, one FAISS thread",
        },
        "workers": workers,
        "ratio": round(a_s / c_s, 4),
        "ratio_one_core": round(b_s / c_s, 4),
        "ratio_note": "ratio = time(one process, every FAISS thread) / time(sharded on Ray); ratio_one_core "
        f"= time(one FAISS thread) / time(sharded); each side warmed by one untimed pass, then {REPEATS} "
        "passes alternated between the sides (mean); reading the store counted in every way, Ray "
        "start-up excluded",
        "sharded_equals_single": same,
        "search": qps_at_recall(sharded, x, synthetic_queries(min(1000, len(x)), dim), 10, 0.9),
        "growth": grown,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
    }


# ------------------------------------------------------------------------------ --baseline autofaiss


def autofaiss_python(venv: Path | None = None) -> Path:
    """The Python of a virtual environment with autofaiss (and the faiss-cpu and pyarrow it runs with),
    created at ``venv`` (default: the user's cache folder) on first use and reused after."""
    return side_python(AUTOFAISS, "autofaiss", venv or cache_dir() / "autofaiss-venv", pins=AUTOFAISS_PINS)


# run by the side environment's Python: build_index on a folder of .npy files, the index written to a file
AUTOFAISS_RUN = """
import json, sys, time
import faiss, autofaiss
from autofaiss import build_index
args, out = json.loads(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
build_index(**args)
seconds = time.perf_counter() - start
with open(out, "w") as f:
    json.dump({"build_s": seconds, "faiss": faiss.__version__, "autofaiss": autofaiss.__version__}, f)
"""


def run_autofaiss(python: Path, vectors: Path, work: Path, budget_bytes: int, threads: int) -> dict[str, Any]:
    """autofaiss's ``build_index`` on the ``.npy`` files in ``vectors`` (inner product, its default
    query-time target), in a subprocess of ``python``; the index file it wrote, its own report, the time
    its ``build_index`` took and the subprocess's whole time."""
    settings = {
        "embeddings": str(vectors),
        "index_path": str(work / "autofaiss.index"),
        "index_infos_path": str(work / "autofaiss-infos.json"),
        "file_format": "npy",
        "metric_type": "ip",
        "max_index_memory_usage": f"{budget_bytes}B",
        "current_memory_available": "8G",
        "nb_cores": threads,
        "max_index_query_time_ms": 10.0,
        "min_nearest_neighbors_to_retrieve": 20,
    }
    out = work / "autofaiss-run.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [str(python), "-c", AUTOFAISS_RUN, json.dumps(settings), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=4 * 3600,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InputError(f"autofaiss failed: {err}") from None
    process_s = time.perf_counter() - start
    (work / "autofaiss.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not out.exists():
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
        raise InputError(f"autofaiss failed: {tail[0].strip()}")
    ran = json.loads(out.read_text())
    infos = json.loads(Path(settings["index_infos_path"]).read_text())
    infos.pop("index_path", None)  # a temporary folder
    return {
        "build_s": round(ran["build_s"], 3),
        "process_s": round(process_s, 3),
        "versions": {"autofaiss": ran["autofaiss"], "faiss": ran["faiss"]},
        "index_key": infos.get("index_key"),
        "index_param": infos.get("index_param"),
        "infos": infos,
        "settings": {
            k: v for k, v in settings.items() if k not in ("embeddings", "index_path", "index_infos_path")
        },
        "index_path": settings["index_path"],
    }


def measure_index(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, threads: int) -> dict[str, Any]:
    """What both sides report, measured alike: recall@10 (10-recall@10, as the chooser counts it, and
    1-recall@10), QPS on ``threads`` threads (best of two passes), bytes per vector (the serialized index
    over its vectors) and the code size FAISS reports."""
    import faiss

    from embedpipe.workers.index import ann
    from embedpipe.workers.index.choose import recall_at_k, timed_search

    found, qps = timed_search(index, queries, 10, threads)
    size = int(faiss.serialize_index(index).nbytes)
    return {
        "recall_at_10": round(recall_at_k(found, truth, 10), 4),
        "one_recall_at_10": round(recall_at(found, truth[:, 0], 10), 4),
        "qps": round(qps, 1),
        "bytes_per_vector": round(size / index.ntotal, 1),
        "code_bytes": ann.bytes_per_vector(index),
        "index_mb": round(size / 2**20, 2),
        "queries_sha256": hashlib.sha256(np.ascontiguousarray(queries).tobytes()).hexdigest(),
    }


def build_ours(x: np.ndarray, budget: int, seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """``index.factory: auto`` as a run does it (default index settings): the choice on a sample, then the
    pick trained on a seeded ``index.train_size`` sample and filled with every vector in this process
    (the ``local`` index engine), its search parameter set."""
    from embedpipe.storage.contracts.config import IndexConfig
    from embedpipe.workers.index import ann
    from embedpipe.workers.index.choose import choose_index

    cfg = IndexConfig()
    start = time.perf_counter()
    pick, table = choose_index(x, budget, cfg.target_recall, seed=seed, max_rows=cfg.train_size)
    choice_s = time.perf_counter() - start
    sample = x[
        np.sort(np.random.default_rng(seed).choice(len(x), min(len(x), cfg.train_size), replace=False))
    ]
    trained = ann.train_index(pick["index"], sample, seed)
    train_s = time.perf_counter() - start - choice_s
    index = ann.fill(ann.serialize(trained), x, np.arange(len(x), dtype=np.int64))
    build_s = time.perf_counter() - start
    if pick["param"]:
        ann.set_search_params(index, pick["value"], pick["value"])
    return index, {
        "index_key": pick["index"],
        "param": pick["param"],
        "value": pick["value"],
        "build_s": round(build_s, 3),
        "choice_s": round(choice_s, 3),
        "train_s": round(train_s, 3),
        "fill_s": round(build_s - choice_s - train_s, 3),
        "chosen_on": table["chosen_on"],
        "choice": table["pick"],
        "candidates": len({r["index"] for r in table["rows"]}),
        "settings": {
            "budget_bytes_per_vector": budget,
            "target_recall": cfg.target_recall,
            "train_size": cfg.train_size,
            "seed": seed,
        },
    }


def bench_autofaiss(
    x: np.ndarray, queries: np.ndarray, budget_mb: float, python: Path, source: dict[str, Any]
) -> dict[str, Any]:
    """Ours against autofaiss on database ``x`` and held-out ``queries`` (both float32, L2-normalised)
    under ``budget_mb`` MiB for the whole index."""
    import faiss

    threads = faiss.omp_get_max_threads()
    budget_bytes = int(budget_mb * 2**20)
    per_vector = budget_bytes // len(x)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(queries, 10)[1]
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-autofaiss-") as tmp:
        work = Path(tmp)
        (work / "vectors").mkdir()
        np.save(work / "vectors" / "part-00000.npy", x)
        log.info("bench index: autofaiss on %d x %d vectors, %.1f MiB", len(x), x.shape[1], budget_mb)
        baseline = run_autofaiss(python, work / "vectors", work, budget_bytes, threads)
        theirs = faiss.read_index(baseline.pop("index_path"))  # written by faiss 1.13, read by ours
        if baseline["index_param"]:
            faiss.ParameterSpace().set_index_parameters(theirs, baseline["index_param"])
        measured = measure_index(theirs, queries, truth, threads)
        del theirs
    log.info("bench index: ours (choice and build)")
    index, ours = build_ours(x, per_vector)
    ours.update(measure_index(index, queries, truth, threads))
    del index
    baseline = {"system": "autofaiss", **baseline, **measured}
    for side in (baseline, ours):
        side["within_budget"] = side["index_mb"] * 2**20 <= budget_bytes
    return {
        "name": "index",
        "mode": "baseline autofaiss",
        "rows": len(x),
        "dim": int(x.shape[1]),
        "source": source,
        "queries": {"n": len(queries), "sha256": measured["queries_sha256"]},
        "budget": {"mb": budget_mb, "bytes": budget_bytes, "bytes_per_vector": per_vector},
        "threads": threads,
        "measured_alike": "both indices searched here with faiss "
        f"{faiss.__version__} on the same queries and {threads} threads; recall_at_10 = 10-recall@10 "
        "(mean fraction of the exact top 10 in the returned top 10), one_recall_at_10 = the exact nearest "
        "neighbour in the top 10; QPS best of two passes; bytes_per_vector = serialized index / vectors",
        "baseline": baseline,
        "ours": ours,
        "ratio": round(baseline["build_s"] / ours["build_s"], 4),
        "ratio_note": "autofaiss build_index seconds (its process start and imports excluded) / ours "
        "(choice, training and filling)",
        "qps_ratio": round(ours["qps"] / baseline["qps"], 4),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as err:
        raise InputError(f"bench index: cannot read {path}: {err}") from None


def load_vectors(vectors: Path, queries: Path | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The user's float32 ``.npy`` database and queries, L2-normalised; without ``queries``, QUERIES
    seeded rows of the database held out as queries (and removed from it)."""
    x, q = _load_npy(vectors), _load_npy(queries) if queries else None
    if x.ndim != 2 or (q is not None and (q.ndim != 2 or q.shape[1] != x.shape[1])):
        raise InputError("bench index: --vectors and --queries must be 2-D arrays of the same width")
    if q is None:
        if len(x) <= QUERIES:
            raise InputError(f"bench index: --vectors needs more than {QUERIES} rows to hold queries out")
        held = np.random.default_rng(seed).choice(len(x), QUERIES, replace=False)
        q, x = x[np.sort(held)], np.delete(x, held, axis=0)
    x, q = (np.ascontiguousarray(a, np.float32) for a in (x, q))
    return tuple(a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12) for a in (x, q))


# ---------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    add_store_arguments(parser, dim=128)
    parser.set_defaults(rows=None, dim=None)  # each mode has its own defaults
    parser.add_argument("--factory", default="IVF1024,PQ32", help="factory (default IVF1024,PQ32)")
    parser.add_argument(
        "--growth", default="", metavar="N,N,...", help="also time the sharded fill at these sizes"
    )
    parser.add_argument(
        "--baseline",
        choices=["autofaiss"],
        help="instead: index.factory auto (choice and build) against autofaiss under the same memory "
        f"budget (--rows and --dim then default to {BASELINE_ROWS} and {BASELINE_DIM})",
    )
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=64.0,
        help="--baseline: memory budget of the index, MiB (default 64)",
    )
    parser.add_argument(
        "--vectors", type=Path, help="--baseline: a float32 .npy database instead of the synthetic one"
    )
    parser.add_argument(
        "--queries", type=Path, help=f"--baseline: its queries (.npy; default {QUERIES} rows held out of it)"
    )
    parser.add_argument(
        "--baseline-python",
        type=Path,
        metavar="PY",
        help="--baseline: a Python with autofaiss installed (default: a virtual environment created once "
        "under ~/.cache/embedpipe)",
    )


def run_baseline(args: argparse.Namespace) -> int:
    """``--baseline autofaiss``: see the module doc."""
    from embedpipe.storage.features import read_features

    if args.budget_mb <= 0:
        raise InputError("--budget-mb must be positive")
    if args.baseline_python is not None:
        python = check_side_python(args.baseline_python, "autofaiss")
    else:
        python = autofaiss_python()
    if args.vectors is not None:
        x, queries = load_vectors(args.vectors, args.queries)
        source = {"vectors": str(args.vectors), "queries": str(args.queries) if args.queries else "held out"}
    else:
        rows = BASELINE_ROWS if args.rows is None else args.rows
        dim = BASELINE_DIM if args.dim is None else args.dim
        directory = synthetic_store(
            store_dir(args.store, "index", rows, dim, args.parts), rows, dim, args.parts
        )
        x = read_features(directory)[1]
        queries = synthetic_queries(QUERIES, dim)
        source = {"vectors": "synthetic clustered store (seed 0)", "queries": "synthetic_queries (seed 0)"}
    result = write_result(bench_autofaiss(x, queries, args.budget_mb, python, source), args.json)
    log.info(
        "bench index: autofaiss %s %.1f s, recall@10 %.3f, %.0f QPS; ours %s %.1f s, recall@10 %.3f, "
        "%.0f QPS; build ratio %.1f",
        result["baseline"]["index_key"],
        result["baseline"]["build_s"],
        result["baseline"]["recall_at_10"],
        result["baseline"]["qps"],
        result["ours"]["index_key"],
        result["ours"]["build_s"],
        result["ours"]["recall_at_10"],
        result["ours"]["qps"],
        result["ratio"],
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from embedpipe.workers.index.ann import check_factory

    if args.baseline:
        return run_baseline(args)
    args.rows = 1_000_000 if args.rows is None else args.rows
    args.dim = 128 if args.dim is None else args.dim
    store = store_dir(args.store, "index", args.rows, args.dim, args.parts)
    try:
        growth = [int(v) for v in args.growth.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--growth expects comma-separated sizes, got '{args.growth}'") from None
    result = bench_index(store, args.rows, args.dim, args.parts, check_factory(args.factory), growth)
    write_result(result, args.json)
    log.info("bench index: ratio %.3f against one process on every thread", result["ratio"])
    return 0
