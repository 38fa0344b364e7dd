"""Evaluation of a whole run: every descriptor indexed and scored (BoW through its inverted file, the
others through FAISS), gathered into the ``metrics.json`` content."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.quarantine import read_quarantine
from embedpipe.workers.descriptors.local import encoding_of
from embedpipe.workers.evaluate.bow import evaluate_bow
from embedpipe.workers.evaluate.stage import index_and_evaluate

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config


def evaluate_run(cfg: Config, layout: RunLayout, n_images: int, incremental: bool = False) -> dict[str, Any]:
    """Index and evaluate every descriptor of ``cfg`` (``incremental``: update the live indices, no
    retraining); the result is the content of ``report/metrics.json``."""
    results, n_queries = [], 0
    for name in cfg.extract.descriptors:
        if encoding_of(name)[0] == "bow":
            rows, n_queries = evaluate_bow(layout, cfg, name)
        else:
            rows, n_queries = index_and_evaluate(layout, cfg, name, incremental)
        results.extend(rows)
    return {
        "protocol": cfg.protocol,
        "dataset": {
            "path": str(cfg.images),
            "n_images": n_images,
            "n_queries": n_queries,
            "n_quarantined": read_quarantine(layout.quarantine).num_rows,
        },
        "results": results,
    }
