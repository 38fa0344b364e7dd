"""The synthetic feature store the pca and index benches read: clustered, L2-normalised vectors in the
feature store's format, written once per size and reused."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from embedpipe.storage.contracts.errors import InputError


def synthetic_store(directory: Path, rows: int, dim: int, parts: int, seed: int = 0) -> Path:
    """A feature store of ``rows`` clustered, L2-normalised float32 vectors in ``parts`` part files,
    written part by part (memory stays at one part)."""
    from embedpipe.storage.features import FeatureWriter

    if (directory / "_manifest.json").is_file():
        return directory
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    writer = FeatureWriter(directory, dim, parts, {"descriptor": "synthetic"})
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    for part in range(parts):
        n = int(bounds[part + 1] - bounds[part])
        x = _draw(rng, centres, n)
        ids = [f"{i:012d}" for i in range(bounds[part], bounds[part + 1])]
        zeros = np.zeros(n, np.int32)
        writer.write(part, ids, ids, zeros, zeros, x)
    writer.close()
    return directory


CENTRES = 256  # clusters of the synthetic collection


def _draw(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """``n`` L2-normalised vectors of the mixture: a random centre plus noise whose scale falls from 2 to
    0.2 along the dimensions."""
    dim = centres.shape[1]
    scales = np.linspace(2.0, 0.2, dim, dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32) * scales
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic_queries(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` queries from the distribution of ``synthetic_store(..., dim, seed=seed)`` (the same centres,
    noise from another stream): held out, none of them a database vector."""
    centres = np.random.default_rng(seed).standard_normal((CENTRES, dim)).astype(np.float32)
    return _draw(np.random.default_rng([seed, 1]), centres, n)


def store_dir(store: Path | None, bench: str, rows: int, dim: int, parts: int) -> Path:
    """Where a bench's synthetic store of this size lives: under ``--store`` (default: the temp folder),
    after checking the size (``InputError``)."""
    if rows < 2 or dim < 1 or parts < 1:
        raise InputError("--rows must be at least 2, --dim and --parts at least 1")
    root = store or Path(tempfile.gettempdir()) / f"embedpipe-bench-{bench}"
    return root / f"{rows}x{dim}-{parts}"
