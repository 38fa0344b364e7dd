import numpy as np
import pytest

from embedpipe.workers.ann import build_index, search
from embedpipe.workers.rerank import alpha_qe, dba, drop_excluded


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
