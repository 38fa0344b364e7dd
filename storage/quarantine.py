"""quarantine.parquet: every input that could not be used, with the stage and the reason."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.storage.contracts.layout import atomic_path

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def write_quarantine(path: Path, rows: list[dict[str, str | None]]) -> None:
    """Write the quarantine table (sorted by path for byte-identical output), replacing any earlier one."""
    rows = sorted(rows, key=lambda r: (r["path"], r["stage"]))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_quarantine(path: Path) -> pa.Table:
    return pq.read_table(path) if path.exists() else SCHEMA.empty_table()
