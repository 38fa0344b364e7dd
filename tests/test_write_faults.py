"""Write errors for real: the run's own process gets a file-size limit (``RLIMIT_FSIZE``, set from outside
with ``prlimit`` while it runs), so the kernel fails its next larger write with EFBIG as a full disk fails
it with ENOSPC: once during extraction, once while the indices are written. Each time: one error line and
exit 1, no temporary or half-written file left, every file in the run directory parses, the manifests
are the previous complete version or absent; then the same command with no limit finishes with outputs
byte-identical to an uninterrupted run."""

import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from .helpers import cli_env, embedpipe
from .test_resume import _outputs, _stage

pytestmark = pytest.mark.slow

SETS = [
    "extract.max_side=96",
    "extract.shard_size=8",
    "extract.descriptors=[gem]",
    "fit.dim=8",
    "rerank.methods=[aqe]",
    "ray.num_cpus=2",
]
LIMIT = 4096  # bytes: a part file, an index, the manifest, the report all exceed it


def _args(images: Path, out: Path) -> list[str]:
    args = ["run", "--images", str(images), "--protocol", "holidays", "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    return args


def _run_with_limit_from(images: Path, out: Path, condition) -> subprocess.CompletedProcess:
    """Start the run; the moment ``condition(out)`` holds, cap the size of any file it writes (stderr is
    a pipe, which the limit does not touch; Ray's own driver log under /tmp is capped too, and Ray says
    so on stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedpipe.flows.cli", *_args(images, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    with ThreadPoolExecutor(1) as pool:
        stderr = pool.submit(proc.stderr.read)
        deadline = time.monotonic() + 600
        while not condition(out):
            assert proc.poll() is None, f"run ended before the fault point: {stderr.result()[-3000:]}"
            assert time.monotonic() < deadline, "fault point never reached"
            time.sleep(0.005)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))
        proc.wait(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr.result())


def _check_intact(run: Path) -> None:
    """No temporary file left; every file parses; every index's CURRENT names a complete version."""
    files = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")], "temporary files left behind"
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".faiss":
            faiss.read_index(str(p))
        elif p.suffix in (".npy", ".npz"):
            np.load(p, allow_pickle=False)
        elif p.suffix == ".html":
            assert p.read_text().rstrip().endswith("</html>")
    for root in (run / "index").iterdir() if (run / "index").is_dir() else ():
        if (root / "CURRENT").exists():
            live = root / (root / "CURRENT").read_text().strip()
            faiss.read_index(str(live / "index.faiss"))
            assert pq.read_table(live / "ids.parquet").num_rows > 0


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("embedpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "cannot write" in errors[0] and "File too large" in errors[0], errors[0]
    return errors[0]


def test_write_errors_leave_no_corrupt_file_and_resume_to_identical_outputs(tmp_path, small_holidays):
    reference = tmp_path / "reference"
    done = embedpipe(*_args(small_holidays, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    dataset = pq.read_table(reference / "dataset.parquet")

    run = tmp_path / "run"
    records = run / "shards" / "extract"

    # 1. during extraction, once the first shard is recorded: the next part file cannot be written
    first = _run_with_limit_from(small_holidays, run, lambda o: (records / "shard-00000.json").exists())
    _one_error_line(first)
    _check_intact(run)
    assert _stage(run, "extract") == "running" and not (run / "dataset.parquet").exists()
    assert 1 <= len(list(records.glob("shard-*.json"))) < 3

    # 2. resumed, the limit set while the indices are written: the dataset manifest is the complete one
    second = _run_with_limit_from(small_holidays, run, lambda o: _stage(o, "evaluate") == "running")
    _one_error_line(second)
    _check_intact(run)
    assert _stage(run, "evaluate") == "running" and not (run / "report" / "metrics.json").exists()
    assert pq.read_table(run / "dataset.parquet").equals(dataset)

    # 3. room again: the same command finishes, every output byte as in the uninterrupted run
    last = embedpipe(*_args(small_holidays, run))
    assert last.returncode == 0, last.stderr[-3000:]
    _check_intact(run)
    assert _outputs(run) == _outputs(reference)
