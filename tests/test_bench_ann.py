"""bench pca / bench index (flows/benchmarks/pca.py, index.py, store.py) on tiny stores: JSON shape and
sanity (timings are reported, never asserted); bench index --baseline autofaiss against the real autofaiss
(installed once per machine into the cache folder the bench uses)."""

import json

import numpy as np
import pytest

from embedpipe.flows.benchmarks.index import autofaiss_python, load_vectors, recall_at
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
    out = embedpipe("bench", "index", "--baseline", "autofaiss", "--budget-mb", 0)
    assert out.returncode == 2 and "--budget-mb must be positive" in out.stderr
    out = embedpipe("bench", "index", "--baseline", "autofaiss", "--baseline-python", "/nonexistent/python")
    assert out.returncode == 2 and "--baseline-python /nonexistent/python" in out.stderr


def test_baseline_vectors_from_files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((1500, 8)))
    np.save(tmp_path / "q.npy", rng.standard_normal((7, 8)).astype(np.float32))
    x, q = load_vectors(tmp_path / "x.npy", tmp_path / "q.npy")
    assert x.shape == (1500, 8) and q.shape == (7, 8) and x.dtype == q.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    # without queries, 1,000 seeded rows are held out of the database
    x, q = load_vectors(tmp_path / "x.npy", None)
    assert x.shape == (500, 8) and q.shape == (1000, 8)
    assert not (np.abs(x @ q.T) > 1 - 1e-6).any()


@pytest.fixture(scope="session")
def autofaiss_py():
    """autofaiss's Python in the bench's own cache folder: installed from PyPI on a machine's first run
    (about a minute), reused after."""
    return autofaiss_python()


@pytest.mark.slow
def test_bench_index_against_autofaiss(tmp_path, autofaiss_py):
    """Both sides on 5,000 x 32 synthetic vectors under 0.25 MiB: the same 1,000 held-out queries, measured
    alike; ours reaches the target recall on the whole database and fits the budget."""
    out_json = tmp_path / "autofaiss.json"
    out = embedpipe(
        "bench", "index", "--baseline", "autofaiss", "--rows", 5000, "--dim", 32, "--parts", 2,
        "--budget-mb", 0.25, "--store", tmp_path / "store", "--baseline-python", autofaiss_py,
        "--json", out_json,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["mode"] == "baseline autofaiss" and (result["rows"], result["dim"]) == (5000, 32)
    assert result["budget"] == {"mb": 0.25, "bytes": 2**18, "bytes_per_vector": 52}
    base, ours = result["baseline"], result["ours"]
    assert base["system"] == "autofaiss" and base["versions"]["autofaiss"] == "2.18.0" and base["index_key"]
    assert base["settings"]["max_index_memory_usage"] == f"{2**18}B" and base["settings"]["nb_cores"] >= 1
    for side in (base, ours):
        assert 0 <= side["recall_at_10"] <= 1 and 0 <= side["one_recall_at_10"] <= 1
        assert side["qps"] > 0 and side["build_s"] > 0 and side["bytes_per_vector"] > 0
        assert side["queries_sha256"] == result["queries"]["sha256"]  # the same queries on both sides
    assert result["queries"]["n"] == 1000
    assert ours["recall_at_10"] >= ours["settings"]["target_recall"] == 0.9
    assert ours["within_budget"] and ours["bytes_per_vector"] <= 52
    assert ours["build_s"] >= ours["choice_s"] > 0 and "held-out sample queries" in ours["chosen_on"]
    assert result["ratio"] == pytest.approx(base["build_s"] / ours["build_s"], rel=1e-2)


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
