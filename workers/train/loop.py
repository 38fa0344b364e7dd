"""Data-parallel fine-tuning of a retrieval network (``embedpipe finetune``) on Ray Train.

``run_finetune`` lists the training images, starts Ray, and runs ``train_loop`` on a ``TorchTrainer``
of N workers (gloo on CPU, NCCL on GPUs; ``workers/engines/ray_train.py`` binds Ray Train). Every epoch
each worker embeds its share of the images with the current model, the shares are gathered, tuples are
mined from them (``workers/train/finetune.py``), and the tuples of each step are split over the workers;
gradients are summed across workers before each Adam step, so N workers take the same steps as one worker
would on the same tuples. After every epoch rank 0 writes a checkpoint (model, optimiser, epoch, loss log)
that Ray Train stores under ``FT_DIR/ray-train``; a re-run with the same ``FT_DIR`` resumes from the
newest one. The final model is written as ``FT_DIR/backbone.pt`` + ``backbone.json`` (an
``extract.backbone`` for ``embedpipe run``; files of ``storage/finetune.py``), with the learned whitening
of its GeM vectors from the training pairs (``whitening-gem.npz``).

With ``finetune.validation`` rank 0 measures the validation mAP of the base model before training (epoch
0) and of the model after every epoch (``workers/train/validate.py``); the checkpoint keeps the curve and
the best epoch's weights, training stops after ``finetune.patience`` epochs without a better one, and the
folder keeps the best epoch, or the base model (``"adapted": false``) when none beat it. Training keeps
what the base knew with L2-SP towards the base weights (``finetune.l2sp``), frozen leading stages
(``finetune.freeze``) and a warmed-up, decaying learning rate (``finetune.warmup_steps``, ``schedule``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.storage.finetune import (
    BACKBONE_JSON,
    last_tuple_pairs,
    save_backbone_weights,
    write_backbone_info,
    write_train_log,
    write_tuples,
)
from embedpipe.storage.inputs import InputRef
from embedpipe.workers.descriptors.backbones import load_backbone
from embedpipe.workers.ingest.decode import decode_image
from embedpipe.workers.ingest.sources import list_inputs, read_input
from embedpipe.workers.train.finetune import (
    NEAR_COPY_PX,
    GeM,
    RetrievalNet,
    components,
    descriptor_matches,
    freeze_batchnorm,
    freeze_stages,
    groups_of,
    is_near_copy,
    knn_pairs,
    l2sp_penalty,
    lr_factor,
    mine_tuples,
    to_input,
    tuple_loss,
    tuples_table,
)

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config, FinetuneConfig
    from embedpipe.workers.engines.ray_train import TrainContext

log = logging.getLogger("embedpipe.train")

STATE_FILE = "train_state.pt"
RUN_NAME = "ray-train"
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FinetuneResult:
    ft_dir: Path
    epochs: int
    resumed_from: int  # epochs already done when this run started
    losses: list[float]  # mean loss per epoch
    workers: int
    seconds: float
    validation: list[dict]  # [{"epoch", "map", "l2", "pcaw"}], epoch 0 the base model; [] without
    best_epoch: int | None  # with validation, the epoch kept (0: the base model); None without


# ----------------------------------------------------------------------------------------- data, model


def load_images(refs: list[InputRef], max_side: int, cfg: Config) -> list[np.ndarray]:
    """Every training image decoded to (H, W, 3) uint8, longer side ``max_side``. A bad image is an error:
    training tuples must not silently change."""
    images = []
    for ref in refs:
        data = read_input(
            ref.uri, ref.offset, ref.length, cfg.ingest.timeout_s, cfg.ingest.retries, cfg.ingest.max_bytes
        )
        images.append(decode_image(data, max_side, cfg.ingest.max_pixels)[0])
    return images


def build_model(cfg: Config) -> tuple[RetrievalNet, Any]:
    """The network to train, its first ``finetune.freeze`` trunk stages frozen."""
    trunk, spec = load_backbone(cfg.extract.backbone, cfg.extract.weights)
    model = RetrievalNet(trunk, cfg.finetune.head, cfg.finetune.gem_p)
    freeze_stages(model.trunk, cfg.finetune.freeze)
    return model, spec


def optimiser(model: RetrievalNet, f: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam over the trainable weights; the pooling exponent learns 10x faster, without weight decay (as
    the reference code). Each group keeps its ``initial_lr``, which ``set_lr`` scales."""
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    groups = [{"params": trunk, "lr": f.lr, "initial_lr": f.lr, "weight_decay": f.weight_decay}]
    pool = list(model.pool.parameters())
    if pool:
        groups.append({"params": pool, "lr": 10 * f.lr, "initial_lr": 10 * f.lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups)


def set_lr(opt: torch.optim.Optimizer, step: int, epoch: int, f: FinetuneConfig) -> float:
    """Set every group's learning rate for optimiser step ``step`` of ``epoch`` (both 0-based,
    ``lr_factor``); returns the trunk's."""
    factor = lr_factor(step, epoch, f.epochs, f.warmup_steps, f.schedule, f.lr_decay)
    for group in opt.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
    return float(opt.param_groups[0]["lr"])


def start_weights(model: RetrievalNet) -> dict[str, torch.Tensor]:
    """The trainable trunk weights as they are now (w0 of L2-SP), detached copies."""
    return {n: p.detach().clone() for n, p in model.trunk.named_parameters() if p.requires_grad}


def embed_images(model: RetrievalNet, images: list[np.ndarray], spec, device: str) -> np.ndarray:
    """(n, D) float32 unit vectors, one image at a time at its own size."""
    model.eval()
    with torch.no_grad():
        out = [model(to_input(im, spec.mean, spec.std).to(device))[0].float().cpu().numpy() for im in images]
    return np.stack(out).astype(np.float32)


def train_autocast(device: str, precision: str):
    import contextlib

    if device != "cuda":
        return contextlib.nullcontext()
    dtype = AUTOCAST.get("bf16" if precision == "auto" else precision)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_step(
    model: RetrievalNet,
    opt: torch.optim.Optimizer,
    batch: list[list[np.ndarray]],
    n_total: int,
    f: FinetuneConfig,
    spec,
    device: str,
    allreduce=None,
    start: dict[str, torch.Tensor] | None = None,
    share: float = 1.0,
) -> float:
    """One optimiser step on this worker's tuples ``batch`` (each a list of images: query, positive,
    negatives) out of ``n_total`` tuples in the step over all workers. The loss is the mean over the
    ``n_total`` tuples; ``allreduce`` sums gradients and the loss across workers. With ``start`` (the base
    weights, ``start_weights``) and ``finetune.l2sp`` the L2-SP term is added, ``share`` of it on this
    worker (1/N of N workers, so the summed gradient holds it once). Returns the step's tuple loss."""
    model.train()
    freeze_batchnorm(model)
    opt.zero_grad(set_to_none=False)
    total = torch.zeros(1, dtype=torch.float64)
    for images in batch:
        with train_autocast(device, f.precision):
            vecs = torch.cat([model(to_input(im, spec.mean, spec.std).to(device)) for im in images])
        loss = tuple_loss(f.loss, vecs.float(), f.margin) / n_total
        loss.backward()
        total += loss.detach().double().cpu()
    if start is not None and f.l2sp > 0:
        trainable = {n: p for n, p in model.trunk.named_parameters() if p.requires_grad}
        (l2sp_penalty(trainable, start, f.l2sp) * share).backward()
    if allreduce is not None:
        allreduce(model, total)
    opt.step()
    return float(total)


def steps_of(n_tuples: int, per_step: int) -> list[range]:
    """Tuple index ranges of consecutive steps."""
    return [range(s, min(s + per_step, n_tuples)) for s in range(0, n_tuples, per_step)]


# ------------------------------------------------------------------------------------------ checkpoints


def save_state(folder: Path, model, opt, epoch: int, history: list[dict], extra: dict | None = None) -> None:
    """The checkpoint: model, optimiser, epoch, loss log and ``extra`` (validation curve, mining counts,
    the best epoch's weights)."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "history": history}
    torch.save({**state, **(extra or {})}, folder / STATE_FILE)


def latest_state(ft_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``ft_dir`` (highest epoch), or None."""
    best, best_epoch = None, -1
    for path in (ft_dir / RUN_NAME).glob(f"**/{STATE_FILE}"):
        try:
            epoch = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        except (RuntimeError, OSError, EOFError, KeyError):
            continue  # a checkpoint cut short by a kill
        if epoch > best_epoch:
            best, best_epoch = path, epoch
    return best


def _state_of(folder: Path | None) -> dict | None:
    if folder is None:
        return None
    path = folder / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


# -------------------------------------------------------------------------------- mining without labels


def local_features(refs: list[InputRef], cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """(keypoint xy (n, 2), RootSIFT (n, 128)) of every image at ``local.max_side``, for verification."""
    from embedpipe.workers.descriptors.local import descriptor_vectors, extract_local, grayscale

    out = []
    for image in load_images(refs, cfg.local.max_side, cfg):
        f = extract_local(grayscale(image), "sift", cfg.local.max_keypoints)
        out.append((f.keypoints[:, :2], descriptor_vectors(f.descriptors, "rootsift")))
    return out


def mining_features(refs: list[InputRef], cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """What verification matches, per image: (keypoint xy (n, 2), RootSIFT (n, 128)), or with
    ``finetune.matches: words`` (keypoint xy (n, 2), visual word (n,))."""
    features = local_features(refs, cfg)
    if cfg.finetune.matches == "descriptors":
        return features
    words = visual_words([d for _, d in features], [r.key for r in refs], cfg)
    return [(xy, w) for (xy, _), w in zip(features, words, strict=True)]


def visual_words(descriptors: list[np.ndarray], keys: list[str], cfg: Config) -> list[np.ndarray]:
    """Each image's hard-assigned words under a codebook of ``bow.k`` words: seeded faiss k-means on up
    to ``bow.sample_per_image`` descriptors of each image (seeded per image, as the BoW codebooks are)."""
    from embedpipe.workers.classical.codebook import assign, assignment_index, train_kmeans
    from embedpipe.workers.classical.encode import cap_sample
    from embedpipe.workers.descriptors.bow import image_seed, sample_rows

    blocks = [
        d[sample_rows(len(d), cfg.bow.sample_per_image, image_seed(cfg.seed, key))]
        for d, key in zip(descriptors, keys, strict=True)
    ]
    centroids = train_kmeans(
        cap_sample(blocks, cfg.bow.max_sample, cfg.seed), cfg.bow.k, cfg.bow.iterations, cfg.seed
    )
    index = assignment_index(centroids, cfg.bow.assign_flat_max, cfg.seed)
    return [assign(index, d, 1)[1][:, 0] for d in descriptors]


def verified_groups(
    vectors: np.ndarray, features: list[tuple[np.ndarray, np.ndarray]], cache: dict, cfg: Config
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Groups without labels: the embedding's kNN pairs (``finetune.knn``) whose local features RANSAC
    verifies with at least ``finetune.min_inliers`` inliers (``verify.model``, ``verify.threshold``),
    joined into connected components. ``features``: ``mining_features``. ``cache`` keeps each pair's
    (inliers, similarity inliers) across epochs (``pair_geometry``). Returns the group of each image and
    the verified pairs (i, j, inliers)."""
    verified = []
    for i, j in knn_pairs(vectors, cfg.finetune.knn):
        if (i, j) not in cache:
            cache[(i, j)] = pair_geometry(features[i], features[j], cfg)
        if cache[(i, j)][0] >= cfg.finetune.min_inliers:
            verified.append((i, j, cache[(i, j)][0]))
    return components(len(vectors), [(i, j) for i, j, _ in verified]), verified


def pair_geometry(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], cfg: Config
) -> tuple[int, int]:
    """(inliers of the verification model, inliers of a similarity transform within ``NEAR_COPY_PX``)
    that RANSAC finds among two images' tentative correspondences (``mining_features`` of each)."""
    import cv2

    from embedpipe.workers.evaluate.rerank import ransac_inliers, word_matches

    (pa, fa), (pb, fb) = a, b
    if cfg.finetune.matches == "words":
        ia, ib = word_matches(fa, fb, cfg.verify.max_word_matches)
    else:
        ia, ib = descriptor_matches(fa, fb)
    inliers = ransac_inliers(pa[ia], pb[ib], cfg.verify.model, cfg.verify.threshold)
    if inliers < 3:
        return inliers, 0
    src = np.ascontiguousarray(pa[ia], np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(pb[ib], np.float32).reshape(-1, 1, 2)
    cv2.setRNGSeed(0)
    matrix, mask = cv2.estimateAffinePartial2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=NEAR_COPY_PX,
        maxIters=2000,
        confidence=0.99,
    )
    return inliers, 0 if matrix is None or mask is None else int(mask.sum())


def pair_kinds(verified: list[tuple[int, int, int]], cache: dict) -> dict[str, int]:
    """How many verified pairs are near-copies and how many verified views (``is_near_copy``)."""
    near = sum(is_near_copy(*cache[(i, j)]) for i, j, _ in verified)
    return {"verified_pairs": len(verified), "near_copies": near, "views": len(verified) - near}


# ----------------------------------------------------------------------------------------- worker loop


def train_loop(config: dict, ctx: TrainContext) -> None:
    """Ray Train worker function (one per worker; ``ctx``: its ``workers/engines/ray_train.py`` context)."""
    import torch.distributed as dist

    cfg = config["cfg"]
    torch.set_num_threads(config["threads"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    rank, world = ctx.rank, ctx.world
    device = "cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu"
    if device == "cuda":
        device = ctx.gpu_device()
    torch.manual_seed(cfg.seed)
    model, spec = build_model(cfg)
    model = model.to(device)
    opt = optimiser(model, cfg.finetune)
    w0 = start_weights(model) if cfg.finetune.l2sp > 0 else None

    start, history, curve, mining_log, best_model = 0, [], [], [], None
    with ctx.resume_dir() as folder:
        states = [_state_of(folder)]
    if config["resume_from"]:
        states.append(torch.load(config["resume_from"], map_location="cpu", weights_only=True))
    states = [s for s in states if s is not None]
    if states:
        state = max(states, key=lambda s: s["epoch"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
        curve, mining_log = list(state.get("validation", [])), list(state.get("mining", []))
        best_model = state.get("best_model")

    images = load_images(config["refs"], cfg.finetune.max_side, cfg)
    groups = np.asarray(config["groups"])
    keys = config["keys"]
    mined = config["mining"] == "verified"
    features = mining_features(config["refs"], cfg) if mined and rank == 0 else None
    inliers_cache: dict = {}
    validator = None
    if config.get("validation") is not None and rank == 0:
        from embedpipe.workers.train.validate import Validator

        validator = Validator(cfg, config["validation"], config["threads"])
        if not curve:  # epoch 0: the base model as a default run uses it
            curve.append({"epoch": 0, **validator.base()})
            log.info("finetune: validation mAP of the base model %.4f", curve[0]["map"])

    def stop_now() -> bool:
        """Early stopping (rank 0 decides from the validation curve, every worker follows)."""
        from embedpipe.workers.train.validate import should_stop

        if config.get("validation") is None:
            return False
        flag = [should_stop(curve, cfg.finetune.patience) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def allreduce(m: torch.nn.Module, loss: torch.Tensor) -> None:
        if world == 1:
            return
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
        dist.all_reduce(loss)

    for epoch in range(start, cfg.finetune.epochs):
        if stop_now():
            log.info("finetune: no better validation mAP for %d epoch(s), stopping", cfg.finetune.patience)
            break
        t0 = time.perf_counter()
        mine = list(range(rank, len(images), world))
        mine_vecs = embed_images(model, [images[i] for i in mine], spec, device)
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (mine, mine_vecs))
            vectors = np.zeros((len(images), mine_vecs.shape[1]), np.float32)
            for idx, vecs in gathered:
                vectors[idx] = vecs
        else:
            vectors = mine_vecs
        kinds = None
        if mined:  # positives re-mined with the current embedding, verified geometrically
            shared = [None]
            if rank == 0:
                shared[0], verified = verified_groups(vectors, features, inliers_cache, cfg)
                kinds = {"epoch": epoch + 1, **pair_kinds(verified, inliers_cache)}
                mining_log.append(kinds)
            if world > 1:
                dist.broadcast_object_list(shared, src=0)
            groups = shared[0]
        tuples = mine_tuples(vectors, groups, cfg.finetune.negatives, cfg.seed, epoch)
        if not tuples:
            raise RunFailed(f"epoch {epoch + 1}: no verified pair among the images, nothing to train on")
        if rank == 0:
            source = "mined" if mined else "label"
            write_tuples(Path(config["ft_dir"]), epoch + 1, tuples_table(tuples, keys, source, epoch + 1))
        torch.manual_seed(cfg.seed * 1000 + epoch)
        losses = []
        for step, span in enumerate(steps_of(len(tuples), cfg.finetune.tuples_per_step * world)):
            batch = [
                [images[t.query], images[t.positive], *[images[n] for n in t.negatives]]
                for t in (tuples[i] for i in span[rank::world])
            ]
            lr = set_lr(opt, len(history), epoch, cfg.finetune)
            loss = train_step(
                model, opt, batch, len(span), cfg.finetune, spec, device, allreduce, w0, 1.0 / world
            )
            losses.append(loss)
            history.append({"epoch": epoch + 1, "step": step + 1, "loss": loss, "lr": lr})
        metrics = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "seconds": time.perf_counter() - t0,
            "tuples": len(tuples),
            "gem_p": model.gem_p(),
        }
        if kinds is not None:
            metrics.update(kinds)
        if validator is not None:
            from embedpipe.workers.train.validate import best_epoch

            curve.append({"epoch": epoch + 1, **validator.adapted(model)})
            metrics["validation_map"] = curve[-1]["map"]
            if best_epoch(curve) == epoch + 1:
                best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            log.info(
                "finetune: epoch %d validation mAP %.4f (base %.4f)",
                epoch + 1,
                curve[-1]["map"],
                curve[0]["map"],
            )
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                extra = {"validation": curve, "mining": mining_log, "best_model": best_model}
                save_state(Path(tmp), model, opt, epoch + 1, history, extra)
            ctx.report(metrics, checkpoint_dir=tmp if rank == 0 else None)


# ------------------------------------------------------------------------------------------------ driver


def training_inputs(cfg: Config) -> tuple[list[InputRef], np.ndarray, str]:
    """The training images, their groups, and how positives are found: ``labels`` (groups of the labels
    or the Holidays layout) or ``verified`` (mined without labels; every image starts in its own group)."""
    refs = list(list_inputs(cfg.images).refs)
    groups = groups_of([r.key for r in refs], [r.label for r in refs])
    has_groups = len(refs) > 0 and np.bincount(groups).max() >= 2
    mining = cfg.finetune.mining
    if mining == "auto":
        mining = "labels" if has_groups else "verified"
    if mining == "labels" and not has_groups:
        raise InputError(f"{cfg.images}: no groups of matching images (labels or the Holidays layout)")
    if mining == "verified":
        groups = np.arange(len(refs), dtype=np.int64)
    if len(refs) < 3 or len(np.unique(groups)) <= cfg.finetune.negatives:
        raise InputError(
            f"{cfg.images}: {len(np.unique(groups))} groups, fewer than finetune.negatives + 1 "
            f"({cfg.finetune.negatives + 1})"
        )
    return refs, groups, mining


def worker_plan(f: FinetuneConfig, cpus: int, gpus: int) -> tuple[int, bool, int, float]:
    """(workers, use_gpu, torch threads per worker, CPUs per worker) for a cluster. One worker per GPU;
    on CPUs one single-threaded worker per CPU (on a busy host, multi-threaded torch loses far more to
    its threads waiting on each other than data parallelism loses to the all-reduce); ``finetune.workers``
    and ``finetune.torch_threads`` override. Ray Train's controller reserves no CPU, so the workers may
    take every CPU without waiting on it."""
    use_gpu = gpus > 0 and f.device != "cpu"
    if f.device == "cuda" and gpus == 0:
        raise InputError("finetune.device is cuda but the Ray cluster has no GPU")
    n = f.workers or (gpus if use_gpu else cpus)
    cpu_each = 1.0 if use_gpu else cpus / n
    threads = f.torch_threads or max(1, int(cpu_each))
    return n, use_gpu, threads, cpu_each


def run_finetune(cfg: Config, ft_dir: Path) -> FinetuneResult:
    """Fine-tune ``cfg.extract.backbone`` on ``cfg.images`` into ``ft_dir`` (resuming what is there)."""
    from embedpipe.workers.engines.ray_stages import cluster_cpus, cluster_gpus, ray_session
    from embedpipe.workers.engines.ray_train import fit_torch

    ft_dir = Path(ft_dir).resolve()
    ft_dir.mkdir(parents=True, exist_ok=True)
    refs, groups, mining = training_inputs(cfg)
    validation = None
    if cfg.finetune.validation:
        from embedpipe.workers.train.validate import check_validation

        validation = check_validation(cfg)
    resume = latest_state(ft_dir)
    done = int(torch.load(resume, map_location="cpu", weights_only=True)["epoch"]) if resume else 0
    target = cfg.finetune.epochs
    if resume and validation is not None:
        from embedpipe.workers.train.validate import should_stop

        curve = torch.load(resume, map_location="cpu", weights_only=True).get("validation", [])
        target = done if should_stop(curve, cfg.finetune.patience) else target
    t0 = time.perf_counter()
    with ray_session(cfg.ray):
        n, use_gpu, threads, cpu_each = worker_plan(cfg.finetune, cluster_cpus(), cluster_gpus())
        log.info(
            "finetune: %d images (positives: %s), %d worker(s) x %d thread(s)%s, %s loss, epochs %d..%d",
            len(refs),
            "verified kNN pairs" if mining == "verified" else f"{len(np.unique(groups))} groups",
            n,
            threads,
            " on GPU" if use_gpu else "",
            cfg.finetune.loss,
            done + 1,
            cfg.finetune.epochs,
        )
        if done < target:
            fit_torch(
                train_loop,
                {
                    "cfg": cfg,
                    "refs": refs,
                    "keys": [r.key for r in refs],
                    "groups": groups.tolist(),
                    "mining": mining,
                    "threads": threads,
                    "use_gpu": use_gpu,
                    "ft_dir": str(ft_dir),
                    "resume_from": str(resume) if resume else None,
                    "validation": validation,
                },
                workers=n,
                use_gpu=use_gpu,
                cpu_each=cpu_each,
                storage_path=ft_dir,
                name=RUN_NAME,
                num_to_keep=2,
                max_failures=0,
                failure="finetune failed",
            )
    state_path = latest_state(ft_dir)
    if state_path is None:
        raise RunFailed(f"finetune: no checkpoint in {ft_dir / RUN_NAME}")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    history = state["history"]
    losses = [
        float(np.mean([h["loss"] for h in history if h["epoch"] == e])) for e in range(1, state["epoch"] + 1)
    ]
    kept = kept_model(state, validation is not None)
    write_backbone(ft_dir, kept, cfg, refs, mining, history, state)
    return FinetuneResult(
        ft_dir,
        int(state["epoch"]),
        done,
        losses,
        n,
        time.perf_counter() - t0,
        state.get("validation", []),
        validation_best(state) if validation is not None else None,
    )


def validation_best(state: dict) -> int:
    from embedpipe.workers.train.validate import best_epoch

    return best_epoch(state.get("validation", []))


def kept_model(state: dict, validated: bool) -> dict | None:
    """The weights to keep: the last epoch's without validation, else the best validated epoch's, or
    None when no epoch beat the base model (epoch 0)."""
    if not validated:
        return state["model"]
    if validation_best(state) == 0:
        return None
    return state["best_model"]


def write_backbone(
    ft_dir: Path, model_state: dict | None, cfg: Config, refs, mining: str, history, state: dict | None = None
) -> None:
    """``backbone.pt`` (trunk and pooling state), ``backbone.json`` (architecture, pooling, preprocessing,
    training config, validation curve), ``train_log.json`` (loss per step) and the learned whitening of
    the GeM vectors, fitted on the last epoch's (query, positive) pairs. ``model_state`` None: no epoch
    beat the base model on validation, and the folder holds the base model, as a default run uses it
    (``"adapted": false``, its weights, ``extract.max_side``, ``extract.gem_p``)."""
    from embedpipe.storage.artifacts import save_npz
    from embedpipe.workers.fit.whitening import learned_whitening, learned_whitening_file

    adapted = model_state is not None
    model, spec = build_model(cfg)
    if adapted:
        model.load_state_dict(model_state)
    elif isinstance(model.pool, GeM):
        model.pool.p.data.fill_(cfg.extract.gem_p)
    save_backbone_weights(ft_dir, {k: v.contiguous() for k, v in model.state_dict().items()})
    write_train_log(ft_dir, history)

    whitening = whitening_base = None
    if cfg.finetune.head == "gem":  # Lw of the adapted model, and of the off-the-shelf one it started from
        torch.set_num_threads(1)  # see worker_plan: one thread is fastest on a shared host
        images = load_images(refs, cfg.finetune.max_side, cfg)
        q, p = last_tuple_pairs(ft_dir)  # the matching pairs for learned whitening
        whitening, whitening_base = learned_whitening_file("gem"), learned_whitening_file("gem", base=True)
        for net, name in ((model, whitening), (build_model(cfg)[0], whitening_base)):
            vectors = embed_images(net, images, spec, "cpu")
            arrays = learned_whitening(vectors, q, p, cfg.finetune.whiten_dim, cfg.finetune.whiten_shrinkage)
            meta = {"kind": "learned-whitening", "descriptor": "gem", "n_pairs": len(q), "n_train": len(refs)}
            save_npz(ft_dir / name, meta, **arrays)
    state = state or {}
    curve = state.get("validation", [])
    info = {
        "format": 1,
        "adapted": adapted,
        "base": cfg.extract.backbone,
        "base_weights": str(cfg.extract.weights) if cfg.extract.weights else None,
        "head": cfg.finetune.head,
        "gem_p": model.gem_p(),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "channels": spec.channels,
        "max_side": cfg.finetune.max_side if adapted else cfg.extract.max_side,
        "whitening": whitening,
        "whitening_base": whitening_base,
        "training": {
            "images": str(cfg.images),
            "n_images": len(refs),
            "positives": mining,
            "seed": cfg.seed,
            "epochs": max((h["epoch"] for h in history), default=0),
            "final_loss": history[-1]["loss"] if history else None,
            "config": cfg.finetune.model_dump(mode="json"),
            "mining": state.get("mining", []),
        },
        "validation": None
        if not curve
        else {
            "images": str(cfg.finetune.validation),
            "protocol": cfg.finetune.validation_protocol,
            "post": curve[0].get("post"),
            "curve": curve,
            "best_epoch": validation_best(state),
            "base_map": curve[0]["map"],
            "base_map_at_size": curve[0].get("map_at_size"),
            "kept_map": next(c["map"] for c in curve if c["epoch"] == validation_best(state)),
        },
    }
    write_backbone_info(ft_dir, info)
    if not adapted:
        log.warning(
            "finetune: no epoch beat the base model on validation (mAP %.4f); %s holds the base model",
            curve[0]["map"],
            ft_dir,
        )
    log.info("finetune: wrote %s (GeM p %s)", ft_dir / BACKBONE_JSON, json.dumps(model.gem_p()))
