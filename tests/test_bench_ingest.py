"""`embedpipe bench ingest`: the photos it makes, its HTTP server on 127.0.0.1, and a tiny run against the
real img2dataset (installed once per machine into the cache folder the bench uses), with the resume check;
an img2dataset that cannot be installed is one error line; img2dataset's own output read as an input."""

import hashlib
import io
import json
import socket

import httpx
import pytest
from PIL import Image

from embedpipe.flows.benchmarks.http_serve import serve_folder
from embedpipe.flows.benchmarks.ingest import (
    bench_ingest,
    bench_photos,
    img2dataset_python,
    run_img2dataset,
    write_url_list,
)
from embedpipe.flows.config import load_config
from embedpipe.workers.engines.ray_stages import ray_session
from embedpipe.workers.ingest.sources import list_inputs, read_input

from .helpers import embedpipe

pytestmark = pytest.mark.slow


def test_photos_are_distinct_deterministic_and_served(tmp_path):
    files = bench_photos(tmp_path / "a", 4, seed=3)
    again = bench_photos(tmp_path / "b", 4, seed=3)
    data = [f.read_bytes() for f in files]
    assert data == [f.read_bytes() for f in again]
    assert len({hashlib.sha256(d).hexdigest() for d in data}) == 4
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and 1200 <= max(img.size) <= 2000
    with serve_folder(files[0].parent) as base:
        assert base.startswith("http://127.0.0.1:")
        urls = write_url_list(tmp_path / "urls.txt", base, files).read_text().split()
        assert urls == [f"{base}/{f.name}" for f in files]
        with httpx.Client() as client:  # one keep-alive connection for every request
            assert [client.get(u).content for u in urls] == data
            assert client.get(f"{base}/missing.jpg").status_code == 404
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as s:  # the server process is gone with the block
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="session")
def img2dataset_py():
    """img2dataset's Python in the bench's own cache folder: installed from PyPI on a machine's first
    run (about 90 s), reused after."""
    return img2dataset_python()


def test_bench_ingest_against_img2dataset(tmp_path, img2dataset_py):
    """The bench in this process, under one Ray session for its three ingests (the command starts
    Ray in each, inside the timing), on 8 photos of 400-600 px downscaled to 256."""
    cfg = load_config(preset="default", sets=["extract.shard_size=3"])
    photos = bench_photos(tmp_path / "photos", 8, sides=(400, 600))
    with ray_session(cfg.ray):
        result = bench_ingest(cfg, 8, 256, tmp_path / "work", img2dataset_py, photos)
    json.dumps(result)  # what the command writes
    assert result["name"] == "ingest" and result["n_images"] == result["distinct_inputs"] == 8
    assert result["order"] == ["baseline", "ours", "ours", "baseline"]
    ours, base = result["ours"], result["baseline"]
    for side in (ours, base):
        assert side["ok"] == side["images_in_shards"] == 8 and side["failed"] == 0
        assert side["shards"] == 3 and side["output_bytes"] > 0 and len(side["runs_s"]) == 2
        assert side["images_per_s"] == pytest.approx(8 / side["time_s"], rel=1e-2)
    assert result["ratio"] == pytest.approx(base["time_s"] / ours["time_s"], rel=1e-3)
    # both sides made the same images at the same size (longer side 256, within a pixel)
    assert result["same_images"] and result["sizes_compared"] == 8 and result["sizes_differing"] == 0
    # two of the three shards removed: only they are fetched again, to the same bytes
    assert result["resume"] == {**result["resume"], "shards": 3, "removed": 2, "written": 2, "kept": 1}
    assert result["resume"]["identical"] is True
    assert result["fixed"]["ours_s"] > 0 and result["fixed"]["baseline_s"] > 0  # one photo each


def test_bench_ingest_without_img2dataset_is_one_error_line(tmp_path, monkeypatch):
    missing = embedpipe("bench", "ingest", "--n", 4, "--baseline-python", tmp_path / "nope" / "python")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"embedpipe: error: --baseline-python {tmp_path / 'nope' / 'python'}: No such file or directory"
    ]
    # an installation that fails (no package index reachable) fails the bench rather than faking it
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    failed = embedpipe("bench", "ingest", "--n", 4)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("embedpipe: error: cannot install img2dataset==1.47.0 for the baseline")
    assert [line for line in lines if "error" in line.lower()] == lines[-1:]
    assert not (tmp_path / "cache" / "embedpipe" / "img2dataset-venv" / ".embedpipe-ready").exists()


def test_output_of_img2dataset_itself_is_an_input(tmp_path, img2dataset_py):
    """A folder written by img2dataset (its WebDataset shards and the per-shard Parquet with every URL's
    status), one URL of which failed: each downloaded sample is listed and reads back as the photo at
    img2dataset's size; the failed URL is reported with img2dataset's reason."""
    photos = bench_photos(tmp_path / "photos", 4, sides=(400, 600))
    with serve_folder(photos[0].parent) as base:
        urls = write_url_list(tmp_path / "urls.txt", base, photos)
        urls.write_text(urls.read_text() + f"{base}/missing.jpg\n")
        made = run_img2dataset(img2dataset_py, urls, tmp_path / "i2d", 256, 1, 2, 10)
    assert made["ok"] == 4 and made["failed"] == 1
    listing = list_inputs(tmp_path / "i2d")
    assert len(listing.refs) == 4 and all(ref.uri.endswith(".tar") for ref in listing.refs)
    for ref in listing.refs:
        with Image.open(io.BytesIO(read_input(ref.uri, ref.offset, ref.length))) as img:
            assert img.format == "JPEG" and max(img.size) == 256
    [(url, reason)] = listing.problems
    assert url == f"{base}/missing.jpg" and reason.startswith("download failed upstream"), reason
