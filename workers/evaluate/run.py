"""Evaluation of a whole run: every descriptor indexed and scored (BoW through its inverted file, the
others through FAISS), gathered into the ``metrics.json`` content."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.dataset import read_manifest
from embedpipe.storage.inputs import DISTRACTOR_PREFIX
from embedpipe.storage.quarantine import read_quarantine
from embedpipe.workers.descriptors.local import encoding_of
from embedpipe.workers.evaluate.bow import evaluate_bow
from embedpipe.workers.evaluate.protocols import flags
from embedpipe.workers.evaluate.stage import index_and_evaluate, precision_change

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config


def distractor_count(layout: RunLayout) -> int:
    """Distractors usable in the run's database, from its dataset manifest (rows that carry their own
    count, from the feature store they searched, keep it)."""
    manifest = read_manifest(layout.dataset)
    if manifest is None:
        return 0
    usable = pc.and_(
        pc.starts_with(manifest.column("key"), DISTRACTOR_PREFIX), pc.equal(manifest.column("status"), "ok")
    )
    return int(np.count_nonzero(flags(usable)))


def evaluate_run(cfg: Config, layout: RunLayout, n_images: int, incremental: bool = False) -> dict[str, Any]:
    """Index and evaluate every descriptor of ``cfg`` (``incremental``: update the live indices, no
    retraining); the result is the content of ``report/metrics.json``."""
    results, n_queries, curve, changes = [], 0, [], []
    n_distractors = distractor_count(layout)
    for name in cfg.extract.descriptors:
        if encoding_of(name)[0] == "bow":
            rows, n_queries = evaluate_bow(layout, cfg, name)
        else:
            rows, n_queries = index_and_evaluate(layout, cfg, name, incremental, curve, changes)
        results.extend({"distractors": n_distractors, **row} for row in rows)
    # the curve's last points are the results themselves, over every distractor
    curve += [
        {k: row[k] for k in ("distractors", "descriptor", "post", "rerank", "map")}
        for row in results
        if row.get("distractors") and row.get("map") is not None
    ]
    curve.sort(key=lambda p: (p["descriptor"], p["post"], p["rerank"], p["distractors"]))
    return {
        "protocol": cfg.protocol,
        "dataset": {
            "path": str(cfg.images),
            "n_images": n_images,
            "n_queries": n_queries,
            "n_quarantined": read_quarantine(layout.quarantine).num_rows,
        },
        "results": results,
        "distractor_curve": curve,
        **precision_change(layout, changes),  # the mAP change of a reduced precision against fp32
    }
