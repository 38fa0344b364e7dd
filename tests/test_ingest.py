"""`embedpipe ingest` over HTTP from a real server on 127.0.0.1: resized WebDataset shards, the dataset
manifest, quarantined URLs, resume of an interrupted ingest, byte-identical shards."""

import io
import shutil

import pandas as pd
import pytest
from PIL import Image

from embedpipe.workers.ingest.sources import list_inputs, read_input

from .helpers import embedpipe
from .http_fixture import serve

pytestmark = pytest.mark.slow


def test_ingest_url_list_resumes_and_feeds_a_run(tmp_path, small_holidays):
    served = tmp_path / "www"
    shutil.copytree(small_holidays, served)
    files = sorted(served.glob("*.jpg"))
    shutil.copy(files[0], served / "again.jpg")  # exact duplicate under another name
    names = [f.name for f in files] + ["again.jpg", "gone.jpg"]
    (served / "urls.csv").write_text("url,label\n" + "".join(f"{n},{n[:4]}\n" for n in names))
    out = tmp_path / "ingested"
    with serve(served) as (base, hits):
        first = embedpipe(
            "ingest", f"{base}/urls.csv", "--out", out, "--max-side", 128, "--set", "extract.shard_size=8"
        )
        assert first.returncode == 0, first.stderr[-3000:]
        assert "quarantined" in first.stdout and "1 exact duplicate(s)" in first.stdout
        manifest = pd.read_parquet(out / "manifest.parquet")
        assert len(manifest) == len(names) and list(manifest["key"]) == [f"{base}/{n}" for n in names]
        gone = manifest.set_index("key").loc[f"{base}/gone.jpg"]
        assert gone["status"] == "quarantined" and "HTTP 404" in gone["reason"]
        assert manifest.set_index("key").loc[f"{base}/again.jpg", "duplicate_of"] == f"{base}/{files[0].name}"
        shards = sorted(out.glob("shard-*.tar"))
        assert len(shards) == -(-len(names) // 8)
        original = {p.name: p.read_bytes() for p in shards}

        # interrupted ingest: one shard missing -> only that shard is fetched again, to the same bytes
        shards[1].unlink()
        n_hits = sum(hits.values())
        again = embedpipe(
            "ingest", f"{base}/urls.csv", "--out", out, "--max-side", 128, "--set", "extract.shard_size=8"
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"1 shard(s) written, {len(shards) - 1} kept" in again.stdout
        assert sum(hits.values()) - n_hits == 1 + 8  # the list, then shard 1's eight images
        assert {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))} == original

    # the folder is an input of its own: every usable image, downscaled, with its label
    listing = list_inputs(out)
    assert len(listing.refs) == len(names) - 1 and not listing.problems
    for ref in listing.refs:
        with Image.open(io.BytesIO(read_input(ref.uri, ref.offset, ref.length))) as img:
            assert max(img.size) <= 128
        assert ref.label == ref.key.rsplit("/", 1)[-1][:4]
