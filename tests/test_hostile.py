"""Hostile servers never hang a run: one URL list of good photos among every kind of hostile endpoint
(tests/http_fixture.py's ``HOSTILE``), served from 127.0.0.1, through the pipeline and through the
ingest stage. Every good photo is featurised, every hostile URL is quarantined with its reason, and the
run finishes (each hostile read costs at most (retries + 1) x ingest.timeout_s plus back-off)."""

import shutil
import time

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from embedpipe.flows.config import load_config
from embedpipe.flows.pipeline import pipeline
from embedpipe.storage.quarantine import read_quarantine
from embedpipe.workers.ingest.stage import run_ingest

from .http_fixture import HOSTILE, serve

pytestmark = pytest.mark.slow

SETS = [
    "extract.max_side=256",
    "extract.descriptors=[gem]",
    "extract.shard_size=8",
    "fit.whiten=false",
    "rerank.methods=[]",
    "ray.num_cpus=2",
    "ingest.timeout_s=2",
    "ingest.retries=1",
    "ingest.max_bytes=4000000",
]
# what the quarantine says of each kind: the read's one line, or the decode's for bodies that arrive
REASONS = {
    "reset": "unreadable URL",
    "truncated": "unreadable URL",
    "html": "not an image",
    "busy": "HTTP 503",
    "ratelimit": "HTTP 429",
    "tarpit": "body larger than ingest.max_bytes",
    "loop": "too many redirects",
    "stall": "timed out after 2 s",
    "empty": "empty file",
    "huge": "body larger than ingest.max_bytes",
}


def _url_list(tmp_path, photos, base) -> tuple[str, list[str], list[str]]:
    good = [f"{base}/{p.name}" for p in photos]
    hostile = [f"{base}/hostile/{kind}/{kind}.jpg" for kind in HOSTILE]
    listing = tmp_path / "urls.txt"
    lines = good[:3] + hostile[:5] + good[3:] + hostile[5:]
    listing.write_text("".join(f"{u}\n" for u in lines))
    return str(listing), good, hostile


def _check_quarantine(rows: list[dict], hostile: list[str]) -> None:
    reasons = {r["path"]: r["reason"] for r in rows}
    assert sorted(reasons) == sorted(hostile), reasons
    for url in hostile:
        kind = url.split("/")[-2]
        assert REASONS[kind] in reasons[url], (kind, reasons[url])
        assert "\n" not in reasons[url]


@pytest.mark.timeout(900)
def test_hostile_urls_are_quarantined_and_the_run_finishes(tmp_path, small_holidays):
    served = tmp_path / "served"
    served.mkdir()
    photos = sorted(small_holidays.glob("*.jpg"))[:10]
    for p in photos:
        shutil.copy(p, served / p.name)
    assert set(REASONS) == set(HOSTILE)
    with prefect_test_harness(server_startup_timeout=180), serve(served) as (base, _):
        listing, good, hostile = _url_list(tmp_path, photos, base)
        cfg = load_config(
            overrides={"images": listing, "out": tmp_path / "run", "protocol": "none"}, sets=SETS
        )
        start = time.monotonic()
        metrics = pipeline(cfg)
        run_s = time.monotonic() - start
        ingested = run_ingest(listing, tmp_path / "ingested", cfg, 256)
    assert run_s < 300, run_s  # "bounded": a hung read would hold the run until the test times out
    assert metrics["dataset"]["n_images"] == len(good)
    features = pd.read_parquet(tmp_path / "run" / "features" / "gem")
    assert sorted(features["path"]) == sorted(good)
    _check_quarantine(read_quarantine(tmp_path / "run" / "quarantine.parquet").to_pylist(), hostile)

    assert ingested.n_ok == len(good)
    manifest = pd.read_parquet(tmp_path / "ingested" / "manifest.parquet")
    bad = manifest[manifest["status"] != "ok"]
    _check_quarantine(
        [{"path": k, "reason": r} for k, r in zip(bad["key"], bad["reason"], strict=True)], hostile
    )
