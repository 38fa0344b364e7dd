"""Per-shard records of a stage: ``RUN/shards/<stage>/shard-NNNNN.json``.

A shard's record is written (through a temporary file and a rename) only after every output of the shard
is complete and renamed into place, so a kill at any moment leaves either a complete shard with its record,
or no record and the shard is redone. A shard is up to date when its record carries the fingerprint of
its current inputs and the stage's config.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe.storage.contracts.layout import write_json_atomic
from embedpipe.storage.inputs import InputRef

_RECORD = re.compile(r"^shard-(\d{5,})\.json$")


def input_signature(ref: InputRef) -> str:
    """A short digest of everything that identifies an input and its current state."""
    return hashlib.sha256(ref.signature()).hexdigest()[:16]


def shard_fingerprint(config_fp: str, refs: Iterable[InputRef]) -> str:
    """Fingerprint of a shard: the stage config and its inputs (keys, locations, sizes, mtimes)."""
    digest = hashlib.sha256(config_fp.encode() + b"\0")
    for ref in refs:
        digest.update(ref.signature())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ShardRecords:
    """The records of one stage under ``root``."""

    root: Path

    def path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}.json"

    def read(self, shard: int) -> dict[str, Any] | None:
        """The record of ``shard``, or None when there is none (or it cannot be read)."""
        try:
            return json.loads(self.path(shard).read_text())
        except (OSError, ValueError):
            return None

    def write(self, shard: int, record: dict[str, Any]) -> None:
        write_json_atomic(self.path(shard), record)

    def shards(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _RECORD.match(p.name)))

    def prune(self, keep: set[int]) -> None:
        """Remove the records of shards not in ``keep`` (shards gone from the collection)."""
        for shard in self.shards():
            if shard not in keep:
                self.path(shard).unlink(missing_ok=True)
