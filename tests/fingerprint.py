"""Fingerprint of a run's outputs: a sha256 of every feature, model, index and ranking file, and of
``report/metrics.json`` without its timings.

Files that hold no path are hashed as bytes. Parquet tables and ``.npz`` archives carry the inputs' paths,
which contain the run's own folder: they are hashed on their content (Arrow IPC stream of the table with
its schema metadata; each array's dtype, shape and bytes) after that folder is replaced by ``RUN``, so
two runs of the same inputs in different folders compare equal and any other change does not.

``tests/data/demo-fingerprint.json`` holds the fingerprint of ``embedpipe demo``; the demo test compares
against it, so a change of any output byte fails. A deliberate change of the outputs regenerates it:
``python -m tests.fingerprint RUN > tests/data/demo-fingerprint.json``.
"""

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FOLDERS = ("features", "models", "index")
REPORT_FILES = ("*.npy", "*.npz")
FILE = Path(__file__).parent / "data" / "demo-fingerprint.json"


def _parquet(path: Path, roots: tuple[str, ...]) -> bytes:
    table = pq.read_table(path)
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(i)
            for root in roots:
                column = pc.replace_substring(column, root, "RUN")
            table = table.set_column(i, field, column)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _unrooted(text: str, roots: tuple[str, ...]) -> str:
    for root in roots:
        text = text.replace(root, "RUN")
    return text


def _npz(path: Path, roots: tuple[str, ...]) -> bytes:
    out = io.BytesIO()
    with np.load(path, allow_pickle=False) as archive:
        for key in sorted(archive.files):
            array = archive[key]
            if array.dtype.kind in "SU":
                text = [str(v if array.dtype.kind == "U" else v.decode()) for v in array.ravel()]
                data = json.dumps([_unrooted(t, roots) for t in text]).encode()
                head = f"{key}:{array.dtype.kind}:{array.shape}"
            else:
                data = array.tobytes()
                head = f"{key}:{array.dtype.str}:{array.shape}"
            out.write(head.encode() + b"\n" + hashlib.sha256(data).digest())
    return out.getvalue()


def _metrics(path: Path) -> bytes:
    metrics = json.loads(path.read_text())
    metrics["dataset"].pop("path", None)
    for row in metrics["results"]:
        row.pop("time_s", None)
    return json.dumps(metrics, sort_keys=True).encode()


def _content(path: Path, roots: tuple[str, ...]) -> bytes:
    if path.suffix == ".parquet":
        return _parquet(path, roots)
    if path.suffix == ".npz":
        return _npz(path, roots)
    return path.read_bytes()


def output_fingerprint(run: Path) -> dict[str, str]:
    run = Path(run)
    roots = tuple(dict.fromkeys((str(run.resolve()), str(run.absolute()))))
    files = [p for f in FOLDERS for p in (run / f).rglob("*") if p.is_file()]
    files += [p for pattern in REPORT_FILES for p in (run / "report").glob(pattern)]
    out = {str(p.relative_to(run)): hashlib.sha256(_content(p, roots)).hexdigest() for p in files}
    metrics = _metrics(run / "report" / "metrics.json")
    out["report/metrics.json (timings and path left out)"] = hashlib.sha256(metrics).hexdigest()
    return dict(sorted(out.items()))


if __name__ == "__main__":
    sys.stdout.write(json.dumps(output_fingerprint(Path(sys.argv[1])), indent=1) + "\n")
