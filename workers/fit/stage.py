"""The fit stage as plain functions: what a run fits, fitting it, and whether a reindex refits.

``fit_models`` learns the codebooks of the bow-*/vlad-* descriptors (with ``bow.vlad_adapt``, VLAD's
adapted to the indexed collection), the GMMs of the fv-* and the embeddings of the temb-* descriptors (then
encodes their stores) and the PCA-whitening of every dense descriptor, on the engines the config names
(``workers/engines/dask_jobs.py``), and saves each model with the config that made it. A reindex keeps
the fitted models unless the new vectors drift (``whitening_drifts``, ``should_refit``). The Prefect flow
only calls these.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from embedpipe.storage.artifacts import save_npz
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import read_store_manifest
from embedpipe.workers.classical.encode import descriptor_info
from embedpipe.workers.descriptors.local import ENCODINGS, encoding_of
from embedpipe.workers.engines.dask_jobs import (
    adapt_codebook,
    encode_descriptor,
    fit_codebook,
    fit_pca_whitening,
    fit_sampled_model,
)
from embedpipe.workers.evaluate.stage import borrowed_whitening, whitening_drift, whitening_name
from embedpipe.workers.extract.reference import reference_stores

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.fit")


def encoded_descriptors(cfg: Config) -> list[str]:
    """The descriptors encoded from a local-feature store (bow-*: words; vlad-*, fv-*, temb-*: dense)."""
    return [d for d in cfg.extract.descriptors if encoding_of(d)[0] in ENCODINGS]


def fit_encoding(cfg: Config, layout: RunLayout, descriptor: str) -> None:
    """The model ``descriptor`` is encoded with: a codebook (bow, vlad; adapted with ``bow.vlad_adapt``),
    a GMM (fv) or a triangulation embedding (temb)."""
    kind, feature, k = descriptor_info(descriptor, cfg)
    if kind in ("fv", "temb"):
        fit_sampled_model(layout, cfg, kind, feature, k)
        return
    fit_codebook(layout, cfg, feature, k)
    if kind == "vlad" and cfg.bow.vlad_adapt:
        adapt_codebook(layout, cfg, feature, k)


def needs_fit(cfg: Config) -> bool:
    """Whether the run learns any model: a whitening, or a codebook."""
    return cfg.fit.whiten or bool(encoded_descriptors(cfg))


def fit_models(cfg: Config, layout: RunLayout, logger: logging.Logger | logging.LoggerAdapter = log) -> dict:
    """Fit every model of the run into ``layout``'s models/: codebooks then the encoded stores, then the
    PCA-whitening of each dense descriptor (learnt here, or borrowed from ``fit.from_run``). Returns the
    output dimension per descriptor."""
    fitted: dict[str, Any] = {}
    for name in encoded_descriptors(cfg):
        fit_encoding(cfg, layout, name)
        fitted[name] = encode_descriptor(layout, cfg, name)["dim"]
    dense = [(d, d) for d in cfg.extract.descriptors if encoding_of(d)[0] != "bow"]
    dense += reference_stores(cfg)  # the fp32 references: whitened as their descriptor
    for source, name in dense if cfg.fit.whiten else ():
        if cfg.fit.from_run is not None:  # learnt on another dataset
            dim = int(read_store_manifest(layout.feature_dir(name))["dim"])
            model, n = borrowed_whitening(cfg.fit.from_run, source, dim, cfg.extract.backbone)
        else:
            model, n = fit_pca_whitening(layout.feature_dir(name), cfg.fit)
        meta = {
            "kind": "pca-whitening",
            "descriptor": name,
            "n_train": n,
            "fit": cfg.fit.model_dump(mode="json"),
        }
        save_npz(layout.model(whitening_name(name)), meta, **model)
        fitted[name] = int(model["proj"].shape[0])
        logger.info(
            "fit: PCA-whitening %s %d -> %d dims on %d vectors", name, model["mean"].shape[0], fitted[name], n
        )
    return fitted


def whitening_drifts(layout: RunLayout, cfg: Config) -> dict[str, float]:
    """The drift of each dense descriptor's new vectors under its fitted whitening (those that have one)."""
    return {
        d: v
        for d in cfg.extract.descriptors
        if encoding_of(d)[0] != "bow" and (v := whitening_drift(layout, cfg, d)) is not None
    }


def should_refit(cfg: Config, drift: dict[str, float]) -> bool:
    """A reindex refits (and retrains the indices) when a codebook is involved or any descriptor drifted
    past ``reindex.drift_threshold``; otherwise the models are kept and the indices updated in place."""
    return bool(encoded_descriptors(cfg)) or any(v > cfg.reindex.drift_threshold for v in drift.values())


def drift_summary(cfg: Config, drift: dict[str, float], refit: bool) -> str:
    """The reindex's one log line about drift and what it decided."""
    values = ", ".join(f"{d} {v:.4f}" for d, v in drift.items()) or "none"
    action = "refit and retrain" if refit else "models kept, indices updated in place"
    return f"reindex: drift {values} (threshold {cfg.reindex.drift_threshold:g}): {action}"
