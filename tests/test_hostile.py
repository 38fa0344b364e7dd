"""Hostile servers never hang a run: one URL list of good photos among every kind of hostile endpoint
(tests/http_fixture.py's ``HOSTILE``), served from 127.0.0.1, through the pipeline and through the
ingest stage. Every good photo is featurised, every hostile URL is quarantined with its reason, and the
run finishes (each hostile read costs at most (retries + 1) x ingest.timeout_s plus back-off). The same
for WebDataset shards served by hostile servers: a shard that cannot be listed, or a member whose read
fails, is quarantined with its reason and every other member is ingested."""

import re
import shutil
import time

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from embedpipe.flows.config import load_config
from embedpipe.flows.pipeline import pipeline
from embedpipe.storage.quarantine import read_quarantine
from embedpipe.workers.ingest.stage import run_ingest

from .helpers import SMALL_RUN
from .http_fixture import HOSTILE, serve, write_tar

pytestmark = pytest.mark.slow

SETS = [
    *SMALL_RUN,
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
    "notfound": "HTTP 404",
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


# shards served wholly by a hostile server, and what their listing problem says
SHARD_REASONS = {
    "reset": r"unreadable tar shard: \w+Error: .*\(2 tries\)",
    "truncated": r"unreadable tar shard: RemoteProtocolError: .*\(2 tries\)",
    "html": r"unreadable tar shard: the server does not honour HTTP range requests",
    "busy": r"unreadable tar shard: HTTP 503 .*\(2 tries\)",
    "tarpit": r"unreadable tar shard: timed out after 1 s \(2 tries\)",
    "stall": r"unreadable tar shard: timed out after 1 s \(2 tries\)",
    "notfound": r"unreadable tar shard: HTTP 404",
}
# shards whose headers come fine but whose ``hostile`` image member meets a hostile server when read
MEMBER_REASONS = {
    "reset": r"unreadable URL: \w+Error: .*\(2 tries\)",
    "truncated": r"unreadable URL: RemoteProtocolError: .*\(2 tries\)",
    "html": r"container truncated",
    "busy": r"unreadable URL: HTTP 503 .*\(2 tries\)",
    "tarpit": r"unreadable URL: timed out after 1 s \(2 tries\)",
    "stall": r"unreadable URL: timed out after 1 s \(2 tries\)",
    "empty": r"container truncated",
    "notfound": r"unreadable URL: HTTP 404",
}


@pytest.mark.timeout(300)
def test_hostile_tar_shards_and_members_are_quarantined_and_ingest_finishes(tmp_path, small_holidays):
    """A list of shard URLs: two good shards, a shard per kind of hostile server (and one served without
    range support), and a shard per kind whose image member ``hostile.jpg`` is served by that kind. Every
    good member is ingested, every hostile shard and member is quarantined with a one-line reason, and
    ``embedpipe ingest`` finishes in a bounded time."""
    served = tmp_path / "served"
    (served / "shards").mkdir(parents=True)
    photos = sorted(small_holidays.glob("*.jpg"))
    assert len(photos) >= 12 + len(MEMBER_REASONS)
    member = [(p.name, p.read_bytes()) for p in photos]
    for i in range(2):  # WebDataset layout: key.jpg + key.cls
        samples = [
            m for p in photos[6 * i : 6 * i + 6] for m in ((p.name, p.read_bytes()), (f"{p.stem}.cls", b"7"))
        ]
        write_tar(served / "shards" / f"good-{i:03d}.tar", samples)
    write_tar(served / "hostile.tar", member[:2])
    for i, kind in enumerate(MEMBER_REASONS):  # the hostile member first: the good one is listed past it
        write_tar(served / f"mixed-{kind}.tar", [("hostile.jpg", member[0][1]), member[12 + i]])
    with serve(served) as (base, _):
        good = [
            f"{base}/shards/good-{i:03d}.tar/{name}"
            for i in range(2)
            for name, _ in member[6 * i : 6 * i + 6]
        ]
        bad_shards = {f"{base}/hostile-tar/{kind}/hostile.tar": why for kind, why in SHARD_REASONS.items()}
        bad_shards[f"{base}/norange/shards/good-000.tar"] = SHARD_REASONS["html"]
        mixed = {kind: f"{base}/hostile-tar/{kind}/mixed-{kind}.tar" for kind in MEMBER_REASONS}
        good += [f"{url}/{member[12 + i][0]}" for i, url in enumerate(mixed.values())]
        bad_members = {f"{url}/hostile.jpg": MEMBER_REASONS[kind] for kind, url in mixed.items()}
        urls = [f"{base}/shards/good-000.tar", *bad_shards, *mixed.values(), f"{base}/shards/good-001.tar"]
        listing = tmp_path / "shards.txt"
        listing.write_text("".join(f"{u}\n" for u in urls))
        cfg = load_config(
            overrides={"images": str(listing)}, sets=[*SETS[:-3], "ingest.timeout_s=1", "ingest.retries=1"]
        )
        start = time.monotonic()
        result = run_ingest(str(listing), tmp_path / "ingested", cfg, 256)
        took = time.monotonic() - start
    assert took < 120, took
    manifest = pd.read_parquet(tmp_path / "ingested" / "manifest.parquet")
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["key"]) == sorted(good) and result.n_ok == len(good)
    assert set(ok[ok["key"].str.contains("/shards/good-")]["label"]) == {"7"}
    bad = manifest[manifest["status"] != "ok"]
    reasons = dict(zip(bad["key"], bad["reason"], strict=True))
    assert sorted(reasons) == sorted({**bad_shards, **bad_members}), reasons
    for key, why in {**bad_shards, **bad_members}.items():
        assert re.search(why, reasons[key]) and "\n" not in reasons[key], (key, reasons[key])
