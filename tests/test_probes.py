"""Linear probes on frozen features: known answers on seeded synthetic features (separable clusters,
random labels), class counts, NaN where too few images, determinism."""

import json
import math

import numpy as np
import pytest

from embedpipe.workers.evaluate.metrics import few_shot_accuracy
from embedpipe.workers.evaluate.probes import (
    few_shot_probe,
    linear_probe_scores,
    stratified_split,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clusters(n_classes: int, per_class: int, dim: int, spread: float, seed: int = 0):
    """Unit vectors around ``n_classes`` random centres (``spread``: noise scale), classes in order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    classes = np.repeat(np.arange(n_classes), per_class)
    x = centres[classes] + spread * rng.standard_normal((len(classes), dim))
    return _unit(x), classes


def test_separable_clusters_score_one():
    x, classes = clusters(6, 16, 32, spread=0.1)
    scores = linear_probe_scores(x, classes, seed=0)
    for key in ("probe@full", "probe@1", "probe@5", "probe@10"):
        assert scores[key] == pytest.approx(1.0), (key, scores)
    assert scores["probe@full_classes"] == 6
    assert scores["probe@1_classes"] == scores["probe@10_classes"] == 6


def test_random_labels_score_chance():
    """Features that say nothing of the label: the held-out accuracy is chance (1/4), not the training
    fit a probe reaches on its own training images."""
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((800, 16)))
    classes = rng.integers(0, 4, len(x))
    scores = linear_probe_scores(x, classes, seed=0)
    for key in ("probe@full", "probe@1", "probe@5", "probe@10"):
        assert abs(scores[key] - 0.25) < 0.06, (key, scores)


def test_weak_signal_grows_with_shots():
    x, classes = clusters(5, 60, 64, spread=3.0, seed=2)
    s = linear_probe_scores(x, classes, seed=0)  # about 0.38, 0.64, 0.73, 0.80
    assert 0.25 < s["probe@1"] < s["probe@5"] < s["probe@10"] < s["probe@full"] < 0.95, s


def relu_features(n_classes: int, per_class: int, dim: int, seed: int):
    """Sparse non-negative unit vectors, as a ReLU feature map pools to: most dimensions near zero."""
    rng = np.random.default_rng(seed)
    centres = np.maximum(rng.standard_normal((n_classes, dim)), 0)
    classes = np.repeat(np.arange(n_classes), per_class)
    x = np.maximum(centres[classes] + 0.5 * rng.standard_normal((len(classes), dim)) - 0.8, 0)
    return _unit(x + 1e-3 * rng.random(x.shape)), classes


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_features_few_images(seed):
    """Three classes of seven images in 1280 dims, most of them near zero: the probe classifies them all
    (standardising the dimensions on the few training images instead scored chance here)."""
    x, classes = relu_features(3, 7, 1280, seed)
    s = linear_probe_scores(x, classes, seed=0)
    assert s["probe@full"] == s["probe@5"] == 1.0 and s["probe@1"] >= 0.9, s


def test_too_few_images_give_nan():
    # classes of 3, 3 and 12 images: 1-shot scores all three, 5-shot only one class (NaN), full split all
    x, _ = clusters(3, 12, 8, spread=0.1)
    classes = np.array([0] * 3 + [1] * 3 + [2] * 12)
    s = linear_probe_scores(x[: len(classes)], classes, seed=0)
    assert s["probe@1_classes"] == 3 and s["probe@5_classes"] == 1 and s["probe@10_classes"] == 1
    assert not math.isnan(s["probe@1"]) and math.isnan(s["probe@5"]) and math.isnan(s["probe@10"])
    assert s["probe@full_classes"] == 3 and not math.isnan(s["probe@full"])
    single = linear_probe_scores(x[:4], np.array([0, 1, 2, 2]), seed=0)  # one class with two images
    assert math.isnan(single["probe@full"]) and single["probe@full_classes"] == 1


def test_stratified_split_halves_each_class():
    classes = np.array([0] * 7 + [1] * 4 + [2])
    train, test = stratified_split(classes, seed=3)
    assert np.bincount(classes[train], minlength=3).tolist() == [3, 2, 0]
    assert np.bincount(classes[test], minlength=3).tolist() == [4, 2, 0]
    assert not set(train) & set(test)
    again, _ = stratified_split(classes, seed=3)
    other, _ = stratified_split(classes, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_deterministic_and_seeded():
    x, classes = clusters(5, 20, 32, spread=1.4, seed=5)
    a = linear_probe_scores(x, classes, seed=7)
    b = linear_probe_scores(x.copy(), classes.copy(), seed=7)
    assert a == b
    c = linear_probe_scores(x, classes, seed=8)
    assert any(a[k] != c[k] for k in ("probe@1", "probe@5", "probe@full"))


def test_same_episodes_as_knn():
    """The probe's episodes draw the support images of the kNN few-shot episodes: on well-separated
    clusters both classify every other image right."""
    x, classes = clusters(4, 12, 16, spread=0.2, seed=6)
    assert few_shot_probe(x, classes, 1, seed=0) == few_shot_accuracy(x, classes, 1, seed=0) == 1.0


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="3 vectors for 2 class labels"):
        linear_probe_scores(np.zeros((3, 4)), np.array([0, 1]), seed=0)


def test_report_shows_the_probe_columns(tmp_path):
    """The HTML report's metrics table gains the probe columns when the rows carry them (a labels run
    whose rankings are not kept here: no winner, no figures, just the table)."""
    from embedpipe.storage.contracts.config import Config
    from embedpipe.storage.contracts.layout import RunLayout
    from embedpipe.workers.report.html import build_report

    layout = RunLayout(tmp_path / "run")
    layout.report_dir.mkdir(parents=True)
    row = {"descriptor": "gem", "post": "l2", "rerank": "none", "dim": 8, "map": None, "fewshot@1": 0.5}
    row.update({"probe@1": 0.625, "probe@5": 0.75, "probe@10": None, "probe@full": 0.875})
    metrics = {
        "protocol": "labels",
        "dataset": {"path": "x", "n_images": 9, "n_queries": 9},
        "results": [row],
    }
    layout.metrics.write_text(json.dumps(metrics))
    page = build_report(layout, Config())
    for head in ("1-shot probe", "5-shot probe", "10-shot probe", "linear probe"):
        assert f"<th>{head}</th>" in page
    assert "<td>0.6250</td><td>0.7500</td><td></td><td>0.8750</td>" in page
