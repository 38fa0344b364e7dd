import numpy as np
import pytest

from embedpipe.workers.evaluate.metrics import compute_ap, compute_map
from embedpipe.workers.evaluate.protocols import holidays

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


def test_ukbench_and_labels_ground_truth():
    from embedpipe.workers.evaluate.protocols import ground_truth

    uk = ground_truth("ukbench", [f"/u/ukbench{i:05d}.jpg" for i in range(8)])
    assert uk.queries.tolist() == list(range(8)) and uk.positives[5].tolist() == [4, 5, 6, 7]
    assert uk.junk[5].size == 0
    paths = ["/d/cat/a.jpg", "/d/cat/b.jpg", "/d/dog/c.jpg", "/d/dog/sub/d.jpg", "/d/dog/e.jpg"]
    lab = ground_truth("labels", paths, "/d")
    assert lab.group_names == ("cat", "dog") and lab.groups.tolist() == [0, 0, 1, 1, 1]
    assert lab.positives[3].tolist() == [2, 4] and lab.junk[3].tolist() == [3]


def test_precision_recall_and_few_shot():
    from embedpipe.workers.evaluate.metrics import (
        few_shot_accuracy,
        few_shot_classes,
        precision_at_k,
        recall_at_k,
    )

    ranks = np.array([[0, 3, 1, 5, 2, 4]])
    p = precision_at_k(ranks, [np.array([3, 5])], [np.array([0])], (1, 2, 5))
    assert p == pytest.approx({"p@1": 1.0, "p@2": 0.5, "p@5": 0.4})
    assert recall_at_k(np.array([[1, 2, 9]]), np.array([[2, 1, 3]]), 3) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 5
    classes = np.repeat(np.arange(3), 12)
    x = centres[classes] + rng.standard_normal((36, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert few_shot_accuracy(x, classes, 1) > 0.9
    noise = rng.standard_normal((36, 16))
    assert few_shot_accuracy(noise / np.linalg.norm(noise, axis=1, keepdims=True), classes, 5) < 0.7
    assert np.isnan(few_shot_accuracy(x, classes, 12))
    # a class of three images takes no part at five shots (counted by few_shot_classes), and the score is
    # the one of the collection without it; with fewer than two classes left there is no score
    small = rng.standard_normal((3, 16))
    with_small = np.vstack([x, small / np.linalg.norm(small, axis=1, keepdims=True)])
    classes_small = np.concatenate([classes, [3, 3, 3]])
    assert few_shot_classes(classes_small, 5) == 3 and few_shot_classes(classes_small, 2) == 4
    assert few_shot_accuracy(with_small, classes_small, 5) == few_shot_accuracy(x, classes, 5)
    assert few_shot_classes(classes, 12) == 0


def test_pr_curve_by_hand():
    from embedpipe.workers.evaluate.protocols import GroundTruth
    from embedpipe.workers.report.html import RECALLS, pr_curve

    # positives {1, 3} of a query whose junk is {0}: after junk removal the list is [1, 2, 3]
    gt = GroundTruth(np.array([0]), [np.array([1, 3])], [np.array([0])])
    curve = pr_curve(np.array([[0, 1, 2, 3]]), gt)
    # recall 0.5 reached at precision 1 (rank 1), recall 1 at precision 2/3 (rank 3)
    assert curve[RECALLS <= 0.5] == pytest.approx(1.0)
    assert curve[RECALLS > 0.5] == pytest.approx(2 / 3)
