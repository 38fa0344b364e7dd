"""Index choice under a memory budget and a target recall, on seeded clustered data."""

import numpy as np
import pytest

from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.index.choose import auto_candidates, choose_index, nlist_for, recall_at_k


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 20)
    centres = rng.standard_normal((100, 32))
    x = centres[labels] + 0.5 * rng.standard_normal((2000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    queries = np.arange(0, 2000, 20)
    positives = [np.setdiff1d(np.flatnonzero(labels == labels[q]), [q]) for q in queries]
    gt = GroundTruth(queries=queries, positives=positives, junk=[np.array([q]) for q in queries])
    return x, gt


def test_recall_at_k_brute_force():
    found = np.array([[1, 2, 3], [4, 5, 6]])
    truth = np.array([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(found, truth, 3) == pytest.approx((2 / 3 + 0) / 2)


def test_candidates_cover_the_families():
    names = auto_candidates(32, 2000)
    assert nlist_for(2000) == 32 and "Flat" in names and "HNSW32" in names and "LSH" in names
    assert "IVF32,Flat" in names and any(n.startswith("IVF32,PQ") for n in names)


def test_pick_fits_budget_and_reaches_target(clustered):
    x, gt = clustered
    pick, rows = choose_index(x, gt, budget=16, target=0.5)
    assert sum(r["picked"] for r in rows) == 1 and pick["picked"]
    assert pick["bytes_per_vector"] <= 16 and pick["recall"] >= 0.5
    exact = next(r for r in rows if r["index"] == "Flat")
    assert exact["recall"] == 1.0 and exact["bytes_per_vector"] == 128
    feasible = [r for r in rows if r["bytes_per_vector"] <= 16 and r["recall"] >= 0.5]
    assert pick["map"] == max(r["map"] for r in feasible)  # mAP-aware
    for r in rows:
        assert {"index", "bytes_per_vector", "recall", "qps", "build_s", "map"} <= set(r)
    # IVF candidates swept nprobe until the target or all lists
    ivf = next(r for r in rows if r["index"] == "IVF32,Flat")
    assert ivf["param"] == "nprobe" and (ivf["recall"] >= 0.5 or ivf["value"] == 32)


def test_no_candidate_fits(clustered):
    x, _ = clustered
    with pytest.raises(InputError, match="no index candidate fits"):
        choose_index(x, None, budget=1, target=0.9)
