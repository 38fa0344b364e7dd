"""Retrieval metrics, exactly as the reference code computes them (pure numpy).

``compute_ap`` and ``compute_map`` follow revisitop's ``evaluate.py`` (Radenović et al., 2018):
trapezoidal AP over the ranks of the positives, junk images removed from the ranking before the
positions are counted, mP@k with k capped at the rank of the last positive. The INRIA Holidays
evaluation script (``holidays_map.py``) computes the same trapezoid AP.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Trapezoidal average precision.

    ranks: zero-based positions of the retrieved positives, increasing, junk already removed.
    nres: number of positives in the ground truth (retrieved or not)."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(np.asarray(ranks).tolist()):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def compute_map(
    ranks: np.ndarray,
    positives: Sequence[np.ndarray],
    junk: Sequence[np.ndarray] | None = None,
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, object]:
    """mAP, per-query AP and mP@k.

    ranks: (n_queries, n_ranked) database indices, best first, possibly truncated.
    positives[i], junk[i]: database indices of query i's positives and junk images.
    Queries without positives get NaN and are left out of the means (as revisitop does)."""
    ranks = np.asarray(ranks)
    nq = len(positives)
    if ranks.ndim != 2 or ranks.shape[0] != nq:
        raise ValueError(f"ranks must be (n_queries={nq}, n_ranked), got {ranks.shape}")
    junk = junk if junk is not None else [np.empty(0, dtype=np.int64)] * nq
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    positions = np.arange(ranks.shape[1])
    for i in range(nq):
        qgnd = np.asarray(positives[i])
        if qgnd.size == 0:
            continue
        pos = positions[np.isin(ranks[i], qgnd)]
        junkpos = positions[np.isin(ranks[i], np.asarray(junk[i]))]
        # shift each positive up by the number of junk images ranked before it
        pos = pos - np.searchsorted(junkpos, pos)
        aps[i] = compute_ap(pos, len(qgnd))
        pos1 = pos + 1
        for j, kappa in enumerate(kappas):
            if pos1.size == 0:
                prs[i, j] = 0.0
                continue
            kq = min(int(pos1.max()), kappa)
            prs[i, j] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    out: dict[str, object] = {
        "map": float(aps[valid].mean()) if valid.any() else float("nan"),
        "aps": aps,
        "n_queries": int(valid.sum()),
    }
    for j, kappa in enumerate(kappas):
        out[f"mp@{kappa}"] = float(prs[valid, j].mean()) if valid.any() else float("nan")
    return out


def ns_score(ranks: np.ndarray, groups: np.ndarray, queries: np.ndarray | None = None, top: int = 4) -> float:
    """UKBench N-S score (Nistér & Stewénius): mean number of the query's group among its top 4 results,
    the query itself included (it is in the database). In [0, 4].

    ranks: (n_queries, n_ranked) database rows; groups: (n_database,) group of each database image
    (-1 for distractors); queries: the database row of each query (default: query i = row i, every
    image a query)."""
    ranks = np.asarray(ranks)[:, :top]
    groups = np.asarray(groups)
    queries = np.arange(len(groups)) if queries is None else np.asarray(queries)
    if ranks.shape[0] != queries.shape[0]:
        raise ValueError(f"ukbench ranks need one row per query ({queries.shape[0]}), got {ranks.shape[0]}")
    found = np.where(ranks >= 0, groups[np.maximum(ranks, 0)], -2)
    return float((found == groups[queries][:, None]).sum(axis=1).mean())


def precision_at_k(
    ranks: np.ndarray,
    positives: Sequence[np.ndarray],
    junk: Sequence[np.ndarray],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Plain precision@k (positives among the first k results, junk removed first), averaged over queries."""
    out = {}
    kept = [row[~np.isin(row, j)] for row, j in zip(np.asarray(ranks), junk, strict=True)]
    for k in kappas:
        out[f"p@{k}"] = float(
            np.mean([np.isin(row[:k], pos).sum() / k for row, pos in zip(kept, positives, strict=True)])
        )
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """k-recall@k of an approximate search: the share of the exact top-k that the approximate top-k
    also returns, averaged over queries. approx, exact: (n_queries, >= k) database ids."""
    approx, exact = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    return float(np.mean([np.isin(e, a).sum() / k for a, e in zip(approx, exact, strict=True)]))


def _shot_classes(classes: np.ndarray, shots: int) -> list:
    names, counts = np.unique(classes, return_counts=True)
    return [c for c, n in zip(names, counts, strict=True) if n > shots]


def few_shot_classes(classes: np.ndarray, shots: int) -> int:
    """How many classes ``few_shot_accuracy`` at ``shots`` scores: those with more than ``shots`` images
    (one left to classify besides the support)."""
    return len(_shot_classes(np.asarray(classes), shots))


def few_shot_accuracy(
    vectors: np.ndarray, classes: np.ndarray, shots: int, episodes: int = 5, seed: int = 0
) -> float:
    """kNN (1-NN, cosine) few-shot classification over frozen, L2-normalised features.

    Each episode draws ``shots`` support images per class (classes with more than ``shots`` images),
    classifies every other image of those classes by its nearest support image; the accuracy is the
    mean over seeded episodes. Classes with ``shots`` images or fewer take no part (``few_shot_classes``
    counts those that do); NaN when fewer than two classes have enough images."""
    classes = np.asarray(classes)
    accuracies = []
    for support, test in few_shot_episodes(classes, shots, episodes, seed):
        nearest = support[np.argmax(vectors[test] @ vectors[support].T, axis=1)]
        accuracies.append(float((classes[nearest] == classes[test]).mean()))
    return float(np.mean(accuracies)) if accuracies else float("nan")


def few_shot_episodes(
    classes: np.ndarray, shots: int, episodes: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(support rows, test rows) of each seeded few-shot episode: ``shots`` support images drawn per class
    with more than ``shots`` images, every other image of those classes to classify; no episode when
    fewer than two classes have enough images."""
    classes = np.asarray(classes)
    eligible = _shot_classes(classes, shots)
    if len(eligible) < 2:
        return
    for episode in range(episodes):
        rng = np.random.default_rng([seed, shots, episode])
        support = np.concatenate(
            [rng.choice(np.flatnonzero(classes == c), shots, replace=False) for c in eligible]
        )
        test = np.flatnonzero(np.isin(classes, eligible) & ~np.isin(np.arange(len(classes)), support))
        yield support, test
