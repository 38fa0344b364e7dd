"""Crash safety for real: ``kill -9`` of the whole process tree of a run (CLI and Ray) during
extraction, fit and evaluation; the same command then finishes without redoing finished shards, and the
outputs are byte-identical to an uninterrupted run."""

import json
from pathlib import Path

import pytest

from .helpers import embedpipe, kill_cli_when

pytestmark = pytest.mark.slow

SETS = [
    "extract.max_side=224",
    "extract.shard_size=4",
    "extract.descriptors=[gem]",
    "fit.dim=16",
    "ray.num_cpus=2",
]


def _args(images: Path, out: Path) -> list[str]:
    args = ["run", "--images", str(images), "--protocol", "holidays", "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    return args


def _stage(out: Path, stage: str) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text())["stages"][stage]["state"]
    except (OSError, ValueError, KeyError):
        return None


def _run_until(images: Path, out: Path, condition, log: Path) -> None:
    """Start the run and kill -9 its whole tree the moment ``condition(out)`` holds."""
    kill_cli_when(_args(images, out), lambda: condition(out), log)


def _outputs(run: Path) -> dict[str, bytes]:
    files = {
        str(p.relative_to(run)): p.read_bytes()
        for folder in ("features", "models")
        for p in sorted((run / folder).rglob("*"))
        if p.is_file()
    }
    for name in ("quarantine.parquet", "dataset.parquet"):
        files[name] = (run / name).read_bytes()
    for root in sorted((run / "index").iterdir()):  # the live version of each index
        live = root / (root / "CURRENT").read_text().strip()
        for p in sorted(live.iterdir()):
            files[f"index/{root.name}/{p.name}"] = p.read_bytes()
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for r in metrics["results"]:
        r.pop("time_s")
    files["metrics"] = json.dumps(metrics, sort_keys=True).encode()
    return files


def test_kill_9_anywhere_then_resume_gives_identical_outputs(tmp_path, small_holidays):
    reference = tmp_path / "reference"
    done = embedpipe(*_args(small_holidays, reference))
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "run"
    records = run / "shards" / "extract"
    n_shards = len(list((reference / "shards" / "extract").glob("shard-*.json")))
    assert n_shards >= 5

    # 1. during extraction, with two shards finished
    _run_until(small_holidays, run, lambda o: (records / "shard-00001.json").exists(), tmp_path / "1.log")
    assert _stage(run, "extract") == "running"
    finished = {p.name: p.stat().st_mtime_ns for p in records.glob("shard-*.json")}
    assert 2 <= len(finished) < n_shards
    assert not list(run.glob("features/*/part-*")) or len(list(run.glob("features/gem/part-*"))) < n_shards

    # 2. resumed, killed during the fit: finished shards were not extracted again
    _run_until(small_holidays, run, lambda o: _stage(o, "fit") == "running", tmp_path / "2.log")
    for name, mtime in finished.items():
        assert (records / name).stat().st_mtime_ns == mtime, f"{name} was extracted again"
    assert _stage(run, "extract") == "done" and _stage(run, "fit") == "running"

    # 3. resumed, killed while the indices are built and searched
    _run_until(small_holidays, run, lambda o: _stage(o, "evaluate") == "running", tmp_path / "3.log")
    assert _stage(run, "fit") == "done" and not (run / "report" / "metrics.json").exists()

    # 4. resumed to the end: every output byte as in the uninterrupted run
    last = embedpipe(*_args(small_holidays, run))
    assert last.returncode == 0, last.stderr[-3000:]
    assert _outputs(run) == _outputs(reference)

    # a finished run re-run does nothing and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"}
    again = embedpipe(*_args(small_holidays, run))
    assert again.returncode == 0 and "nothing to do" in again.stderr + again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
