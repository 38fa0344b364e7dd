"""Ray engine: session start-up and the extraction stages.

CNN extraction: a pool of model actors (``EmbedActor``, model loaded once in ``__init__``), started once
per stage and shared by every shard task of it (``ModelPool``), maps batches of pixels to descriptors;
Ray tasks read, hash, decode and downscale each input ahead of them (bad inputs become rows with an
``error``). On small CPU nodes the actors decode their own batches instead (see ``pool_size``). Batches
go through ``ray.util.ActorPool`` with a bounded number in flight and come back in input order; a
killed actor is restarted by Ray and its batches retried. Local features run on Ray Data CPU tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.storage.contracts.errors import DecodeError, RunFailed
from embedpipe.storage.dataset import RESULT_SCHEMA
from embedpipe.storage.inputs import InputRef
from embedpipe.workers.descriptors.local import extract_local, grayscale, hog_dim, hog_of
from embedpipe.workers.ingest.decode import content_id, decode_image, decode_query_crop
from embedpipe.workers.ingest.sources import PendingRead, read_inputs, read_rotations, rotation_of

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, ExtractConfig, IngestConfig, LocalConfig, RayConfig

log = logging.getLogger("embedpipe.ray")

# Loopback only, no usage reporting, no dashboard.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class NodeWork:
    """What each Ray node did in one session: stage -> node id -> rows (extract) or parts (index)."""

    stages: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, stage: str, nodes: Iterable[str]) -> None:
        self.stages.setdefault(stage, Counter()).update(n for n in nodes if n)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {stage: dict(sorted(c.items())) for stage, c in self.stages.items()}


_OPEN: list[NodeWork] = []  # the open ray_session's record (innermost last); empty outside a session


def record_work(stage: str, nodes: Iterable[str]) -> None:
    """Count work done on these node ids for ``stage`` in the open session (no-op outside one)."""
    if _OPEN:
        _OPEN[-1].add(stage, nodes)


def current_node() -> str:
    """The Ray node id this code runs on ('' outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def cluster_nodes() -> list[dict[str, Any]]:
    """The cluster's nodes: id, IP, CPUs, GPUs, alive (inside ``ray_session``)."""
    import ray

    return [
        {
            "node_id": n["NodeID"],
            "ip": n["NodeManagerAddress"],
            "cpus": float(n["Resources"].get("CPU", 0)),
            "gpus": float(n["Resources"].get("GPU", 0)),
            "alive": bool(n["Alive"]),
        }
        for n in sorted(ray.nodes(), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    ]


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[NodeWork]:
    """Connect to ``cfg.address`` or start a local single-node Ray on 127.0.0.1; shut down what we started.

    Yields the session's ``NodeWork``: the stages record on it which nodes ran their work."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        if _OPEN:
            yield _OPEN[-1]
            return
        _OPEN.append(NodeWork())
        try:
            yield _OPEN[-1]
        finally:
            _OPEN.pop()
        return
    temp_dir = None
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # A short temp dir: Ray's socket paths must stay under the OS limit of 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="ep-ray-", dir="/tmp")
        ray.init(
            num_cpus=cfg.num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    _OPEN.append(NodeWork())
    try:
        yield _OPEN[-1]
    finally:
        _OPEN.pop()
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@dataclass(frozen=True)
class Pool:
    actors: int
    threads: int  # torch threads per actor
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float  # per decode task; 0 when the actors decode themselves
    fused: bool  # decode inside the model actors instead of a separate stage
    calls: int = 1  # batches each actor runs at once: 2 when it decodes one while embedding the other


def pool_size(cfg: ExtractConfig, cpus: float, gpus: int = 0) -> Pool:
    """Model-actor pool for a cluster of ``cpus`` CPUs and ``gpus`` GPUs.

    One actor per GPU when there are GPUs (and ``extract.device`` is not cpu); on CPUs one per four CPUs
    unless ``extract.actors`` says otherwise.

    Decode is a separate stage when there are cores to spare for it (GPUs, or 4+ CPUs): the actors
    together never reserve the CPUs of one decode task, so the stages cannot wait on each other. On
    smaller CPU nodes a separate decode
    stage only steals cycles from the model's threads (and their barriers stall on the busy core), so
    each actor decodes its own batches (``extract.decode_in`` overrides), two at a time: it decodes the
    next batch on one thread while the forward of the current one runs on another (the decoders and
    torch release the GIL), so the cores the forward leaves idle decode."""
    on_gpu = gpus > 0 and cfg.device != "cpu"
    actors = cfg.actors or (gpus if on_gpu else max(1, int(cpus) // 4))
    fused = cfg.decode_in == "actor" or (cfg.decode_in == "auto" and not on_gpu and cpus < 4)
    if fused:
        return Pool(
            actors,
            cfg.torch_threads or max(1, round(cpus / actors)),
            cpus / actors,
            min(1.0, gpus / actors) if on_gpu else 0.0,
            0.0,
            True,
            2,
        )
    decode = 0.25 if cpus < 2 else 0.5 if cpus < 4 else 1.0
    actor_cpus = (cpus - decode) / actors
    if on_gpu:
        return Pool(
            actors, cfg.torch_threads or 2, min(1.0, actor_cpus), min(1.0, gpus / actors), decode, False
        )
    threads = cfg.torch_threads or max(1, int((cpus - decode) // actors))
    return Pool(actors, threads, actor_cpus, 0.0, decode, False)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_pool(cfg: ExtractConfig, nodes: Sequence[tuple[float, float]]) -> Pool:
    """The pool for a cluster of ``nodes`` ((CPUs, GPUs) of each alive node with CPUs).

    An actor must fit on one node, so on several nodes the pool is sized for the smallest node and
    repeated on each (``extract.actors`` overrides the total); one node is ``pool_size`` as it is."""
    if len(nodes) <= 1:
        cpus, gpus = nodes[0] if nodes else (1.0, 0.0)
        return pool_size(cfg, cpus, int(gpus))
    cpus = min(c for c, _ in nodes)
    gpus = min(g for _, g in nodes)
    per_node = pool_size(cfg.model_copy(update={"actors": 0}), cpus, int(gpus))
    return replace(per_node, actors=cfg.actors or per_node.actors * len(nodes))


def node_resources() -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each alive node that has CPUs (inside ``ray_session``)."""
    return [(n["cpus"], n["gpus"]) for n in cluster_nodes() if n["alive"] and n["cpus"] > 0]


def read_rows(batch: dict[str, np.ndarray], ingest: IngestConfig) -> list[Future | PendingRead]:
    """The reads of the rows of a batch of ``input_items``, in row order: each ``result()`` is the row's
    bytes or raises ``DecodeError``. The remote reads are all started at once on ``ingest.read_threads``
    threads (a slow or hostile URL holds only its own read); local files are read in turn, when their
    ``result()`` is asked for (``read_inputs``)."""
    rows = [
        (str(uri), int(offset), int(length))
        for uri, offset, length in zip(batch["uri"], batch["offset"], batch["length"], strict=True)
    ]
    return read_inputs(rows, ingest.timeout_s, ingest.retries, ingest.max_bytes, ingest.read_threads)


def row_rotation(batch: dict[str, np.ndarray], i: int) -> int:
    """Row ``i``'s orientation correction in degrees clockwise (the ``rotate`` of ``input_items``)."""
    return int(batch["rotate"][i]) if "rotate" in batch else 0


def decode_batch(batch: dict[str, np.ndarray], max_side: int, ingest: IngestConfig) -> dict[str, np.ndarray]:
    """Read, hash and decode each input (the remote reads of the batch at once, see ``read_rows``; decoded
    in row order). Bad inputs keep their row with ``error`` set, never raise."""
    n = len(batch["path"])
    ids, errors, pixels = [""] * n, [""] * n, [b""] * n
    h, w, width, height = (np.zeros(n, np.int32) for _ in range(4))
    sizes = np.full(n, -1, np.int64)
    reads = read_rows(batch, ingest)
    for i in range(n):
        try:
            data = reads[i].result()
            sizes[i] = len(data)
            ids[i] = content_id(data)
            exif = ingest.exif_orientation
            if "bbox" in batch:  # a query: the box crop at the scale of the database images
                box = tuple(batch["bbox"][i])
                array, (width[i], height[i]) = decode_query_crop(data, max_side, box, ingest.max_pixels, exif)
            else:
                rotate = row_rotation(batch, i)
                array, (width[i], height[i]) = decode_image(data, max_side, ingest.max_pixels, exif, rotate)
            h[i], w[i] = array.shape[:2]
            pixels[i] = array.tobytes()
        except DecodeError as err:
            errors[i] = str(err)
    return {
        "pos": batch["pos"],
        "path": batch["path"],
        "id": np.array(ids, dtype=object),
        "bytes": sizes,
        **({"bbox": batch["bbox"]} if "bbox" in batch else {}),
        "width": width,
        "height": height,
        "h": h,
        "w": w,
        "pixels": np.array(pixels, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def input_result(batch: dict[str, np.ndarray], j: int) -> dict[str, Any]:
    """What the dataset manifest records of row ``j`` of a decoded batch."""
    return {
        "id": batch["id"][j] or None,
        "bytes": int(batch["bytes"][j]) if batch["bytes"][j] >= 0 else None,
        "width": int(batch["width"][j]),
        "height": int(batch["height"][j]),
        "reason": batch["error"][j] or None,
    }


def batch_results(batch: dict[str, np.ndarray]) -> pa.RecordBatch:
    """``input_result`` of every row of a decoded batch at once: ``pos`` and the ``RESULT_SCHEMA``
    columns, as Arrow (no Python object per row)."""
    ids, errors = (np.asarray(batch[name], dtype=object) for name in ("id", "error"))
    sizes = np.asarray(batch["bytes"], np.int64)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.asarray(batch["pos"], np.int64)),
            pa.array(ids, pa.string(), mask=ids == ""),
            pa.array(sizes, pa.int64(), mask=sizes < 0),
            pa.array(np.asarray(batch["width"], np.int32)),
            pa.array(np.asarray(batch["height"], np.int32)),
            pa.array(errors, pa.string(), mask=errors == ""),
        ],
        schema=pa.schema([pa.field("pos", pa.int64()), *RESULT_SCHEMA]),
    )


def input_table(table: pa.Table, positions: np.ndarray, ingest: IngestConfig | None = None) -> pa.Table:
    """``input_items`` of the rows of ``table`` (``REF_SCHEMA`` columns, a shard plan's) at ``positions``,
    as one Arrow table whose ``pos`` is the row's position in ``table``: no Python object per input."""
    rows = table.take(pa.array(positions, pa.int64()))
    keys = rows.column("key")
    columns = {
        "pos": pa.array(positions, pa.int64()),
        "path": keys,
        "uri": pc.coalesce(pc.cast(rows.column("uri"), pa.string()), keys),
        "offset": rows.column("offset"),
        "length": rows.column("length"),
    }
    if ingest is not None and ingest.rotations:
        rotations = read_rotations(ingest.rotations)
        columns["rotate"] = pa.chunked_array(
            [
                pa.array([rotation_of(key, rotations) for key in chunk.to_pylist()], pa.int64())
                for chunk in keys.chunks
            ],
            pa.int64(),
        )
    return pa.table(columns)


def input_items(
    refs: Sequence[InputRef | str], boxes: Sequence | None = None, ingest: IngestConfig | None = None
) -> list[dict[str, Any]]:
    """Rows for inputs (plain strings are local paths or URLs); ``boxes``: query crops; ``ingest``: its
    ``rotations`` list gives each database input's correction (``rotate``, degrees clockwise)."""
    rotations = read_rotations(ingest.rotations) if ingest is not None and ingest.rotations else None
    items = []
    for pos, ref in enumerate(refs):
        if isinstance(ref, str):
            ref = InputRef(ref, ref)
        item = {"pos": pos, "path": ref.key, "uri": ref.uri, "offset": ref.offset, "length": ref.length}
        if boxes is not None:
            item["bbox"] = [float(v) for v in boxes[pos]]
        elif rotations is not None:
            item["rotate"] = rotation_of(ref.key, rotations)
        items.append(item)
    return items


class EmbedActor:
    """Model actor: loads the backbone once, maps a decoded batch to descriptor columns
    (or, with ``decode``, a batch of paths, decoding them first)."""

    def __init__(self, cfg: ExtractConfig, threads: int, ingest: IngestConfig | None = None):
        from embedpipe.workers.extract.embed import Embedder  # torch: imported by the processes that embed

        self.embedder = Embedder(cfg, threads)
        self.names = tuple(self.embedder.dims())  # with the fp32 references when computed
        self.max_side = cfg.max_side
        self.ingest = ingest  # decode in the actor when given
        self.forward_lock = threading.Lock()  # one forward at a time; decodes of other calls overlap it

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.ingest is not None:  # outside the lock: overlaps the forward of another call
            batch = decode_batch(batch, self.max_side, self.ingest)
        with self.forward_lock:
            return self._descriptors(batch)

    def _descriptors(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        out = {name: np.zeros((n, dim), np.float32) for name, dim in self.embedder.dims().items()}
        errors = batch["error"].copy()
        rows = [i for i in range(n) if not errors[i]]
        images = [
            np.frombuffer(batch["pixels"][i], np.uint8).reshape(int(batch["h"][i]), int(batch["w"][i]), 3)
            for i in rows
        ]
        for i, vectors in zip(rows, self._embed(images), strict=True):
            if isinstance(vectors, str):
                errors[i] = vectors
                continue
            for name in self.names:
                out[name][i] = vectors[name]
        keep = {k: batch[k] for k in ("pos", "path", "id", "bytes", "width", "height")}
        node = np.array([current_node()] * n, dtype=object)  # which node did the work (run manifest)
        return {**keep, "node": node, "error": errors, **{f"d_{name}": v for name, v in out.items()}}

    def _embed(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray] | str]:
        """Descriptors of each image, one ``shape_buckets`` group at a time; when a group's forward pass
        fails, that group's images again one by one, so that only an image the model cannot take (e.g.
        smaller than the network's strides) gets the error and no other group is computed twice."""
        from embedpipe.workers.extract.embed import (
            shape_buckets,  # torch: imported by the processes that embed
        )

        out: list[dict[str, np.ndarray] | str] = [""] * len(images)
        for group in shape_buckets([im.shape for im in images], self.embedder.forward_batch):
            try:
                vectors = self.embedder.embed_many([images[i] for i in group])
            except RuntimeError:
                vectors = [self._embed_one(images[i]) for i in group]
            for i, v in zip(group, vectors, strict=True):
                out[i] = v
        return out

    def _embed_one(self, image: np.ndarray) -> dict[str, np.ndarray] | str:
        try:
            return self.embedder(image)
        except RuntimeError as err:
            return f"model failed on image: {str(err).splitlines()[0]}"

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The actor method ``ModelPool`` calls."""
        return self(batch)


def configure_data_context(ray_cfg: RayConfig) -> None:
    """Ray Data as our stages need it: results in input order, our own progress lines, no hang."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = ray_cfg.progress_timeout_s
    ctx.wait_for_min_actors_s = int(ray_cfg.progress_timeout_s)


def _columns(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """A batch of ``input_items`` rows as numpy columns (what ``decode_batch`` reads)."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = np.array(values, dtype=object) if isinstance(values[0], str) else np.array(values)
    return out


class ModelPool:
    """Model actors started once (inside ``ray_session``) and shared by every shard of a stage.

    Plain Ray actors sized by ``pool_size`` from the cluster's resources, fed through
    ``ray.util.ActorPool`` with at most two batches per actor in flight; a dead actor is restarted and
    its batches retried (``ray.max_retries`` times). On several nodes the pool is sized for the smallest
    node and repeated on each (``cluster_pool``); each batch records the node that embedded it."""

    def __init__(self, config: Config):
        import ray
        from ray.util import ActorPool

        cfg = self.cfg = config.extract
        self.ingest, self.timeout = config.ingest, config.ray.progress_timeout_s
        nodes = node_resources()
        pool = self.spec = cluster_pool(cfg, nodes)
        log.info(
            "extract: %d model actor(s) x %d torch thread(s)%s on %d node(s), backbone %s",
            pool.actors,
            pool.threads,
            f", {pool.actor_gpus:g} GPU each" if pool.actor_gpus else "",
            len(nodes),
            cfg.backbone,
        )
        # an actor whose worker process dies (killed, out of memory, node lost) is restarted and its
        # batch retried, a bounded number of times: an input that kills every worker fails the stage
        retries = config.ray.max_retries
        actor = ray.remote(EmbedActor).options(
            num_cpus=pool.actor_cpus,
            num_gpus=pool.actor_gpus or None,
            max_restarts=retries,
            max_task_retries=retries,
            max_concurrency=pool.calls,
        )
        ingest = config.ingest if pool.fused else None
        self.actors = [actor.remote(cfg, pool.threads, ingest) for _ in range(pool.actors)]
        self.decode = (
            None
            if pool.fused
            else ray.remote(decode_batch).options(num_cpus=pool.decode_cpus, max_retries=retries)
        )
        self.pool = ActorPool(self.actors * pool.calls)  # an actor listed n times runs n calls at once

    def stream(
        self, refs: Sequence[InputRef | str], boxes: Sequence | None = None
    ) -> Iterator[dict[str, Any]]:
        """Result batches in input order: ``pos, path, id, bytes, width, height, error, d_<descriptor>``."""
        import ray

        items = input_items(refs, boxes, self.ingest)
        size = self.cfg.batch_size
        window, pending = 2 * len(self.actors), 0
        try:
            for start in range(0, len(items), size):
                batch: Any = _columns(items[start : start + size])
                if self.decode is not None:
                    batch = self.decode.remote(batch, self.cfg.max_side, self.ingest)
                if pending >= window:
                    yield self._next()
                    pending -= 1
                self.pool.submit(lambda actor, b: actor.embed.remote(b), batch)
                pending += 1
            while pending:
                yield self._next()
                pending -= 1
        except TimeoutError as err:
            raise RunFailed(
                f"extraction made no progress for {self.timeout:g}s (ray.progress_timeout_s)"
            ) from err
        except ray.exceptions.RayError as err:  # an actor that cannot start, a worker lost for good, ...
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise RunFailed(
                f"extraction failed on the Ray cluster: {lines[-1] if lines else type(err).__name__}"
            ) from err

    def _next(self) -> dict[str, Any]:
        batch = self.pool.get_next(timeout=self.timeout)
        record_work("extract", batch["node"])
        return batch

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@contextlib.contextmanager
def model_pool(config: Config) -> Iterator[ModelPool]:
    pool = ModelPool(config)
    try:
        yield pool
    finally:
        pool.close()


def stream_descriptors(
    refs: Sequence[InputRef | str], config: Config, boxes: Sequence | None = None
) -> Iterator[dict[str, Any]]:
    """``ModelPool.stream`` on a pool of its own (inside ``ray_session``)."""
    with model_pool(config) as pool:
        yield from pool.stream(refs, boxes)


def local_batch(
    batch: dict[str, np.ndarray], cfg: LocalConfig, ingest: IngestConfig, stored: tuple[str, ...], hog: bool
) -> dict[str, np.ndarray]:
    """Ray Data CPU stage: decode (through ``decode_batch``, longer side ``cfg.max_side``), then each
    stored local feature (``kp_<f>``: (n, 4) float32 bytes, ``desc_<f>``: (n, dim) uint8 bytes) and,
    with ``hog``, the HOG vector ``d_hog`` (rows, ``hog_dim(cfg)``). One OpenCV thread: Ray runs one task
    per CPU."""
    import cv2

    cv2.setNumThreads(1)
    batch = decode_batch(batch, cfg.max_side, ingest)
    n = len(batch["path"])
    out = {k: batch[k] for k in ("pos", "path", "id", "bytes", "width", "height", "error")}
    out["node"] = np.array([current_node()] * n, dtype=object)
    for f in stored:
        out[f"kp_{f}"] = np.array([b""] * n, dtype=object)
        out[f"desc_{f}"] = np.array([b""] * n, dtype=object)
    if hog:
        out["d_hog"] = np.zeros((n, hog_dim(cfg)), np.float32)
    for i in range(n):
        if batch["error"][i]:
            continue
        image = np.frombuffer(batch["pixels"][i], np.uint8).reshape(int(batch["h"][i]), int(batch["w"][i]), 3)
        gray = grayscale(image)
        for f in stored:
            feats = extract_local(gray, f, cfg.max_keypoints)
            out[f"kp_{f}"][i] = feats.keypoints.tobytes()
            out[f"desc_{f}"][i] = feats.descriptors.tobytes()
        if hog:
            out["d_hog"][i] = hog_of(image, cfg)
    return out


def stream_local(
    refs: Sequence[InputRef | str], config: Config, stored: tuple[str, ...], hog: bool
) -> Iterator[dict[str, Any]]:
    """Yield ``local_batch`` results in input order, one CPU task per batch (inside ``ray_session``)."""
    import ray.data

    configure_data_context(config.ray)
    log.info("extract: local features %s%s on %d CPU(s)", ", ".join(stored), " + HOG" * hog, cluster_cpus())
    items = input_items(refs, ingest=config.ingest)
    batch_size = config.extract.batch_size
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // batch_size))))
    ds = ds.map_batches(
        local_batch,
        fn_kwargs={"cfg": config.local, "ingest": config.ingest, "stored": stored, "hog": hog},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        max_retries=config.ray.max_retries,
    )
    yield from iterate_results(ds, "local-feature extraction")


def iterate_results(ds, what: str, stage: str = "extract") -> Iterator[dict[str, Any]]:
    """The batches of a Ray dataset in order; a Ray failure becomes one ``RunFailed`` line. Rows that
    carry a ``node`` column are counted for ``stage`` on the session's ``NodeWork``."""
    import ray

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            if "node" in batch:
                record_work(stage, batch["node"])
            yield batch
    except ray.exceptions.RayError as err:  # an actor that cannot start, a worker lost for good, ...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise RunFailed(
            f"{what} failed on the Ray cluster: {lines[-1] if lines else type(err).__name__}"
        ) from err


class SharedModels:
    """A stage's ``ModelPool``, started on first use and shared by its shard tasks; ``close`` frees its
    CPUs/GPUs (before other Ray work of the stage, such as local features, and at the end)."""

    def __init__(self, config: Config):
        self.config, self.pool = config, None

    def get(self) -> ModelPool:
        if self.pool is None:
            self.pool = ModelPool(self.config)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
