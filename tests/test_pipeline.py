"""End to end with real engines: Prefect (ephemeral server, test harness), local Ray, Dask, Parquet, FAISS."""

import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import faiss
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
from prefect.client.schemas.sorting import ArtifactSort
from prefect.testing.utilities import prefect_test_harness

from embedpipe.flows.config import load_config
from embedpipe.flows.pipeline import pipeline
from embedpipe.storage.quarantine import read_quarantine

from .fingerprint import FILE as FINGERPRINT
from .fingerprint import output_fingerprint
from .helpers import embedpipe

pytestmark = pytest.mark.slow

RESULT_KEYS = {"descriptor", "backbone", "dim", "index", "bytes_per_vector", "map", "mp@10", "time_s"}


def _files(root: Path, *folders: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for f in folders
        for p in sorted((root / f).rglob("*"))
        if p.is_file()
    }


# The runtime ``auto`` picks is a timing on the machine that runs the tests (OpenVINO and ONNX Runtime
# fp32 are close here): the fingerprint is of one runtime's bytes, so the demo runs on that one.
DEMO_RUNTIME = ("--set", "extract.runtime=openvino")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    # as `make demo` runs: a temporary Prefect server
    out = embedpipe("demo", "--out", run, *DEMO_RUNTIME, ephemeral=True)
    assert out.returncode == 0, out.stderr[-5000:]
    return run, out


def test_demo_end_to_end(demo_run):
    run, out = demo_run
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["protocol"] == "holidays"
    assert metrics["dataset"]["n_images"] == 106 and metrics["dataset"]["n_queries"] == 10
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
    assert len(gem) == 106 and len(gem["descriptor"].iloc[0]) == 1280 and gem["id"].str.len().eq(64).all()
    assert sorted(p.name for p in (run / "features" / "gem").glob("part-*")) == [
        f"part-0000{i}-of-00004.parquet" for i in range(4)
    ]
    current = (run / "index" / "gem-pcaw64" / "CURRENT").read_text().strip()
    index = faiss.read_index(str(run / "index" / "gem-pcaw64" / current / "index.faiss"))
    assert index.ntotal == 106 and index.d == 64
    assert "mAP" in (run / "report" / "index.html").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s]["state"] == "done" for s in ("extract", "fit", "evaluate"))
    assert read_quarantine(run / "quarantine.parquet").num_rows == 0
    assert "gem" in out.stdout and "report:" in out.stdout

    # a finished run is a no-op
    before = _files(run, "features", "index", "models", "report")
    start = time.perf_counter()
    again = embedpipe("demo", "--out", run, *DEMO_RUNTIME)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr + again.stdout
    assert _files(run, "features", "index", "models", "report") == before
    assert time.perf_counter() - start < 300


def test_demo_outputs_match_the_committed_fingerprint(demo_run):
    """Features, models, indices, rankings and metrics (timings aside) are the bytes the demo has always
    produced: moving code around must not change a single output."""
    run, _ = demo_run
    expected = json.loads(FINGERPRINT.read_text())
    got = output_fingerprint(run)
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if got[k] != expected[k]] == []


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


def _data_images(page: str) -> list[bytes]:
    import base64
    import re

    return [
        base64.b64decode(m) for m in re.findall(r"src=['\"]data:image/(?:png|jpeg);base64,([^'\"]+)", page)
    ]


def test_report_rebuild_and_compare(demo_run, tmp_path):
    from PIL import Image

    run, _ = demo_run
    html_path = run / "report" / "index.html"
    html_path.unlink()
    out = embedpipe("report", run)
    assert out.returncode == 0, out.stderr[-3000:]
    page = html_path.read_text()
    for section in (
        "winner",
        "results",
        "pr",
        "per-query",
        "queries",
        "tsne",
        "timings",
        "quarantine",
        "config",
    ):
        assert f"id='{section}'" in page, section
    images = _data_images(page)
    assert len(images) >= 3 + 8 * 11  # three figures, eight query grids of query + ten results
    for data in images:
        Image.open(io.BytesIO(data)).verify()
    assert "class='pos'" in page and "class='junk'" in page

    cmp = embedpipe("compare", run, run, "--json", tmp_path / "cmp.json")
    assert cmp.returncode == 0, cmp.stderr
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert len(rows) == 16 and all(r["map_delta"] == 0.0 for r in rows)
    assert "+0.0000" in cmp.stdout
    bad = embedpipe("report", tmp_path)
    assert bad.returncode == 2 and "not a finished run" in bad.stderr


def test_report_renders_in_chromium(demo_run, tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    run, _ = demo_run
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (run / "report" / "index.html").resolve().as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "embedpipe retrieval report" in dom.stdout and 'id="winner"' in dom.stdout
    assert len(_data_images(dom.stdout)) >= 3
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = Image.open(shot).convert("L")
    assert pixels.getextrema()[1] - pixels.getextrema()[0] > 100  # not a blank page


def test_labels_protocol_run(tmp_path, demo_images):
    root = tmp_path / "classes"
    for p in sorted(demo_images.glob("10*.jpg")):
        group = int(p.stem) // 100
        if group in (1000, 1001, 1002, 1003):
            (root / f"class{group}").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / f"class{group}" / p.name)
    with prefect_test_harness(server_startup_timeout=180):
        cfg = load_config(
            overrides={"images": root, "out": tmp_path / "run", "protocol": "labels"},
            sets=[
                "extract.max_side=256",
                "fit.dim=16",
                "fit.scheduler=threads",
                "extract.descriptors=[gem]",
                "rerank.methods=[aqe]",
            ],
        )
        metrics = pipeline(cfg)
        with get_client(sync_client=True) as client:
            keys = ArtifactFilter(key=ArtifactFilterKey(any_=["metrics", "metrics-summary"]))
            found = client.read_artifacts(
                artifact_filter=keys,
                flow_run_filter=FlowRunFilter(),
                task_run_filter=TaskRunFilter(),
                limit=10,
                offset=0,
                sort=ArtifactSort.CREATED_DESC,
            )
            artifacts = {a.key: a for a in found}
    assert artifacts["metrics"].type == "table" and "aqe" in str(artifacts["metrics"].data)
    assert artifacts["metrics-summary"].type == "markdown" and "| gem |" in artifacts["metrics-summary"].data
    assert metrics["dataset"]["n_queries"] == 28
    plain = [r for r in metrics["results"] if r["rerank"] == "none"]
    for row in plain:
        assert row["map"] >= 0.9 and row["p@1"] >= 0.9 and row["fewshot@1"] >= 0.9, row
        assert row["fewshot@10"] is None  # seven images per class: not enough for 10 shots
        assert row["fewshot@10_classes"] == 0 and row["fewshot@1_classes"] == 4, row  # the four classes
        assert row["probe@full"] is not None and row["probe@10"] is None, row  # linear probes beside them
    assert all("fewshot@1" not in r for r in metrics["results"] if r["rerank"] == "aqe")


def test_descriptors_all_preset_gives_a_row_per_pooling(tmp_path, small_holidays):
    with prefect_test_harness(server_startup_timeout=180):
        cfg = load_config(
            preset="descriptors-all",
            overrides={"images": small_holidays, "out": tmp_path / "run"},
            sets=["extract.max_side=256", "fit.dim=16", "fit.scheduler=threads"],
        )
        metrics = pipeline(cfg)
    rows = {(r["descriptor"], r["post"]): r for r in metrics["results"]}
    poolings = ("spoc", "spoc-cp", "mac", "gem", "rmac", "crow")
    assert set(rows) == {(d, p) for d in poolings for p in ("l2", "pcaw16")}
    for key, row in rows.items():
        assert row["map"] >= 0.8 and row["rerank"] == "none", (key, row["map"])
