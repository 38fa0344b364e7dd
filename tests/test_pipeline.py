"""End to end with real engines: Prefect (ephemeral server, test harness), local Ray, Dask, Parquet, FAISS."""

import json
import subprocess
import sys
import time
from pathlib import Path

import faiss
import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from embedpipe.flows.config import load_config
from embedpipe.flows.pipeline import pipeline
from embedpipe.storage.quarantine import read_quarantine

pytestmark = pytest.mark.slow

RESULT_KEYS = {"descriptor", "backbone", "dim", "index", "bytes_per_vector", "map", "mp@10", "time_s"}


def _files(root: Path, *folders: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for f in folders
        for p in sorted((root / f).rglob("*"))
        if p.is_file()
    }


def test_demo_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "embedpipe.flows.cli", "demo", "--out", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]

    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["protocol"] == "holidays"
    assert metrics["dataset"]["n_images"] == 94 and metrics["dataset"]["n_queries"] == 10
    assert [(r["descriptor"], r["post"], r["rerank"]) for r in metrics["results"]] == [
        (d, p, r)
        for d in ("gem", "spoc")
        for p in ("l2", "pcaw64")
        for r in ("none", "aqe", "dba", "dba+aqe")
    ]
    for row in metrics["results"]:
        assert RESULT_KEYS <= set(row)
        assert row["map"] >= 0.9, row  # every transformed copy must be found
        assert row["backbone"] == "efficientnet_lite0"

    gem = pd.read_parquet(run / "features" / "gem")
    assert len(gem) == 94 and len(gem["descriptor"].iloc[0]) == 1280 and gem["id"].str.len().eq(64).all()
    assert sorted(p.name for p in (run / "features" / "gem").glob("part-*")) == [
        f"part-0000{i}-of-00003.parquet" for i in range(3)
    ]
    index = faiss.read_index(str(run / "index" / "gem-pcaw64" / "index.faiss"))
    assert index.ntotal == 94 and index.d == 64
    assert "mAP" in (run / "report" / "index.html").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s]["state"] == "done" for s in ("extract", "fit", "evaluate"))
    assert read_quarantine(run / "quarantine.parquet").num_rows == 0
    assert "gem" in out.stdout and "report:" in out.stdout

    # a finished run is a no-op
    before = _files(run, "features", "index", "models", "report")
    start = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr + again.stdout
    assert _files(run, "features", "index", "models", "report") == before
    assert time.perf_counter() - start < 300


def _inject_bad_files(folder: Path) -> dict[str, str]:
    (folder / "900001.jpg").write_bytes(b"")
    (folder / "900101.jpg").write_bytes((folder / "100000.jpg").read_bytes()[:2500])
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / "900201.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        "900001.jpg": "empty file",
        "900101.jpg": "truncated or corrupt",
        "notes.txt": "not an image",
        "900201.png": "",
    }


def test_bad_inputs_quarantined_and_output_is_deterministic(tmp_path, small_holidays):
    expected = _inject_bad_files(small_holidays)
    outputs = []
    with prefect_test_harness(server_startup_timeout=180):
        for name in ("a", "b"):
            cfg = load_config(
                preset="default",
                overrides={"images": small_holidays, "out": tmp_path / name},
                sets=[
                    "extract.max_side=320",
                    "extract.shard_size=8",
                    "fit.dim=16",
                    "fit.scheduler=threads",
                    "ray.num_cpus=2",
                ],
            )
            metrics = pipeline(cfg)
            outputs.append((tmp_path / name, metrics))

    run, metrics = outputs[0]
    quarantine = read_quarantine(run / "quarantine.parquet").to_pylist()
    assert sorted(Path(q["path"]).name for q in quarantine) == sorted(expected)
    for q in quarantine:
        assert expected[Path(q["path"]).name] in q["reason"] and q["stage"] == "extract"
    n_good = len(list(small_holidays.glob("*.jpg"))) - 2
    assert metrics["dataset"]["n_images"] == n_good == len(pd.read_parquet(run / "features" / "spoc"))
    assert metrics["dataset"]["n_queries"] == 3 and metrics["dataset"]["n_quarantined"] == 4
    assert all(r["map"] >= 0.9 for r in metrics["results"]), metrics["results"]

    # same inputs and config -> identical bytes (timings apart)
    other, metrics_b = outputs[1]
    for folder in ("features", "models", "index"):
        assert _files(run, folder) == _files(other, folder), folder
    assert (run / "quarantine.parquet").read_bytes() != b"" and (run / "quarantine.parquet").read_bytes() == (
        other / "quarantine.parquet"
    ).read_bytes()
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in metrics["results"]]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in metrics_b["results"]]
