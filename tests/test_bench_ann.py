"""bench pca / bench index (flows/benchmarks/pca.py, index.py, store.py) on tiny stores: JSON shape and
sanity (timings are reported, never asserted)."""

import json

import numpy as np
import pytest

from embedpipe.flows.benchmarks.index import recall_at
from embedpipe.flows.benchmarks.store import synthetic_store
from embedpipe.storage.features import read_features

from .helpers import embedpipe


def test_bench_pca_tiny(tmp_path):
    out_json = tmp_path / "pca.json"
    out = embedpipe(
        "bench", "pca", "--rows", 3000, "--dim", 32, "--parts", 3, "--components", 16,
        "--store", tmp_path / "store", "--json", out_json,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["name"] == "pca" and result["rows"] == 3000
    for way in ("ours", "in_memory", "baseline"):
        assert result[way]["n"] == 3000 and result[way]["time_s"] > 0 and result[way]["peak_rss_mb"] > 0
    # the three ways fit the same spectrum, all 16 eigenvalues (checked by the bench, seen here)
    assert max(result["eigvals_max_rel_diff"].values()) < 1e-3
    assert len(result["ours"]["eigvals"]) == len(result["baseline"]["eigvals"]) == 16
    assert result["ours"]["eigvals"] == pytest.approx(result["baseline"]["eigvals"], rel=1e-3)
    assert result["ours"]["scheduler"] == "ray" and result["ours"]["ray_start_s"] > 0
    assert result["ratio"] > 0 and result["ratio_in_memory"] > 0
    assert result["date"] and result["machine"]["cores"] >= 1  # stamped by write_result
    assert json.loads(out.stdout) == result


def test_bench_index_tiny(tmp_path):
    out_json = tmp_path / "index.json"
    out = embedpipe(
        "bench", "index", "--rows", 4000, "--dim", 16, "--parts", 4, "--factory", "IVF16,PQ4x4",
        "--growth", "1000,2000", "--store", tmp_path / "store", "--json", out_json,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["name"] == "index" and result["factory"] == "IVF16,PQ4x4"
    assert result["sharded_equals_single"] is True and result["bytes_per_vector"] == 2
    assert result["ratio"] > 0 and result["ratio_one_core"] > 0 and result["workers"] >= 1
    # the baseline is one process on every FAISS thread; each side warmed once, then timed twice
    mean = {side: np.mean(result[side]["runs_s"]) for side in ("ours", "baseline")}
    assert result["ratio"] == pytest.approx(mean["baseline"] / mean["ours"], rel=0.05)
    for side in ("ours", "baseline", "one_core"):
        assert len(result[side]["runs_s"]) == 2 and result[side]["cold_s"] > 0
    assert [g["vectors"] for g in result["growth"]] == [1000, 2000]
    sweep = result["search"]["sweep"]
    assert sweep and all(0 <= s["recall"] <= 1 for s in sweep)
    assert [s["nprobe"] for s in sweep] == [2**i for i in range(len(sweep))]


def test_bench_bad_sizes():
    out = embedpipe("bench", "pca", "--rows", 100, "--dim", 8, "--components", 9)
    assert out.returncode == 2 and "--components must be in [1, 8]" in out.stderr
    out = embedpipe("bench", "index", "--rows", 1)
    assert out.returncode == 2 and "--rows must be at least 2" in out.stderr
    out = embedpipe("bench", "index", "--rows", 100, "--growth", "1,x")
    assert out.returncode == 2 and "--growth expects comma-separated sizes" in out.stderr


def test_synthetic_store_is_written_once_and_normalised(tmp_path):
    store = synthetic_store(tmp_path / "s", 50, 8, 3)
    ids, x = read_features(store)
    assert len(ids) == 50 and x.shape == (50, 8) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    parts = sorted(p.name for p in store.iterdir())
    before = {p: (store / p).stat().st_mtime_ns for p in parts}
    assert synthetic_store(store, 50, 8, 3) == store  # reused, not rewritten
    assert {p: (store / p).stat().st_mtime_ns for p in parts} == before


def test_recall_at_k():
    found = np.array([[3, 1, 2], [0, 4, 5]])
    assert recall_at(found, np.array([1, 5]), 2) == 0.5 and recall_at(found, np.array([1, 5]), 3) == 1.0
