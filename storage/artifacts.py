"""Model artifacts (PCA/whitening, codebooks) as .npz files with byte-identical output.

``numpy.savez`` stamps the current time into the zip entries; these helpers write fixed timestamps so the
same arrays always give the same bytes. Files load with plain ``numpy.load``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.storage.contracts.layout import atomic_path

_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz(path: Path, meta: dict[str, Any], **arrays: np.ndarray) -> None:
    """Write ``arrays`` plus ``meta`` (JSON, stored as the string array ``meta``) atomically."""
    entries = dict(sorted(arrays.items()))
    entries["meta"] = np.array(json.dumps(meta, sort_keys=True))
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in entries.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def save_npy(path: Path, array: np.ndarray) -> None:
    """``numpy.save`` through a temporary name and a rename (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_blob(path: Path, blob: np.ndarray) -> None:
    """The raw bytes of ``blob`` (a serialised FAISS index, say a codebook's assignment index) through a
    temporary name and a rename; they read back with ``numpy.fromfile(path, dtype=numpy.uint8)``."""
    with atomic_path(path) as tmp:
        blob.tofile(tmp)


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
        meta = json.loads(str(data["meta"]))
    return arrays, meta
