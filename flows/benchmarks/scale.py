"""``embedpipe bench scale``: the pipeline's own stages after extraction (plan, fit, index + evaluate,
report) at several collection sizes, each size in a fresh process
(``python -m embedpipe.flows.benchmarks.scale --one ROWS DIM FACTORY WORK``), so that each size's driver
memory is its own. Per size: each stage's seconds, the driver's peak RSS while the stages ran, the largest
Ray worker's peak RSS, the feature store's size and the mAP of the main row; then how driver memory and
time per row grow from the smallest size to the largest (the scale rule asks for flat).

Each size's run directory is made as if extraction had happened: a seeded feature store of ``gem``
vectors in parts of ``PART_ROWS`` rows, with a few hundred INRIA Holidays query groups (``1GGG00.jpg``
and its positives, noisy copies of the query's vector) among non-layout filler rows, the last half of
the filler in parts of their own as distractors (``distractor:`` paths). The plan stage lists and plans
as many real inputs: tiny JPEGs in tar shards, written once per size under the user's cache folder."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.flows.benchmarks.common import add_json_argument, cache_dir, peak_rss_mb, write_result
from embedpipe.storage.contracts.errors import InputError, RunFailed

log = logging.getLogger("embedpipe.bench")

PART_ROWS = 50_000  # rows per feature part, as extraction writes them (extract.shard_size)
TAR_MEMBERS = 10_000  # images per input tar shard
GROUPS = 300  # Holidays query groups planted in the collection (fewer in small collections)
POSITIVES = 3  # positives per query group
# norm of the noise that makes a positive from its query's vector: cosine about 0.7 to its query, near
# the tail of the rows that share its cluster centre, so distractors and compression can cost mAP
NOISE = 1.0
CROPS = 512  # distinct 16x16 crops encoded; files differ by a comment segment as well
SAMPLE_S = 0.05  # driver RSS sampling period
WORKER_SAMPLE_S = 0.25  # Ray workers' peak RSS sampling period
TOP_K = 1000  # results ranked per query at every size (eval.top_k 0 ranks the whole of small databases)
STAGES = ("plan", "fit", "index_evaluate", "report")
INPUTS_VERSION = 1


def parse_sizes(text: str) -> list[int]:
    """``200000,2000000`` -> [200000, 2000000]: at least two sizes, each at least 1000, increasing."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows: comma-separated integers expected, got '{text}'") from None
    if len(sizes) < 2 or min(sizes) < 1000 or sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError("--rows: two or more increasing sizes, each at least 1000")
    return sizes


def part_rows(rows: int) -> int:
    """Rows per feature part: ``PART_ROWS``, fewer in small collections so they still have 4 parts."""
    return min(PART_ROWS, max(250, rows // 4))


def groups_for(rows: int) -> int:
    """Query groups planted: ``GROUPS``, or as many as a twentieth of the rows holds."""
    return min(GROUPS, rows // (20 * (1 + POSITIVES)))


ROWS_PER_LIST = 256  # database rows per inverted list (at least): nlist grows with the collection
TRAIN_PER_LIST = 40  # training rows per list (faiss warns under 39)


def nlist_for(rows: int) -> int:
    """Inverted lists of a size's index: a power of two with at least ``ROWS_PER_LIST`` rows each, so a
    query visiting ``nprobe`` lists scans about as many rows at every size."""
    nlist = 16
    while nlist * 2 * ROWS_PER_LIST <= rows:
        nlist *= 2
    return nlist


HNSW_FROM_NLIST = 16384  # from this many lists the coarse quantiser is an HNSW graph


def factory_for(rows: int, dim: int) -> str:
    """The compressed IVF-PQ factory of a size: ``nlist_for(rows)`` lists, PQ with sub-vectors of at
    least 4 dims of the whitened variant (``whitened_dim``), the same code size at every size. From
    ``HNSW_FROM_NLIST`` lists the coarse quantiser is ``HNSW32`` (as FAISS advises for 1M+ vectors):
    a flat one's cost per assigned row grows with ``nlist`` and DBA assigns every row
    (docs/scaling.md)."""
    m = max(1, min(32, whitened_dim(dim) // 4))
    nlist = nlist_for(rows)
    return f"IVF{nlist}{'_HNSW32' if nlist >= HNSW_FROM_NLIST else ''},PQ{m}"


QUERY_PROBE_FRACTION = 256  # queries visit at least 1/256 of the lists (16 of 4,096 at 2M rows)
DBA_NPROBE = 16  # DBA's neighbour search (once per database row) visits this many lists at every size


def nprobe_for(rows: int) -> int:
    """``index.nprobe`` of a size: the default 16, or 1/``QUERY_PROBE_FRACTION`` of the lists, so the
    queries probe the same fraction of the space from 2M rows up (a rule fixed before any size ran, not
    tuned on the queries' scores). DBA's neighbour search keeps ``DBA_NPROBE`` (``rerank.dba_nprobe``):
    it runs once per database row, the queries' once per query."""
    return max(DBA_NPROBE, nlist_for(rows) // QUERY_PROBE_FRACTION)


def train_size_for(rows: int) -> int:
    """``index.train_size`` of a size: the default 100,000, or enough rows for every list."""
    return max(100_000, TRAIN_PER_LIST * nlist_for(rows))


def whitened_dim(dim: int) -> int:
    return max(2, min(128, dim // 2))


# the run directory, as if extraction had happened ------------------------------------------------------


def _ids(start: int, stop: int) -> list[str]:
    return [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8).hexdigest() for i in range(start, stop)]


def layout_rows(rows: int) -> tuple[int, int, int]:
    """(rows of the planted groups, collection filler rows, distractor rows) of a collection."""
    planted = groups_for(rows) * (1 + POSITIVES)
    filler = rows - planted
    distractors = filler // 2
    return planted, filler - distractors, distractors


def write_collection(run: Path, rows: int, dim: int, seed: int = 0) -> dict[str, int]:
    """The ``gem`` feature store of ``run`` (see the module's doc), written part by part; collection
    parts first, then the distractors' parts. Returns its counts."""
    from embedpipe.flows.benchmarks.store import CENTRES, _draw
    from embedpipe.storage.contracts.layout import RunLayout
    from embedpipe.storage.features import FeatureWriter
    from embedpipe.storage.inputs import DISTRACTOR_PREFIX

    layout = RunLayout(run)
    rng = np.random.default_rng([seed, rows, dim])
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    groups = groups_for(rows)
    planted, collection_filler, distractors = layout_rows(rows)
    per = part_rows(rows)
    n_collection = planted + collection_filler
    collection_parts = -(-n_collection // per)
    n_parts = collection_parts + -(-distractors // per)
    meta = {"descriptor": "gem", "backbone": "synthetic", "max_side": 0, "gem_p": 3.0}
    writer = FeatureWriter(layout.feature_dir("gem"), dim, n_parts, meta)

    # planted Holidays groups: query imno (1000 + g) * 100, positives the next POSITIVES numbers
    queries = _draw(rng, centres, groups)
    vectors = np.repeat(queries, 1 + POSITIVES, axis=0)
    noise = rng.standard_normal(vectors.shape, dtype=np.float32)
    noise *= NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    noise[:: 1 + POSITIVES] = 0.0  # the query's own row is its vector
    vectors += noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [f"holidays/{(1000 + g) * 100 + j:06d}.jpg" for g in range(groups) for j in range(1 + POSITIVES)]

    def chunks(start: int, stop: int, prefix: str):
        for a in range(start, stop, per):
            b = min(stop, a + per)
            yield a, b, [f"{prefix}filler/{i:09d}.jpg" for i in range(a, b)]

    written = 0
    for part in range(collection_parts):
        a, b = part * per, min(n_collection, (part + 1) * per)
        paths, x = [], []
        if a < planted:
            paths += names[a : min(b, planted)]
            x.append(vectors[a : min(b, planted)])
        lo = max(a, planted)
        if lo < b:
            paths += [f"filler/{i:09d}.jpg" for i in range(lo, b)]
            x.append(_draw(rng, centres, b - lo))
        _write(writer, part, written, paths, np.concatenate(x))
        written += b - a
    for k, (a, b, paths) in enumerate(chunks(n_collection, rows, DISTRACTOR_PREFIX)):
        _write(writer, collection_parts + k, written, paths, _draw(rng, centres, b - a))
        written += b - a
    writer.close()
    return {"rows": written, "planted": planted, "distractors": distractors, "parts": n_parts}


def _write(writer: Any, part: int, start: int, paths: list[str], x: np.ndarray) -> None:
    sizes = np.full(len(paths), 16, np.int32)
    writer.write(part, _ids(start, start + len(paths)), paths, sizes, sizes, x)


# the real inputs the plan stage lists ------------------------------------------------------------------


def _crops(seed: int) -> list[bytes]:
    """``CROPS`` distinct 16x16 JPEG crops of the bundled photographs (seeded positions)."""
    from embedpipe.workers.ingest.demo_data import QUERY_PHOTOS, load_photo

    photos = [load_photo(*name) for name in QUERY_PHOTOS]
    rng = np.random.default_rng([seed, INPUTS_VERSION])
    out = []
    for i in range(CROPS):
        photo = photos[i % len(photos)]
        x0, y0 = (int(rng.integers(0, s - 16)) for s in photo.size)
        buf = io.BytesIO()
        photo.crop((x0, y0, x0 + 16, y0 + 16)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _unique(jpeg: bytes, i: int) -> bytes:
    """``jpeg`` with a comment segment naming ``i`` after its start marker: a valid JPEG of its own."""
    text = f"embedpipe bench scale {i}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def input_shards(rows: int, seed: int = 0) -> str:
    """A brace pattern of tar shards holding ``rows`` tiny real JPEGs (``TAR_MEMBERS`` each), written
    once under the cache folder and reused (a marker file names what was written)."""
    n = -(-rows // TAR_MEMBERS)
    root = cache_dir() / "bench-scale" / f"inputs-{rows}"
    pattern = str(root / f"images-{{{0:05d}..{n - 1:05d}}}.tar")
    marker, wanted = root / ".ready", f"{INPUTS_VERSION} {rows} {seed}"
    if marker.is_file() and marker.read_text().strip() == wanted:
        return pattern
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log.info("bench scale: writing %d input images into %d tar shards under %s (once)", rows, n, root)
    crops = _crops(seed)
    for shard in range(n):
        path = root / f"images-{shard:05d}.tar"
        with tarfile.open(path.with_suffix(".tmp"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard * TAR_MEMBERS, min(rows, (shard + 1) * TAR_MEMBERS)):
                data = _unique(crops[i % CROPS], i)
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        os.replace(path.with_suffix(".tmp"), path)
    marker.write_text(wanted + "\n")
    return pattern


# memory: the driver sampled, Ray's workers found among the driver's descendants -------------------------


def _rss_mb(pid: int | str, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _is_ray_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return cmdline[0].startswith(b"ray::") or any(b"default_worker.py" in c for c in cmdline)


class MemorySampler:
    """A thread sampling this process's RSS (``SAMPLE_S``) and the peak RSS (VmHWM) of every Ray worker
    process descended from it (``WORKER_SAMPLE_S``); ``mark()`` starts a new stage's driver peak."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.driver_peak = 0.0
        self.stage_peak = 0.0
        self.worker_peak = 0.0
        self.workers_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        last_workers = 0.0
        while not self._stop.is_set():
            self._sample_driver()
            if time.monotonic() - last_workers >= WORKER_SAMPLE_S:
                self.sample_workers()
                last_workers = time.monotonic()
            self._stop.wait(SAMPLE_S)

    def _sample_driver(self) -> None:
        rss = _rss_mb(self.pid)
        self.driver_peak = max(self.driver_peak, rss)
        self.stage_peak = max(self.stage_peak, rss)

    def sample_workers(self) -> None:
        for pid in _descendants(self.pid):
            if _is_ray_worker(pid):
                self.workers_seen.add(pid)
                self.worker_peak = max(self.worker_peak, _rss_mb(pid, "VmHWM"))

    def mark(self) -> float:
        """The driver's peak since the last mark (this stage's), and a new stage begins."""
        self._sample_driver()
        peak, self.stage_peak = self.stage_peak, _rss_mb(self.pid)
        return peak

    def __enter__(self) -> MemorySampler:
        self._sample_driver()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# one size, in its own process ---------------------------------------------------------------------------


def scale_config(run: Path, images: str, rows: int, dim: int, factory: str) -> Any:
    """The run's config: Holidays, ``gem`` only, PCA-whitening, a sharded IVF-PQ searched on Ray, αQE and
    DBA, the top ``TOP_K`` ranked at every size, two distractor steps below the full set."""
    from embedpipe.storage.contracts.config import Config

    distractors = layout_rows(rows)[2]
    return Config.model_validate(
        {
            "images": images,
            "protocol": "holidays",
            "out": str(run),
            "seed": 0,
            "extract": {"descriptors": ["gem"], "shard_size": part_rows(rows)},
            "fit": {"whiten": True, "dim": whitened_dim(dim)},
            "index": {
                "factory": factory,
                "train_size": train_size_for(rows),
                "nprobe": nprobe_for(rows),
                "layout": "sharded",
                "engine": "ray",
            },
            "rerank": {"methods": ["aqe", "dba"], "dba_nprobe": DBA_NPROBE},
            "eval": {"top_k": TOP_K, "distractor_steps": [distractors // 4, distractors // 2]},
        }
    )


def main_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics row a size reports: gem, whitened, no re-ranking."""
    for row in metrics["results"]:
        if row["descriptor"] == "gem" and row["post"].startswith("pcaw") and row["rerank"] == "none":
            return row
    raise RunFailed("bench scale: no gem pcaw row without re-ranking in the metrics")


def dba_seconds(layout: Any) -> dict[str, dict[str, float]]:
    """{variant: {"parts", "index"}} seconds of each DBA computed where the database lies."""
    from embedpipe.workers.evaluate.dba_parts import DBA_DIR, read_state

    out = {}
    for root in sorted(layout.root.glob(f"index/*/{DBA_DIR}")):
        seconds = read_state(root).get("seconds")
        if seconds:
            out[root.parent.name] = {k: seconds[k] for k in ("parts", "index")}
    return out


def exact_map(layout: Any, cfg: Any, dim: int) -> float:
    """mAP of the ``gem`` ``l2`` row without re-ranking under exact search: the protocol's queries
    scored against every stored row (inner product, part by part in this process, the top ``TOP_K``
    kept, ties by position), with the run's ground truth and metric. What that row of ``metrics.json``
    would be without the index's approximation (quantisation, probed lists), so the two can be told
    apart."""
    import faiss

    from embedpipe.workers.evaluate.database import read_database
    from embedpipe.workers.evaluate.metrics import compute_map
    from embedpipe.workers.evaluate.search import StoreRows, merge_topk

    store = layout.feature_dir("gem")
    rows = StoreRows(store, None, dim)
    gt = read_database(layout, cfg, store).gt
    queries = rows.take(gt.queries)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(len(rows.parts)):
        x = rows.part(i)
        scores = queries @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
        k = min(TOP_K, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part = (np.take_along_axis(scores, top, axis=1), top + rows.starts[i])
        best = [merge_topk([*best, part], TOP_K, faiss.METRIC_INNER_PRODUCT)]
    return float(compute_map(best[0][1], gt.positives, gt.junk)["map"])


def one_size(rows: int, dim: int, factory: str, work: Path) -> dict[str, Any]:
    """Make one size's run directory and inputs, then time the stages under the memory sampler."""
    from embedpipe.storage.contracts.layout import RunLayout, write_json_atomic
    from embedpipe.workers.engines.ray_stages import ray_session
    from embedpipe.workers.evaluate.run import evaluate_run
    from embedpipe.workers.fit.stage import fit_models
    from embedpipe.workers.ingest.inputs import run_inputs
    from embedpipe.workers.report.html import write_report

    run = work / f"run-{rows}"
    shutil.rmtree(run, ignore_errors=True)
    layout = RunLayout(run)
    counts = write_collection(run, rows, dim)
    images = input_shards(rows)
    cfg = scale_config(run, images, rows, dim, factory)
    layout.update_manifest(config=cfg.model_dump(mode="json"))
    stages: dict[str, float] = {}
    stage_rss: dict[str, float] = {}
    with MemorySampler() as mem:
        start = time.perf_counter()
        plan = run_inputs(cfg).plan
        inputs = len(plan)
        del plan  # a run writes the plan to its dataset manifest and keeps no listing
        stages["plan"] = time.perf_counter() - start
        stage_rss["plan"] = mem.mark()
        with ray_session(cfg.ray):
            start = time.perf_counter()
            fit_models(cfg, layout)
            stages["fit"] = time.perf_counter() - start
            layout.mark_stage("fit", "bench", "done", seconds=round(stages["fit"], 3))
            stage_rss["fit"] = mem.mark()
            start = time.perf_counter()
            metrics = evaluate_run(cfg, layout, rows)
            write_json_atomic(layout.metrics, metrics)
            stages["index_evaluate"] = time.perf_counter() - start
            layout.mark_stage("evaluate", "bench", "done", seconds=round(stages["index_evaluate"], 3))
            stage_rss["index_evaluate"] = mem.mark()
            mem.sample_workers()  # the workers still alive, before the session ends
        start = time.perf_counter()
        write_report(layout, cfg)
        stages["report"] = time.perf_counter() - start
        stage_rss["report"] = mem.mark()
    row = main_row(metrics)
    start = time.perf_counter()
    exact = exact_map(layout, cfg, dim)  # after the clock and the memory sampler: not a stage
    log.info(
        "bench scale: exact-search mAP (gem l2, none) %.4f in %.1f s", exact, time.perf_counter() - start
    )
    store_bytes = sum(p.stat().st_size for p in layout.features.rglob("*") if p.is_file())
    return {
        "rows": rows,
        "inputs": inputs,
        "stages": {k: round(v, 3) for k, v in stages.items()},
        "driver_peak_rss_mb": round(mem.driver_peak, 1),
        "driver_peak_rss_by_stage_mb": {k: round(v, 1) for k, v in stage_rss.items()},
        "driver_max_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": round(mem.worker_peak, 1),
        "ray_workers_seen": len(mem.workers_seen),
        "store_mb": round(store_bytes / 2**20, 1),
        "map": row["map"],
        "map_row": f"{row['descriptor']} {row['post']} {row['rerank']}",
        "maps": {f"{r['post']} {r['rerank']}": r["map"] for r in metrics["results"]},
        # the same row as "l2 none" under exact search: how much of the mAP the index's approximation costs
        "exact_map_l2": exact,
        # each metrics row's own seconds: the variant's index build + plain search, then each re-ranking
        "row_seconds": {f"{r['post']} {r['rerank']}": r["time_s"] for r in metrics["results"]},
        "distractor_curve": metrics["distractor_curve"],
        "planted_queries": groups_for(rows),
        "distractors": counts["distractors"],
        "parts": counts["parts"],
        # per variant: the DBA part tasks' seconds and the DBA index's (training + fill), from its dba.json
        "dba_seconds": dba_seconds(layout),
    }


def _run_size(rows: int, dim: int, factory: str, work: Path) -> dict[str, Any]:
    args = ["--one", str(rows), str(dim), factory, str(work)]
    out = subprocess.run(
        [sys.executable, "-m", "embedpipe.flows.benchmarks.scale", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        tail = [s for s in out.stderr.strip().splitlines() if s.strip()][-3:]
        raise RunFailed(f"bench scale: size {rows} failed: {' | '.join(tail)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_scale(sizes: list[int], dim: int, work: Path) -> dict[str, Any]:
    started = time.gmtime()
    measured = []
    for rows in sizes:
        log.info("bench scale: %d rows", rows)
        measured.append(
            {
                **_run_size(rows, dim, factory_for(rows, dim), work),
                "factory": factory_for(rows, dim),
                "nprobe": nprobe_for(rows),
                "dba_nprobe": DBA_NPROBE,
            }
        )
    small, large = measured[0], measured[-1]

    def per_row(size: dict[str, Any]) -> float:
        return sum(size["stages"].values()) / size["rows"]

    return {
        "name": "scale",
        "dim": dim,
        "factory_rule": "IVF<nlist>,PQ<m> per size (sizes[].factory): nlist grows with the rows, "
        f"{ROWS_PER_LIST}+ rows per list; index.train_size max(100000, {TRAIN_PER_LIST} x nlist); queries "
        f"probe max({DBA_NPROBE}, nlist / {QUERY_PROBE_FRACTION}) lists (sizes[].nprobe), DBA's neighbour "
        f"search {DBA_NPROBE} (rerank.dba_nprobe)",
        "rerank": ["aqe", "dba"],
        "sizes": measured,
        "rss_ratio": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 4),
        "time_per_row_ratio": round(per_row(large) / per_row(small), 4),
        "targets": {"rss_ratio": 1.3, "time_per_row_ratio": 1.3},
        "ratio_note": "rss_ratio = driver peak RSS (sampled while the stages ran) at the largest size / at "
        "the smallest; time_per_row_ratio = seconds per row (sum of the stages) at the largest / at the "
        "smallest; each size in a fresh process, its feature store written before the clock (as if "
        "extracted), its input tar shards written once and cached",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", started),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    parser.add_argument(
        "--rows",
        type=parse_sizes,
        default=[200_000, 2_000_000],
        help="collection sizes, comma-separated (default 200000,2000000)",
    )
    parser.add_argument("--dim", type=int, default=256, help="descriptor dimension (default 256)")


def run(args: argparse.Namespace) -> int:
    if args.dim < 8 or args.dim % 8:
        raise InputError("--dim must be a multiple of 8")
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-scale-") as work:
        result = bench_scale(args.rows, args.dim, Path(work))
    write_result(result, args.json)
    log.info(
        "bench scale: rss_ratio %.3f, time_per_row_ratio %.3f",
        result["rss_ratio"],
        result["time_per_row_ratio"],
    )
    return 0


if __name__ == "__main__":  # one size in its own process (see ``_run_size``)
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        result = one_size(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        raise SystemExit("usage: python -m embedpipe.flows.benchmarks.scale --one ROWS DIM FACTORY WORK")
