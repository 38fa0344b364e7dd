"""Validation of a fine-tuning (``finetune.validation``): the retrieval mAP of a validation collection, for
the base model as ``embedpipe run`` uses it by default (epoch 0) and for the adapted model after every
epoch as ``embedpipe run --backbone FT_DIR`` will use it (its image size, its learnt GeM p), with the same
post-processing as a run: GeM L2-normalised, and PCA-whitened fitted on the collection (``fit.dim``,
``fit.shrinkage``) when ``fit.whiten``.

Images are decoded as the ingest stage stores them (the original bytes when not larger than the image
size, else a resized JPEG of quality ``JPEG_QUALITY``) and embedded by the run's own ``Embedder``, so the
epoch-0 figure is the one a default run of the validation collection reports for its GeM rows.

Validation collections are small (hundreds to a few thousand images): they are embedded and ranked whole
(brute force) in one training worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.evaluate.metrics import compute_map
from embedpipe.workers.evaluate.protocols import GroundTruth, ground_truth
from embedpipe.workers.fit.whitening import apply_whitening, pca_whitening_from_moments
from embedpipe.workers.ingest.decode import content_id, decode_image, stored_bytes
from embedpipe.workers.ingest.sources import list_inputs, read_input

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.inputs import InputRef

log = logging.getLogger("embedpipe.train")


@dataclass(frozen=True)
class ValidationSet:
    path: str
    refs: list[InputRef]
    ids: list[str]  # content ids (hex SHA-256 of the bytes)
    gt: GroundTruth


def read_bytes(ref: InputRef, cfg: Config) -> bytes:
    i = cfg.ingest
    return read_input(ref.uri, ref.offset, ref.length, i.timeout_s, i.retries, i.max_bytes)


def content_ids(refs: list[InputRef], cfg: Config) -> list[str]:
    """The content id of every input, as the ingest stage computes it."""
    return [content_id(read_bytes(r, cfg)) for r in refs]


def validation_set(cfg: Config) -> ValidationSet:
    """The validation collection of ``finetune.validation``, its content ids and ground truth. Raises
    ``InputError`` when it has no query with a positive under ``finetune.validation_protocol``."""
    f = cfg.finetune
    refs = list(list_inputs(f.validation).refs)
    known = {r.key: r.label for r in refs if r.label is not None}
    keys = [r.key for r in refs]
    gt = ground_truth(f.validation_protocol, keys, str(f.validation), known)
    if gt is None or not any(len(p) for p in gt.positives):
        raise InputError(
            f"{f.validation}: no validation query with a positive ({f.validation_protocol} protocol)"
        )
    return ValidationSet(str(f.validation), refs, content_ids(refs, cfg), gt)


def check_disjoint(train_ids: list[str], train_keys: list[str], val: ValidationSet) -> None:
    """Validation images must not be training images (by content): one ``InputError`` naming the first."""
    seen = dict(zip(train_ids, train_keys, strict=True))
    both = [(k, seen[i]) for k, i in zip((r.key for r in val.refs), val.ids, strict=True) if i in seen]
    if both:
        raise InputError(
            f"finetune --validate: {len(both)} validation image(s) are also training images "
            f"(same content), e.g. {both[0][0]} = {both[0][1]}"
        )


def check_validation(cfg: Config) -> ValidationSet:
    """The validation collection of ``cfg``, checked: it has queries with positives and shares no image
    (by content) with the training collection ``cfg.images``."""
    val = validation_set(cfg)
    train = list(list_inputs(cfg.images).refs)
    check_disjoint(content_ids(train, cfg), [r.key for r in train], val)
    return val


def run_pixels(data: bytes, max_side: int, cfg: Config) -> np.ndarray:
    """(H, W, 3) uint8 as a run extracts an input at ``max_side``: the ingest stage keeps the original
    bytes of an image that fits and re-encodes a larger one as a resized JPEG; the extract stage decodes
    that."""
    exif = cfg.ingest.exif_orientation
    stored, _, _ = stored_bytes(data, max_side, cfg.ingest.max_pixels, exif)
    return decode_image(stored, max_side, cfg.ingest.max_pixels, exif)[0]


def load_validation_images(val: ValidationSet, max_side: int, cfg: Config) -> list[np.ndarray]:
    return [run_pixels(read_bytes(r, cfg), max_side, cfg) for r in val.refs]


def posts(vectors: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
    """The run's GeM rows: ``l2`` (as extracted) and, with ``fit.whiten``, ``pcaw`` (PCA-whitening fitted
    on these vectors, as a run fits it on its collection)."""
    out = {"l2": vectors}
    if cfg.fit.whiten and len(vectors) >= 2:
        x = vectors.astype(np.float64)
        w = pca_whitening_from_moments(x.sum(0), x.T @ x, len(x), cfg.fit.dim, cfg.fit.shrinkage)
        out["pcaw"] = apply_whitening(vectors, w["mean"], w["proj"])
    return out


def retrieval_map(vectors: np.ndarray, gt: GroundTruth) -> float:
    """mAP of ``gt``'s queries ranking every row of ``vectors`` (n, D) by inner product (ties by row)."""
    sims = vectors[gt.queries] @ vectors.T  # (n_queries, n)
    rows = np.arange(len(vectors))
    ranks = np.stack([np.lexsort((rows, -s)) for s in sims])
    return float(compute_map(ranks, gt.positives, gt.junk)["map"])


def selected_post(cfg: Config, n: int) -> str:
    """The post-processing whose validation mAP picks the epoch, for a collection of ``n`` images. auto:
    ``pcaw`` when ``fit.whiten`` and the collection has more than twice the whitening's dimensions, else
    ``l2``: a whitening of nearly as many dimensions as images, fitted on those images, spreads them almost
    evenly and hardly tells one model from another."""
    post = cfg.finetune.validation_post
    if post == "auto":
        dim = cfg.fit.dim if cfg.fit.dim > 0 else n - 1
        return "pcaw" if cfg.fit.whiten and n > 2 * min(dim, n - 1) else "l2"
    return post


def validation_scores(vectors: np.ndarray, gt: GroundTruth, cfg: Config) -> dict:
    """{post: mAP} over ``posts`` of GeM ``vectors``, ``post``: the one that picks the epoch
    (``selected_post``), and ``map``: its mAP."""
    scores: dict = {post: retrieval_map(v, gt) for post, v in posts(vectors, cfg).items()}
    post = selected_post(cfg, len(vectors))
    post = post if post in scores else "l2"
    return {**scores, "post": post, "map": scores[post]}


def best_epoch(curve: list[dict]) -> int:
    """The epoch to keep from a validation ``curve`` ([{"epoch", "map"}], epoch 0 the base, with
    ``map_at_size``: the base model at the fine-tuning image size when that differs): the first with the
    highest mAP. An adapted epoch must beat the base strictly, both as a default run uses it and at the
    size the adapted model runs at, so that a different image size alone never passes for a better model
    (a tie keeps the base)."""
    best, best_map = 0, None
    for point in curve:
        score = point["map"]
        if int(point["epoch"]) == 0:
            score = max(score, point.get("map_at_size", score))
        if best_map is None or score > best_map:
            best, best_map = int(point["epoch"]), score
    return best


def should_stop(curve: list[dict], patience: int) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best one."""
    return len(curve) > 0 and int(curve[-1]["epoch"]) - best_epoch(curve) >= patience


class Validator:
    """Embeds the validation collection with the run's ``Embedder``: the base model as a default run
    (``extract.max_side``, ``extract.gem_p``), or the weights of the model being trained as a run with
    ``--backbone FT_DIR`` (``finetune.max_side``, the learnt p). Built once per training worker."""

    def __init__(self, cfg: Config, val: ValidationSet, threads: int = 0):
        from embedpipe.workers.extract.embed import Embedder

        self.cfg, self.val = cfg, val
        self.descriptor = "gem" if cfg.finetune.head == "gem" else "rmac"
        # torch: the weights being trained are loaded into the embedder's module (an exported runtime would
        # keep computing the weights it was exported with)
        precision = "fp32" if cfg.extract.precision == "int8" else cfg.extract.precision
        update = {"descriptors": (self.descriptor,), "runtime": "torch", "precision": precision}
        self.embedder = Embedder(cfg.extract.model_copy(update=update), threads)
        self.base_p = self.embedder.gem_p
        self.base_state = {k: v.clone() for k, v in self.embedder.model.state_dict().items()}
        self.images = {
            s: load_validation_images(val, s, cfg) for s in {cfg.extract.max_side, cfg.finetune.max_side}
        }

    def _scores(self, max_side: int) -> dict[str, float]:
        vectors = np.stack([v[self.descriptor] for v in self.embedder.embed_many(self.images[max_side])])
        return validation_scores(vectors, self.val.gt, self.cfg)

    def base(self) -> dict:
        """Scores of the base model, exactly as ``embedpipe run`` extracts it by default, and when the
        fine-tuning image size differs, the base model's at that size (``<score>_at_size``)."""
        self.embedder.model.load_state_dict(self.base_state)
        self.embedder.gem_p = self.base_p
        out = self._scores(self.cfg.extract.max_side)
        if self.cfg.finetune.max_side != self.cfg.extract.max_side:
            at = self._scores(self.cfg.finetune.max_side)
            out.update({f"{k}_at_size": v for k, v in at.items() if k != "post"})
        return out

    def adapted(self, model) -> dict[str, float]:
        """Scores of ``model`` (a ``RetrievalNet`` being trained) as ``run --backbone FT_DIR`` extracts."""
        self.embedder.model.load_state_dict(model.trunk.state_dict())
        p = model.gem_p()
        self.embedder.gem_p = p if p is not None else self.base_p
        return self._scores(self.cfg.finetune.max_side)
