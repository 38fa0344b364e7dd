"""Dataset listing and shard plan for an image folder.

Every visible regular file under the folder (recursively) is an input: files that turn out not to be
images are quarantined with a reason rather than skipped silently. Hidden files and folders (name
starting with '.') are ignored. Order is the sorted relative path, so the plan is stable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from embedpipe.storage.errors import InputError


@dataclass(frozen=True)
class ShardPlan:
    """Inputs in a fixed order, cut into shards of ``shard_size`` consecutive files."""

    root: Path
    paths: tuple[str, ...]
    shard_size: int
    fingerprint: str

    @property
    def n_shards(self) -> int:
        return max(1, -(-len(self.paths) // self.shard_size))

    def shard_of(self, position: int) -> int:
        return position // self.shard_size


def list_images(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise InputError(f"images path not found: {root}")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"images path is neither a folder nor a file: {root}")
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise InputError(f"no files under {root}")
    return files


def plan_shards(root: Path, shard_size: int) -> ShardPlan:
    """List the inputs and fingerprint them (relative path, size, mtime) for resume decisions."""
    root = Path(root).resolve()
    files = list_images(root)
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        name = p.relative_to(root).as_posix() if root.is_dir() else p.name
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return ShardPlan(root, tuple(str(p) for p in files), shard_size, digest.hexdigest()[:16])
