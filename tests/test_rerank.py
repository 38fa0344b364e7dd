import functools

import numpy as np
import pyarrow as pa
import pytest

from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.workers.evaluate.rerank import (
    EXPANSION_ROWS,
    alpha_qe,
    dba,
    drop_excluded,
    merge_neighbours,
    pair_similarities,
    weighted_expansion,
)
from embedpipe.workers.evaluate.stage import dba_neighbours, provenance
from embedpipe.workers.index.ann import build_index, search
from embedpipe.workers.index.build import input_keys


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return _unit(rng.standard_normal((40, 8))), _unit(rng.standard_normal((5, 8)))


def test_alpha_qe_matches_brute_force(data):
    x, q = data
    sims, idx = search(build_index(x), q, 3)
    out = alpha_qe(q, x, sims, idx, alpha=3.0)
    for i in range(len(q)):
        s = x @ q[i]
        top = np.argsort(-s, kind="stable")[:3]
        ref = q[i] + sum(max(s[j], 0) ** 3 * x[j] for j in top)
        assert np.allclose(out[i], ref / np.linalg.norm(ref), atol=1e-5)


def test_alpha_zero_is_plain_average_and_dba_includes_self(data):
    x, _ = data
    sims, idx = search(build_index(x), x, 3)
    assert (idx[:, 0] == np.arange(len(x))).all()
    out = dba(x, sims, idx, alpha=0.0)
    ref = _unit(x[idx].sum(axis=1))
    assert np.allclose(out, ref, atol=1e-5)


def test_negative_similarities_get_no_weight(data):
    x, q = data
    sims = np.array([[-0.5, 0.5]], dtype=np.float32)
    idx = np.array([[0, 1]])
    out = alpha_qe(q[:1], x, sims, idx, alpha=1.0)
    ref = q[0] + 0.5 * x[1]
    assert np.allclose(out[0], ref / np.linalg.norm(ref), atol=1e-6)


def test_drop_excluded_removes_self_and_pads():
    sims = np.array([[1.0, 0.9, 0.8], [1.0, 0.5, 0.1]], dtype=np.float32)
    idx = np.array([[4, 2, 7], [3, 4, -1]])
    s, i = drop_excluded(sims, idx, [np.array([4]), np.array([3, 4])], 2)
    assert i.tolist() == [[2, 7], [-1, -1]] and s[0].tolist() == pytest.approx([0.9, 0.8])
    out = alpha_qe(np.ones((2, 8), np.float32), np.ones((8, 8), np.float32), s, i, 3.0)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)


def test_merge_neighbours_keeps_the_best_of_both_lists():
    sims_a = np.array([[1.0, 0.7, 0.2], [1.0, 0.3, -np.inf]], dtype=np.float32)
    idx_a = np.array([[0, 3, 5], [1, 0, -1]])
    sims_b = np.array([[0.8, 0.2], [0.9, 0.4]], dtype=np.float32)
    idx_b = np.array([[9, 8], [7, 6]])
    s, i = merge_neighbours(sims_a, idx_a, sims_b, idx_b, 3)
    assert i.tolist() == [[0, 9, 3], [1, 7, 6]]
    assert np.allclose(s, [[1.0, 0.8, 0.7], [1.0, 0.9, 0.4]])
    _, i = merge_neighbours(sims_a, idx_a, sims_b, idx_b, 4)  # equal similarities: smaller id first
    assert i[0].tolist() == [0, 9, 3, 5]


def test_dba_expansion_equals_the_direct_sum(data):
    x, _ = data
    sims, idx = search(build_index(x), x, 4)
    idx[::3, 3] = -1  # a missing neighbour gets no weight
    out = dba(x, sims, idx, alpha=3.0)
    for i in range(len(x)):
        ref = sum(
            max(s, 0) ** 3 * x[j].astype(np.float64) for s, j in zip(sims[i], idx[i], strict=True) if j >= 0
        )
        assert np.allclose(out[i], ref / np.linalg.norm(ref), atol=1e-6)


def test_expansion_and_pair_similarities_across_row_blocks():
    """More rows than one block, the last block partial: every row as the one-shot formula gives it."""
    rng = np.random.default_rng(1)
    n = 2 * EXPANSION_ROWS + 37
    x = _unit(rng.standard_normal((n, 6)))
    idx = rng.integers(0, n, (n, 3))
    idx[::5, 2] = -1
    sims = rng.random((n, 3)).astype(np.float32)
    w = np.where(idx >= 0, sims.astype(np.float64) ** 2.0, 0.0)
    ref = x + np.einsum("nk,nkd->nd", w, x[np.maximum(idx, 0)].astype(np.float64))
    out = weighted_expansion(x, x, sims, idx, 2.0, include_self=True)
    assert out.dtype == np.float32 and out.shape == (n, 6)
    assert np.allclose(out, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    rows = rng.permutation(n)[: n - 11]
    ids = np.maximum(idx[: len(rows)], 0)
    got = pair_similarities(x, rows, ids)
    assert got.shape == ids.shape
    assert np.allclose(got, np.einsum("nd,nkd->nk", x[rows], x[ids]), atol=1e-6)


def _graph_run(tmp_path, x, keys, reuse):
    layout = RunLayout(tmp_path / "run")
    path, cid = zip(*(key.decode().split("\0") for key in keys.tolist()), strict=True)
    meta = pa.table({"path": list(path), "id": list(cid)})
    keys_of = functools.partial(input_keys, meta)
    return dba_neighbours(layout, Config(), "gem-l2", x, build_index(x), "Flat", keys_of, reuse)


def test_saved_dba_neighbours_give_what_a_full_search_gives(tmp_path):
    """A reindex reuses the saved lists: rows new or that lost a neighbour searched against all, the
    rest against the new rows only; the result is the full search's, whatever moved or went."""
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((300, 16)))
    keys = np.array([f"img{i:04d}.jpg\0id{i}".encode() for i in range(300)])
    old = np.arange(0, 240)
    _graph_run(tmp_path, x[old], keys[old], reuse=False)
    saved = tmp_path / "run" / "report" / "dba-neighbours-gem-l2.npz"
    assert saved.exists()
    # 20 old rows go, 60 arrive, and the store order changes (new shards between old ones)
    now = np.concatenate([np.arange(20, 120), np.arange(240, 270), np.arange(120, 240), np.arange(270, 300)])
    sims, idx = _graph_run(tmp_path, x[now], keys[now], reuse=True)
    ref_s, ref_i = search(build_index(x[now]), x[now], 3)
    assert (idx == ref_i).all() and np.allclose(sims, ref_s, atol=1e-6)
    arrays = np.load(saved)
    assert arrays["keys"].tolist() == keys[now].tolist() and (arrays["ids"] == ref_i).all()
    # the same keys with other vectors (a refit, say): nothing saved is trusted
    y = _unit(rng.standard_normal((len(now), 16)))
    _, idx = _graph_run(tmp_path, y, keys[now], reuse=True)
    assert (idx == search(build_index(y), y, 3)[1]).all()
    for damaged in (b"not an npz", saved.read_bytes()[:200]):  # unreadable: searched around, replaced
        saved.write_bytes(damaged)
        _, idx = _graph_run(tmp_path, x[now], keys[now], reuse=True)
        assert (idx == ref_i).all() and (np.load(saved)["ids"] == ref_i).all()


def test_provenance_says_where_each_learned_model_was_fitted(tmp_path):
    cfg = Config()
    assert provenance(cfg, "gem", "l2", "Flat", 64) == {"fitted_on": None, "models": {}}
    assert provenance(cfg, "gem", "pcaw64", "Flat", 64)["fitted_on"] == "this collection"
    assert provenance(cfg, "gem", "l2", "IVF16,PQ8", 64)["models"] == {"index": "this collection"}
    assert provenance(cfg, "gem", "l2", "HNSW32", 64)["fitted_on"] is None  # a graph, nothing trained
    assert provenance(cfg, "bow-rootsift", "tfidf", "inverted-file", 500)["models"] == {
        "codebook": "this collection"
    }
    other = Config(fit={"from_run": tmp_path / "learn"}, bow={"codebook_from": tmp_path / "learn"})
    row = provenance(other, "vlad-rootsift", "pcaw64", "Flat", 1024)
    assert row["fitted_on"] == str(tmp_path / "learn") and set(row["models"]) == {"codebook", "whitening"}
    # one model learnt here is enough to make the row transductive
    assert provenance(other, "vlad-rootsift", "pcaw64", "IVF16,Flat", 1024)["fitted_on"] == "this collection"
