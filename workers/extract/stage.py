"""The extraction stage, shard by shard: inputs -> model actors / local-feature tasks on Ray -> one
Parquet part per store (written whole, then renamed) -> the shard's record; then the stores' manifests,
the dataset manifest entries and the quarantine rows from the records."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.storage.contracts.errors import RunFailed
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.dataset import (
    RESULT_SCHEMA,
    ShardPlan,
    duplicates,
    results_batch,
    write_plan_manifest,
    write_tar_stamps,
)
from embedpipe.storage.features import (
    FeatureWriter,
    feature_schema,
    feature_table,
    find_part,
    finish_store,
    read_part,
    write_part_table,
)
from embedpipe.storage.inputs import InputRef, SpillFile
from embedpipe.storage.local_features import local_schema, local_table
from embedpipe.storage.quarantine import write_quarantine
from embedpipe.storage.shards import ShardRecords, input_signature, shard_fingerprint
from embedpipe.workers.descriptors.backbones import check_backbone, weights_digest
from embedpipe.workers.descriptors.local import (
    STORED_DIM,
    hog_dim,
    is_classical,
    local_store,
    stored_features,
)
from embedpipe.workers.engines.ray_stages import (
    SharedModels,
    cluster_pool,
    input_result,
    node_resources,
    stream_descriptors,
    stream_local,
)
from embedpipe.workers.evaluate.protocols import BENCHMARK_PROTOCOLS
from embedpipe.workers.extract.reference import fp32_reference, reference_name, reference_stores
from embedpipe.workers.extract.runtimes import prepare_runtime
from embedpipe.workers.ingest.sources import read_rotations
from embedpipe.workers.progress import Progress

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.extract")


@dataclass(frozen=True)
class ExtractResult:
    n_inputs: int
    n_ok: int
    quarantined: list[dict[str, str | None]]
    seconds: float
    summary: str
    results: SpillFile  # per shard of the plan, in order, its inputs' RESULT_SCHEMA rows (id, bytes, ...)


@dataclass(frozen=True)
class StoreSpec:
    """One feature store the extraction writes: ``vector`` rows (one vector per image) or ``local``
    rows (keypoints and descriptors per image); ``dim`` is None when only the model knows it."""

    name: str
    kind: str
    meta: dict[str, Any]
    dim: int | None

    @property
    def stage(self) -> str:
        """The pass that computes it: ``cnn`` (the model actors) or ``local`` (OpenCV/HOG Ray tasks)."""
        return "cnn" if self.dim is None else "local"


def store_specs(cfg: Config) -> list[StoreSpec]:
    """The stores ``cfg.extract.descriptors`` need: CNN descriptors (and their fp32 references, see
    ``reference``), local features, HOG."""
    ecfg, lcfg = cfg.extract, cfg.local
    specs = [
        StoreSpec(
            name,
            "vector",
            {
                "descriptor": name,
                "backbone": ecfg.backbone,
                "max_side": ecfg.max_side,
                "gem_p": ecfg.gem_p if name == "gem" else None,
            },
            None,
        )
        for name in ecfg.descriptors
        if not is_classical(name)
    ]
    meta = {spec.name: spec.meta for spec in specs}
    specs += [
        StoreSpec(ref, "vector", {**meta[name], "descriptor": ref, "precision": "fp32"}, None)
        for name, ref in reference_stores(cfg)
    ]
    for f in stored_features(ecfg.descriptors):
        meta = {
            "descriptor": local_store(f),
            "backbone": f"opencv-{f}",
            "max_side": lcfg.max_side,
            "max_keypoints": lcfg.max_keypoints,
        }
        specs.append(StoreSpec(local_store(f), "local", meta, STORED_DIM[f]))
    if "hog" in ecfg.descriptors:
        meta = {
            "descriptor": "hog",
            "backbone": "skimage-hog",
            "max_side": lcfg.max_side,
            "hog_size": lcfg.hog_size,
        }
        if lcfg.hog_layout != "grid":  # the grid layout's stores stay as they were
            meta.update(
                hog_layout=lcfg.hog_layout,
                hog_cell=lcfg.hog_cell,
                hog_block=lcfg.hog_block,
                hog_bins=lcfg.hog_bins,
            )
        specs.append(StoreSpec("hog", "vector", meta, hog_dim(lcfg)))
    return specs


def store_schema(spec: StoreSpec, dim: int) -> pa.Schema:
    meta = {"embedpipe": json.dumps(spec.meta, sort_keys=True)}
    return local_schema(dim, meta) if spec.kind == "local" else feature_schema(dim, meta)


def config_fingerprint(cfg: Config) -> str:
    """What the extracted rows depend on besides the inputs: the config, the backbone's weights and the
    orientation-correction list."""
    digest = weights_digest(cfg.extract.backbone, cfg.extract.weights)
    if cfg.ingest.rotations:
        rotations = sorted(read_rotations(cfg.ingest.rotations).items())
        digest += hashlib.sha256(json.dumps(rotations).encode()).hexdigest()[:16]
    reference = "-fp32ref" if fp32_reference(cfg) else ""  # ``auto`` also depends on the protocol
    return cfg.fingerprint("extract", "local", "ingest") + (f"-{digest}" if digest else "") + reference


def pending_shards(plan: ShardPlan, cfg: Config, layout: RunLayout) -> list[int]:
    """The shards of ``plan`` not extracted yet from exactly these inputs with this config and weights,
    parts in place (their inputs: ``plan.refs_of``, read a shard at a time). The config fingerprint
    (which hashes the weight files) is computed once for all shards."""
    records = ShardRecords(layout.shard_records("extract"))
    cfg_fp, specs = config_fingerprint(cfg), store_specs(cfg)

    def done(shard: int) -> bool:
        record = records.read(shard)
        return (
            record is not None
            and record.get("fingerprint") == shard_fingerprint(cfg_fp, plan.shard_rows(shard))
            and all(find_part(layout.feature_dir(s.name), shard) is not None for s in specs)
        )

    return [s for s in plan.shard_numbers() if not done(s)]


def _passes(cfg: Config) -> list[str]:
    stages = {s.stage for s in store_specs(cfg)}
    return [p for p in ("local", "cnn") if p in stages]


def _reusable(
    old: dict[str, Any] | None,
    refs: tuple[InputRef, ...],
    cfg_fp: str,
    specs: list[StoreSpec],
    layout: RunLayout,
    shard: int,
) -> set[str]:
    """Keys of this shard whose rows of an earlier extraction (same config, unchanged input) are kept."""
    if old is None or old.get("config") != cfg_fp:
        return set()
    if any(find_part(layout.feature_dir(s.name), shard) is None for s in specs):
        return set()
    before = old.get("inputs", {})
    return {r.key for r in refs if r.key in before and before[r.key].get("sig") == input_signature(r)}


def extract_shard(
    refs: tuple[InputRef, ...],
    shard: int,
    n_shards: int,
    cfg: Config,
    layout: RunLayout,
    models: SharedModels,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Extract one shard (inside a Ray session): each store's part written whole under a temporary name
    and renamed, then the shard's record. Rows of inputs unchanged since the shard's last extraction with
    the same config are kept rather than recomputed (a collection that lost or changed a few files)."""
    specs = store_specs(cfg)
    cfg_fp = config_fingerprint(cfg)
    records = ShardRecords(layout.shard_records("extract"))
    old = records.read(shard)
    keep = _reusable(old, refs, cfg_fp, specs, layout, shard)
    todo = tuple(r for r in refs if r.key not in keep)
    tables: dict[str, list[pa.Table]] = {s.name: [] for s in specs}
    dims = {s.name: s.dim for s in specs}
    inputs: dict[str, dict[str, Any]] = {}
    passes = _passes(cfg) if todo else []
    for kind in passes:
        if kind == "local":
            models.close()  # its CPUs go to the local-feature tasks
        stream = models.get().stream(todo) if kind == "cnn" else _stream_local(todo, cfg)
        for batch in stream:
            _add_batch(batch, kind, specs, tables, dims, inputs)
            if progress is not None and kind == passes[-1]:
                progress.update(len(batch["pos"]))
    if keep:
        assert old is not None
        for spec in specs:
            dims[spec.name] = dims[spec.name] or old["stores"][spec.name]["dim"]
            part = read_part(find_part(layout.feature_dir(spec.name), shard))
            tables[spec.name].append(
                part.filter(pc.is_in(part.column("path"), pa.array(sorted(keep), pa.string())))
            )
        inputs.update({k: old["inputs"][k] for k in keep})
    position = {r.key: i for i, r in enumerate(refs)}
    stores: dict[str, dict[str, Any]] = {}
    for spec in specs:
        dim = dims[spec.name]
        if dim is None:  # nothing of this shard reached the model
            continue
        schema = store_schema(spec, dim)
        table = (
            pa.concat_tables([t.cast(schema) for t in tables[spec.name]])
            if tables[spec.name]
            else schema.empty_table()
        )
        order = np.argsort([position[k] for k in table.column("path").to_pylist()], kind="stable")
        table = table.take(pa.array(order, pa.int64()))
        write_part_table(layout.feature_dir(spec.name), shard, n_shards, table)
        info: dict[str, Any] = {"dim": dim, "rows": table.num_rows}
        if spec.kind == "local":
            info["keypoints"] = int(pc.sum(pc.list_value_length(table.column("x"))).as_py() or 0)
        stores[spec.name] = info
    for ref in refs:
        inputs[ref.key]["sig"] = input_signature(ref)
    record = {
        "shard": shard,
        "config": cfg_fp,
        "fingerprint": shard_fingerprint(cfg_fp, refs),
        "inputs": {r.key: inputs[r.key] for r in refs},
        "stores": stores,
        "reused": len(keep),
    }
    records.write(shard, record)
    return record


def cnn_config(cfg: Config) -> Config:
    """``cfg`` with only the CNN descriptors (what the model actors compute), its
    ``extract.fp32_reference`` resolved (``reference_config``)."""
    cnn = tuple(d for d in cfg.extract.descriptors if not is_classical(d))
    cfg = reference_config(cfg)
    return cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"descriptors": cnn})})


def reference_config(cfg: Config) -> Config:
    """``cfg`` whose ``extract.fp32_reference`` is what ``reference.fp32_reference`` resolves (true or
    false, never auto): what the model actors read to compute the fp32 references or not."""
    ecfg = cfg.extract.model_copy(update={"fp32_reference": fp32_reference(cfg)})
    return cfg.model_copy(update={"extract": ecfg})


def with_run_models(cfg: Config) -> Config:
    """``cfg`` whose model actors keep their exported models and runtime decision in the run's
    ``models/`` folder (``ExtractConfig.with_models_dir``; not part of any fingerprint)."""
    return cfg.model_copy(update={"extract": cfg.extract.with_models_dir(RunLayout(cfg.out).root / "models")})


def stage_models(cfg: Config) -> SharedModels:
    """The model actors of an extraction stage (started on first use; ``close`` them at its end). The
    extract runtime is resolved here first (measured on first use; see ``runtimes.prepare_runtime``),
    so that the actors read the run's decision and the log shows it."""
    ecfg = cnn_config(cfg).extract
    config = with_run_models(cnn_config(cfg))
    if ecfg.descriptors:
        check_backbone(ecfg.backbone, ecfg.weights, ecfg.descriptors)
        prepare_runtime(config.extract, cluster_pool(config.extract, node_resources()).threads)
    models = SharedModels(config)
    if _passes(cfg) == ["cnn"]:  # no local pass to give the CPUs to first: the actors load the model
        models.get()  # while the shard tasks are set up
    return models


def _stream_local(refs: tuple[InputRef, ...], cfg: Config) -> Iterator[dict]:
    return stream_local(refs, cfg, stored_features(cfg.extract.descriptors), "hog" in cfg.extract.descriptors)


def _add_batch(
    batch: dict,
    kind: str,
    specs: list[StoreSpec],
    tables: dict[str, list[pa.Table]],
    dims: dict[str, int | None],
    inputs: dict[str, dict[str, Any]],
) -> None:
    """Record each row's manifest entry (the first pass's reason wins) and append the good rows to the
    tables of this pass's stores."""
    for j, key in enumerate(batch["path"]):
        res = input_result(batch, j)
        seen = inputs.get(str(key))
        if seen is None or (res["reason"] and not seen["reason"]):
            if res["reason"]:
                log.warning("quarantined %s: %s", key, res["reason"])
            inputs[str(key)] = res if seen is None or not seen["reason"] else seen
    sel = (batch["error"] == "").nonzero()[0]
    head = (batch["id"][sel], batch["path"][sel], batch["width"][sel], batch["height"][sel])
    for spec in specs:
        if spec.stage != kind:
            continue
        if spec.kind == "local":
            f = spec.name.removeprefix("local-")
            dim = STORED_DIM[f]
            kps = [np.frombuffer(batch[f"kp_{f}"][i], np.float32).reshape(-1, 4) for i in sel]
            descs = [np.frombuffer(batch[f"desc_{f}"][i], np.uint8).reshape(-1, dim) for i in sel]
            tables[spec.name].append(local_table(store_schema(spec, dim), *head, kps, descs))
        else:
            vectors = batch[f"d_{spec.name}"]
            dims[spec.name] = int(vectors.shape[1])
            tables[spec.name].append(feature_table(store_schema(spec, vectors.shape[1]), *head, vectors[sel]))


def finish_extract(plan: ShardPlan, cfg: Config, layout: RunLayout, progress: Progress) -> ExtractResult:
    """After every shard is done: complete each store (parts named for the current shard count, parts of
    shards gone removed, manifests), drop records of shards gone, and gather the dataset manifest entries
    and quarantine rows from the shard records."""
    records = ShardRecords(layout.shard_records("extract"))
    missing, stores, kept = [], {}, 0
    results, quarantined = SpillFile(RESULT_SCHEMA, "results"), []
    numbers = plan.shard_numbers()
    for shard in numbers:  # plan order; the Python objects of one shard at a time
        record = records.read(shard)
        if record is None:
            missing.append(shard)
            continue
        for name, info in record["stores"].items():
            stores.setdefault(name, []).append(info)
        kept += record.get("reused", 0)
        keys = plan.shard_rows(shard).keys().to_pylist()
        found = [record["inputs"][key] for key in keys]
        results.write(results_batch(found))
        quarantined += [
            {"path": key, "id": res["id"], "stage": "extract", "reason": res["reason"]}
            for key, res in zip(keys, found, strict=True)
            if res["reason"]
        ]
    if missing:
        raise RunFailed(f"extract: shard(s) {missing[:5]} have no record; re-run to finish them")
    for spec in store_specs(cfg):
        infos = stores.get(spec.name, [])
        dim = spec.dim or (infos[0]["dim"] if infos else None)
        if dim is None:
            continue
        meta = {**spec.meta, "dim": dim}
        if spec.kind == "local":
            meta["keypoints"] = sum(i["keypoints"] for i in infos)
        finish_store(layout.feature_dir(spec.name), plan.n_shards, store_schema(spec, dim), meta)
    wanted = {spec.name for spec in store_specs(cfg)}
    for name in cfg.extract.descriptors:  # fp32 references of an earlier config of the run
        if reference_name(name) not in wanted:
            shutil.rmtree(layout.feature_dir(reference_name(name)), ignore_errors=True)
    records.prune(set(numbers))
    results.close()
    n_ok = len(plan) - len(quarantined)
    ok_ids = (pc.if_else(pc.is_null(b.column("reason")), b.column("id"), None) for b in results.batches())
    n_dup = len(duplicates(ok_ids)[0])
    summary = progress.finish(
        f"{n_ok} ok, {len(quarantined)} quarantined"
        + (f", {n_dup} exact duplicate(s)" if n_dup else "")
        + (f", {len(plan) - progress.done} up to date" if progress.done < len(plan) else "")
        + (f" ({kept} kept from changed shards)" if kept else "")
    )
    return ExtractResult(len(plan), n_ok, quarantined, progress.elapsed, summary, results)


def record_extract(plan: ShardPlan, cfg: Config, layout: RunLayout, result: ExtractResult) -> None:
    """The run's records of a finished extraction: the dataset manifest, the tar shards' stamps (not for
    benchmark layouts, whose listing is always read), and the quarantine (inputs rejected at listing
    included). No usable image at all fails the run."""
    write_plan_manifest(layout.dataset, plan, result.results)
    write_tar_stamps(layout.tar_stamps, plan, whole=cfg.protocol not in BENCHMARK_PROTOCOLS)
    listed = [{"path": k, "id": None, "stage": "ingest", "reason": r} for k, r in plan.problems]
    write_quarantine(layout.quarantine, result.quarantined + listed)
    if result.n_ok == 0:
        raise RunFailed(f"no usable image among {result.n_inputs} inputs (reasons in {layout.quarantine})")


def extract_all(plan: ShardPlan, cfg: Config, layout: RunLayout) -> ExtractResult:
    """Every shard of ``plan`` not yet up to date, one after the other, then ``finish_extract`` (inside a
    Ray session; the pipeline flow runs the same shards as Prefect tasks)."""
    todo = pending_shards(plan, cfg, layout)
    sizes = plan.shard_sizes()
    progress = Progress("extract", sum(sizes[s] for s in todo), log)
    models = stage_models(cfg)
    try:
        for shard in todo:
            extract_shard(plan.refs_of(shard), shard, plan.n_shards, cfg, layout, models, progress)
    finally:
        models.close()
    return finish_extract(plan, cfg, layout, progress)


def extract_queries(refs: tuple[InputRef, ...], boxes: tuple, cfg: Config, layout: RunLayout) -> str:
    """Descriptors of the box-cropped queries of an Oxford/Paris protocol, in query order, into
    ``RUN/queries/<descriptor>`` (inside a Ray session). A query that cannot be read fails the stage:
    the protocol is not defined without it."""
    ecfg = cfg.extract
    progress = Progress("extract queries", len(refs), log)
    writers: dict[str, FeatureWriter] = {}
    names = [*ecfg.descriptors, *(ref for _, ref in reference_stores(cfg))]
    for name in [*ecfg.descriptors, *(reference_name(d) for d in ecfg.descriptors)]:
        shutil.rmtree(layout.query_dir(name), ignore_errors=True)
    for batch in stream_descriptors(refs, with_run_models(reference_config(cfg)), boxes):
        bad = (batch["error"] != "").nonzero()[0]
        if bad.size:
            i = int(bad[0])
            raise RunFailed(f"query image {batch['path'][i]} cannot be used: {batch['error'][i]}")
        for name in names:
            vectors = batch[f"d_{name}"]
            if name not in writers:
                meta = {
                    "descriptor": name,
                    "backbone": ecfg.backbone,
                    "max_side": ecfg.max_side,
                    "queries": True,
                }
                writers[name] = FeatureWriter(layout.query_dir(name), vectors.shape[1], 1, meta)
            writers[name].write(0, batch["id"], batch["path"], batch["width"], batch["height"], vectors)
        progress.update(len(batch["pos"]))
    for w in writers.values():
        w.close()
    return progress.finish()
