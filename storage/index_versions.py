"""Versioned index folders: ``index/<name>/v0001/``, ``v0002/``, … and a ``CURRENT`` file naming the live
one. A new version is written completely, then ``CURRENT`` is replaced by a rename, so readers see
either the old index or the new one, never a mix."""

from __future__ import annotations

import re
from pathlib import Path

from embedpipe.storage.contracts.layout import atomic_path

CURRENT = "CURRENT"
_VERSION = re.compile(r"^v(\d{4,})$")


def versions(root: Path) -> list[Path]:
    """Version folders under ``root``, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in Path(root).iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def new_version(root: Path) -> Path:
    """Create and return the next version folder (not yet live)."""
    existing = versions(root)
    number = int(existing[-1].name[1:]) + 1 if existing else 1
    path = Path(root) / f"v{number:04d}"
    path.mkdir(parents=True)
    return path


def publish(root: Path, version: Path) -> None:
    """Make ``version`` the live one: write CURRENT beside it through a temporary file and rename."""
    with atomic_path(Path(root) / CURRENT) as tmp:
        tmp.write_text(version.name + "\n")


def current(root: Path) -> Path | None:
    """The live version folder, or None when nothing was published."""
    pointer = Path(root) / CURRENT
    if not pointer.is_file():
        return None
    return Path(root) / pointer.read_text().strip()
