"""The files of a fine-tuning folder (``FT_DIR`` of ``embedpipe finetune``) that the training loop writes
itself: the tuples mined each epoch (``tuples/epoch-NNN.parquet``: query/positive index and path,
negatives, source, epoch), the fine-tuned weights (``backbone.pt``), the loss log (``train_log.json``) and
the backbone description (``backbone.json``, written last: a folder that has it is complete). Ray Train's
own checkpoints lie under ``FT_DIR/ray-train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.storage.contracts.layout import atomic_path, write_json_atomic

TUPLES_DIR = "tuples"
BACKBONE_JSON = "backbone.json"
BACKBONE_PT = "backbone.pt"
TRAIN_LOG = "train_log.json"


def tuples_path(ft_dir: Path, epoch: int) -> Path:
    """The tuples file of ``epoch`` (counted from 1)."""
    return ft_dir / TUPLES_DIR / f"epoch-{epoch:03d}.parquet"


def write_tuples(ft_dir: Path, epoch: int, columns: dict[str, list]) -> Path:
    """The tuples of ``epoch`` (counted from 1), ``columns`` as ``tuples_table`` makes them, written to a
    temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tuples_path(ft_dir, epoch)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return path


def last_tuple_pairs(ft_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(query, positive) image indices of every tuple of the last epoch written."""
    import pyarrow.parquet as pq

    last = sorted((ft_dir / TUPLES_DIR).glob("epoch-*.parquet"))[-1]
    table = pq.read_table(last, columns=["query", "positive"])
    return table.column("query").to_numpy(), table.column("positive").to_numpy()


def save_backbone_weights(ft_dir: Path, state: dict[str, Any]) -> None:
    """``backbone.pt``: a torch state dict, written to a temporary name and renamed."""
    import torch

    with atomic_path(ft_dir / BACKBONE_PT) as tmp:
        torch.save(state, tmp)


def write_train_log(ft_dir: Path, history: list[dict]) -> None:
    """``train_log.json``: the loss of every step, ``{"epoch", "step", "loss"}`` each."""
    write_json_atomic(ft_dir / TRAIN_LOG, history)


def write_backbone_info(ft_dir: Path, info: dict[str, Any]) -> Path:
    """``backbone.json`` (architecture, pooling, preprocessing, training config); returns its path."""
    path = ft_dir / BACKBONE_JSON
    write_json_atomic(path, info)
    return path
