"""WebDataset tar shards written by the ingest stage (``embedpipe ingest``): ``shard-NNNNN.tar``, each
sample an image member plus its ``.json`` metadata and, when labelled, a ``.cls`` label; written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.tar"


def _member_stem(key: str, used: set[str]) -> str:
    """A WebDataset sample key from the input's name: no dots (they split keys), unique in its shard."""
    stem = PurePosixPath(key.split("?", 1)[0]).stem.replace(".", "_") or "image"
    out, n = stem, 1
    while out in used:
        n += 1
        out = f"{stem}_{n}"
    used.add(out)
    return out


class ShardTarWriter:
    """Writes one shard's samples (image + ``.json`` metadata + ``.cls`` label) to ``.tmp`` then renames."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.used: set[str] = set()

    def add(self, key: str, label: str | None, payload: bytes, ext: str, meta: dict[str, Any]) -> None:
        stem = _member_stem(key, self.used)
        members = [(f"{stem}.{ext}", payload), (f"{stem}.json", json.dumps(meta, sort_keys=True).encode())]
        if label is not None:
            members.append((f"{stem}.cls", label.encode()))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)
