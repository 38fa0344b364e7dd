"""Run directory layout and its manifest.json (stage states, config, versions)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


STAGES = ("extract", "fit", "evaluate")  # the resumable stages, in pipeline order


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory; see the run-directory contract in the README."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def dataset(self) -> Path:
        """The dataset manifest: every input with its id, shard and status."""
        return self.root / "dataset.parquet"

    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_dir(self, descriptor: str) -> Path:
        return self.features / descriptor

    def shard_records(self, stage: str) -> Path:
        """Per-shard records of a stage (see ``storage.shards``)."""
        return self.root / "shards" / stage

    def query_dir(self, descriptor: str) -> Path:
        """Descriptors of a protocol's external (box-cropped) queries, in query order."""
        return self.root / "queries" / descriptor

    def model(self, name: str, suffix: str = ".npz") -> Path:
        return self.root / "models" / f"{name}{suffix}"

    def index_dir(self, name: str) -> Path:
        return self.root / "index" / name

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def metrics(self) -> Path:
        return self.report_dir / "metrics.json"

    @property
    def report_html(self) -> Path:
        return self.report_dir / "index.html"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest.exists():
            return {"stages": {}}
        return json.loads(self.manifest.read_text())

    def stage_done(self, stage: str, fingerprint: str) -> bool:
        """True when ``stage`` finished earlier with the same input/config fingerprint."""
        state = self.read_manifest().get("stages", {}).get(stage, {})
        return state.get("state") == "done" and state.get("fingerprint") == fingerprint

    def mark_stage(self, stage: str, fingerprint: str, state: str, **info: Any) -> None:
        manifest = self.read_manifest()
        manifest.setdefault("stages", {})[stage] = {"state": state, "fingerprint": fingerprint, **info}
        write_json_atomic(self.manifest, manifest)

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.read_manifest()
        manifest.update(fields)
        write_json_atomic(self.manifest, manifest)
