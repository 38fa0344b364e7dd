"""Linear probes over frozen features (``labels`` protocol): multinomial logistic regression trained on a
seeded split of the collection, beside the kNN few-shot scores of ``metrics.few_shot_accuracy``.

``probe@full``: a stratified split, half of each class (rounded down, at least one image) to train and the
rest to test, over the classes with at least two images. ``probe@s``: the few-shot episodes of
``few_shot_accuracy`` (the same seeded support draws, so the linear and the 1-NN classifier see the same
support), ``s`` training images per class with more than ``s`` images, every other image of those classes
tested; the mean accuracy over the episodes. The regression (scikit-learn's lbfgs solver: deterministic)
takes the features as evaluated, L2-normalised: standardising them on a few training images would blow up
the dimensions those images leave near zero (most of a ReLU feature map's), noise that then decides the
test images' classes.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from embedpipe.workers.evaluate.metrics import few_shot_classes, few_shot_episodes

log = logging.getLogger("embedpipe.evaluate")

SHOTS = (1, 5, 10)
EPISODES = 5
C = 1.0  # inverse L2 regularisation strength of the regression, on L2-normalised features
MAX_ITER = 1000


def probe_accuracy(
    vectors: np.ndarray, classes: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int
) -> float:
    """Accuracy on the rows ``test`` of a logistic regression fitted on the rows ``train``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(vectors[train], classes[train])
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("linear probe: not converged in %d iterations (%d training images)", MAX_ITER, len(train))
    predicted = model.predict(vectors[test])
    return float((predicted == classes[test]).mean())


def stratified_split(classes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows: per class with at least two images, a seeded half (rounded down) to train and
    the rest to test; classes with a single image take no part."""
    rng = np.random.default_rng([seed, 0])
    train, test = [], []
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        if len(rows) < 2:
            continue
        rows = rng.permutation(rows)
        half = len(rows) // 2
        train.append(rows[:half])
        test.append(rows[half:])
    if not train:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def full_probe(vectors: np.ndarray, classes: np.ndarray, seed: int) -> tuple[float, int]:
    """(accuracy, classes scored) of the probe on the stratified half split; NaN with fewer than two
    classes of at least two images."""
    train, test = stratified_split(classes, seed)
    n_classes = len(np.unique(classes[train]))
    if n_classes < 2:
        return float("nan"), n_classes
    return probe_accuracy(vectors, classes, train, test, seed), n_classes


def few_shot_probe(
    vectors: np.ndarray, classes: np.ndarray, shots: int, seed: int, episodes: int = EPISODES
) -> float:
    """Mean probe accuracy over ``episodes`` seeded episodes of ``shots`` training images per class (the
    support draws of ``few_shot_accuracy``); NaN when fewer than two classes have more than ``shots``."""
    accuracies = [
        probe_accuracy(vectors, classes, support, test, seed)
        for support, test in few_shot_episodes(classes, shots, episodes, seed)
    ]
    return float(np.mean(accuracies)) if accuracies else float("nan")


def linear_probe_scores(vectors: np.ndarray, classes: np.ndarray, seed: int) -> dict[str, float | int]:
    """``probe@full`` and its ``probe@full_classes``, then ``probe@s`` and ``probe@s_classes`` for s in
    1, 5, 10 (the classes of ``fewshot@s``): accuracies in [0, 1], NaN where too few images."""
    vectors = np.asarray(vectors, dtype=np.float32)
    classes = np.asarray(classes)
    if len(vectors) != len(classes):
        raise ValueError(f"{len(vectors)} vectors for {len(classes)} class labels")
    accuracy, n_classes = full_probe(vectors, classes, seed)
    out: dict[str, float | int] = {"probe@full": accuracy, "probe@full_classes": n_classes}
    for s in SHOTS:
        out[f"probe@{s}"] = few_shot_probe(vectors, classes, s, seed)
        out[f"probe@{s}_classes"] = few_shot_classes(classes, s)
    return out
