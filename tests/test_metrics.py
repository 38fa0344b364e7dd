import numpy as np
import pytest

from embedpipe.workers.metrics import compute_ap, compute_map
from embedpipe.workers.protocols import holidays

from .revisitop_reference import revisitop_compute_map as _revisitop_reference


def test_ap_hand_computed():
    # positives at ranks 0, 2, 5 of 3: (1+1)/2/3 + (1/2+2/3)/2/3 + (2/5+3/6)/2/3
    assert compute_ap(np.array([0, 2, 5]), 3) == pytest.approx(0.6777777777, abs=1e-9)
    assert compute_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    # one positive at rank 1: precision goes 0/1 -> 1/2, trapezoid = 0.25 (sklearn's AP would say 0.5)
    assert compute_ap(np.array([1]), 1) == pytest.approx(0.25)
    # a positive never retrieved counts in nres only
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5)


def test_map_junk_removed_before_counting():
    # database rows 0..5; query's positives {3, 5}, junk {0}
    ranks = np.array([[0, 3, 1, 5, 2, 4]])
    out = compute_map(ranks, [np.array([3, 5])], [np.array([0])])
    # after removing junk the positives sit at ranks 0 and 2
    assert out["map"] == pytest.approx(compute_ap(np.array([0, 2]), 2))
    assert out["mp@1"] == pytest.approx(1.0)
    assert out["mp@5"] == pytest.approx(2 / 3)  # k capped at the last positive's rank (3)


def test_map_skips_queries_without_positives_and_handles_truncation():
    ranks = np.array([[1, 2], [0, 1]])
    out = compute_map(ranks, [np.array([9]), np.array([], dtype=int)])
    assert np.isnan(out["aps"][1])
    assert out["map"] == 0.0 and out["n_queries"] == 1
    assert out["mp@10"] == 0.0


def test_map_matches_revisitop_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, nq = 60, 25
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)])
    gnd = []
    for _ in range(nq):
        rows = rng.permutation(n_db)
        gnd.append({"ok": rows[: rng.integers(1, 8)], "junk": rows[10 : 10 + rng.integers(0, 6)]})
    ref_map, ref_pr = _revisitop_reference(ranks.T.copy(), gnd, [1, 5, 10])
    out = compute_map(ranks, [g["ok"] for g in gnd], [g["junk"] for g in gnd], (1, 5, 10))
    assert out["map"] == pytest.approx(ref_map, abs=1e-12)
    assert [out["mp@1"], out["mp@5"], out["mp@10"]] == pytest.approx(list(ref_pr), abs=1e-12)


def test_holidays_ground_truth_from_names():
    paths = [
        "/d/100000.jpg",
        "/d/100001.jpg",
        "/d/100002.jpg",
        "/d/100100.jpg",
        "/d/100101.jpg",
        "/d/200001.jpg",
        "/d/readme.jpg",
    ]
    gt = holidays(paths)
    assert gt.queries.tolist() == [0, 3]
    assert gt.positives[0].tolist() == [1, 2] and gt.positives[1].tolist() == [4]
    assert gt.junk[0].tolist() == [0] and gt.junk[1].tolist() == [3]
