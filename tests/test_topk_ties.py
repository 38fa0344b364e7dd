"""Exact ties in a top-k: one index's candidates and the merge of several shards' lists rank equal
scores by smaller id, whatever order FAISS's heap met them in."""

from __future__ import annotations

import faiss
import numpy as np

from embedpipe.workers.evaluate.search import merge_topk, ranked_topk

IP = faiss.METRIC_INNER_PRODUCT


def _copies_index() -> tuple[faiss.Index, np.ndarray]:
    """Six copies of one vector stored under ids 50, 40, …, 0 (FAISS meets the largest first), and
    twenty other vectors (ids 100+) that score lower against it."""
    rng = np.random.default_rng(3)
    v = rng.standard_normal((1, 16)).astype(np.float32)
    v /= np.linalg.norm(v)
    others = rng.standard_normal((20, 16)).astype(np.float32)
    others -= (others @ v.T) * v  # orthogonal to v: they score 0 against it
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(16))
    index.add_with_ids(np.repeat(v, 6, axis=0), np.arange(50, -1, -10))
    index.add_with_ids(others, np.arange(100, 120))
    return index, v


def test_faiss_alone_keeps_the_ties_it_met_first():
    index, v = _copies_index()
    _, ids = index.search(v, 2)
    assert set(ids[0]) == {50, 40}  # why ranked_topk exists


def test_ranked_topk_ranks_tied_candidates_by_id_with_as_many_searches_as_needed():
    index, v = _copies_index()
    calls = []

    def search(rows, kk):
        calls.append(kk)
        return index.search(v[rows], kk)

    for k, want in ((1, [0]), (2, [0, 10]), (6, [0, 10, 20, 30, 40, 50])):
        calls.clear()
        scores, ids = ranked_topk(search, 1, k, index.ntotal, IP)
        assert ids[0].tolist() == want and scores.shape == (1, k)
        assert calls[0] == k + 1 and calls == sorted(calls)  # widened until the tie closed
    calls.clear()
    ranked_topk(search, 1, 6, index.ntotal, IP)
    assert calls == [7]  # the 7th scores lower than the 6th: one search


def test_ranked_topk_stops_at_the_candidates_there_are():
    index, v = _copies_index()
    scores, ids = ranked_topk(lambda rows, kk: index.search(v[rows], kk), 1, 40, index.ntotal, IP)
    assert ids.shape == (1, 26) and ids[0, :6].tolist() == [0, 10, 20, 30, 40, 50]


def test_merge_topk_ranks_ties_across_shards_by_id_and_pads_last():
    a = (np.array([[0.9, 0.5, np.nan]], np.float32), np.array([[7, 3, -1]]))
    b = (np.array([[0.9, 0.5, 0.1]], np.float32), np.array([[2, 9, 4]]))
    scores, ids = merge_topk([a, b], 5, IP)
    assert ids.tolist() == [[2, 7, 3, 9, 4]] and np.allclose(scores, [[0.9, 0.9, 0.5, 0.5, 0.1]])
    _, ids = merge_topk([a, b], 6, faiss.METRIC_L2)  # distances: smaller first, the pad still last
    assert ids.tolist() == [[4, 3, 9, 2, 7, -1]]
