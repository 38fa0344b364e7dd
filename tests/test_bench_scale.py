"""`embedpipe bench scale`: the synthetic run directory it writes (Holidays groups the protocol finds,
distractor parts the fit leaves out), its cached input shards (real JPEGs the listing plans), and the
whole bench at two tiny sizes through the CLI, whose JSON must carry real measurements."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from embedpipe.flows.benchmarks.scale import NOISE, groups_for, input_shards, layout_rows, write_collection
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import fit_part_rows, part_row_counts, read_features, read_store_manifest
from embedpipe.storage.inputs import is_distractor
from embedpipe.workers.evaluate.protocols import holidays
from embedpipe.workers.ingest.sources import list_inputs, read_input

from .helpers import embedpipe

pytestmark = pytest.mark.slow


def test_collection_has_holidays_groups_and_distractor_parts(tmp_path):
    rows, dim = 2000, 16
    counts = write_collection(tmp_path, rows, dim)
    store = RunLayout(tmp_path).feature_dir("gem")
    meta, x = read_features(store)
    paths = meta.column("path").to_pylist()
    assert len(paths) == rows == counts["rows"] and x.shape == (rows, dim)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert len(set(meta.column("id").to_pylist())) == rows
    assert read_store_manifest(store)["dim"] == dim and read_store_manifest(store)["backbone"]
    # the protocol finds the planted groups: each query's positives are its noisy copies (cosine about
    # 1 / sqrt(1 + NOISE²) to it), ranked near the top of the collection
    gt = holidays([p for p in paths if not is_distractor(p)])
    assert gt.queries.size == groups_for(rows) and all(len(p) == 3 for p in gt.positives)
    cosines, ranks = [], []
    for q, pos in zip(gt.queries, gt.positives, strict=True):
        sims = x[: len(gt.groups)] @ x[q]
        cosines += sims[pos].tolist()
        ranks += np.flatnonzero(np.isin(np.argsort(-sims), pos)).tolist()
    assert abs(np.mean(cosines) - (1 + NOISE**2) ** -0.5) < 0.05
    assert np.median(ranks) < len(gt.groups) / 20
    # the distractors: the last half of the filler, in parts holding nothing else, left out of the fit
    distractors = sum(map(is_distractor, paths))
    assert distractors == counts["distractors"] == layout_rows(rows)[2] > 0
    assert not any(map(is_distractor, paths[: rows - distractors]))
    fitted = fit_part_rows(store)
    assert 0 < len(fitted) < len(part_row_counts(store))
    assert sum(n for _, n in fitted) == rows - distractors


def test_input_shards_are_real_distinct_jpegs_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pattern = input_shards(1200)
    listing = list_inputs(pattern)
    assert len(listing.refs) == 1200 and not listing.problems
    data = [read_input(r.uri, r.offset, r.length) for r in listing.refs[::97]]
    assert len(set(data)) == len(data)
    for blob in data[:3]:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            assert img.format == "JPEG" and img.size == (16, 16)
    shards = sorted((tmp_path / "embedpipe" / "bench-scale" / "inputs-1200").glob("*.tar"))
    stamps = [s.stat().st_mtime_ns for s in shards]
    assert input_shards(1200) == pattern  # reused, not written again
    assert [s.stat().st_mtime_ns for s in shards] == stamps


def test_bench_scale_two_tiny_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the CLI's input shards
    out = tmp_path / "scale.json"
    done = embedpipe("bench", "scale", "--rows", "1000,1500", "--dim", "16", "--json", out, ephemeral=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["name"] == "scale" and result["machine"]["cores"] >= 1 and result["date"]
    sizes = result["sizes"]
    assert [s["rows"] for s in sizes] == [1000, 1500]
    for size in sizes:
        assert size["inputs"] == size["rows"]
        assert set(size["stages"]) == {"plan", "fit", "index_evaluate", "report"}
        assert all(v > 0 for v in size["stages"].values()), size["stages"]
        assert size["driver_peak_rss_mb"] > 50 and size["worker_peak_rss_mb"] > 50
        assert size["store_mb"] > 0
        # 3 positives per query among ``rows`` rows: a random ranking's AP is about 3 / rows (0.003 here);
        # at 16 dims (PQ2 codes, whitened to 8) the planted copies are found, though not all on top
        assert 10 * 3 / size["rows"] < size["map"] <= 1.0, size["maps"]
        assert size["map"] == size["maps"][size["map_row"].split(" ", 1)[1]]
        assert max(size["maps"].values()) > 0.2, size["maps"]
        # the same row under exact search: at 16 dims the PQ2 codes lose most of what exact search finds
        assert size["maps"]["l2 none"] < size["exact_map_l2"] <= 1.0, (size["exact_map_l2"], size["maps"])
        # DBA on the sharded index, part by part on Ray: both variants, each with its seconds
        assert len(size["dba_seconds"]) == 2, size["dba_seconds"]
        assert all(v["parts"] > 0 and v["index"] > 0 for v in size["dba_seconds"].values())
    assert [s["factory"] for s in sizes] == ["IVF16,PQ2", "IVF16,PQ2"]
    assert [(s["nprobe"], s["dba_nprobe"]) for s in sizes] == [(16, 16), (16, 16)]
    small, large = sizes
    assert result["rss_ratio"] == round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 4)
    per_row = [sum(s["stages"].values()) / s["rows"] for s in sizes]
    assert result["time_per_row_ratio"] == pytest.approx(per_row[1] / per_row[0], rel=1e-3)


def test_inverted_lists_grow_with_the_collection():
    """Each size's index keeps 256 to 511 rows per list, so a query's scan costs the same at every size
    (DBA searches every row: with one nlist for all sizes its work grew with the square of the rows)."""
    from embedpipe.flows.benchmarks.scale import factory_for, nlist_for, nprobe_for, train_size_for

    for rows in (200_000, 2_000_000, 10_000_000):
        assert 256 <= rows / nlist_for(rows) < 512
        assert train_size_for(rows) >= 39 * nlist_for(rows)
    assert factory_for(2_000_000, 256) == "IVF4096,PQ32" and train_size_for(2_000_000) == 163_840
    assert factory_for(200_000, 256) == "IVF512,PQ32" and train_size_for(200_000) == 100_000
    assert factory_for(10_000_000, 256) == "IVF32768_HNSW32,PQ32" and train_size_for(10_000_000) == 1_310_720
    # queries probe 16 lists up to 2M rows, then the same fraction of the lists as at 2M
    assert [nprobe_for(r) for r in (200_000, 2_000_000, 10_000_000)] == [16, 16, 128]
