"""Run directory layout and its manifest.json (stage states, config, versions)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe.storage.contracts.errors import WriteFailed


def write_error(path: Path, err: OSError) -> WriteFailed:
    """The one-line error for an output that could not be written."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = " (free some space)" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return WriteFailed(
        f"cannot write {path}: {reason}{hint}; earlier outputs are intact, re-run the same command to resume"
    )


@contextlib.contextmanager
def atomic_path(path: Path, unique: bool = False) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to: renamed onto ``path`` when the block succeeds,
    removed when it fails, so ``path`` is only ever absent, the previous complete file or the new
    complete one. A write error (full disk, file too large, read-only disk) becomes ``WriteFailed``.

    The temporary name is fixed (``.<name>.tmp``: a writer killed half-way leaves one file, which the
    next write replaces), or with ``unique`` its own per writer, for files that several processes may
    write at once with the same bytes (the last rename wins)."""
    suffix = f".{os.getpid()}-{os.urandom(4).hex()}.tmp" if unique else ".tmp"
    tmp = path.with_name(f".{path.name}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """``path`` (a new folder) removed again, whatever was written into it, when the block fails."""
    try:
        yield path
    except BaseException as err:
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def user_cache_dir() -> Path:
    """embedpipe's folder in the user's cache (``$XDG_CACHE_HOME/embedpipe``, or ``~/.cache/embedpipe``):
    what a machine keeps between runs (runtime decisions, exported models, bench inputs)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedpipe"


STAGES = ("extract", "fit", "evaluate")  # the resumable stages, in pipeline order


def spill_folder(root: str | Path) -> Path:
    """Where a run (or an ingest) into ``root`` keeps its listing and shard plan while it works: files
    removed when done with, in a hidden folder, so listing ``root`` as images never finds them."""
    return Path(root) / ".spill"  # storage.inputs.SPILL_FOLDER


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory; see the run-directory contract in docs/runs.md."""

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
    def tar_stamps(self) -> Path:
        """Size:mtime stamps of the tar shards the dataset manifest lists whole (see ``known_tars``)."""
        return self.root / "tar-stamps.json"

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
