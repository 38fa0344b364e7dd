import numpy as np
import pytest
import torch

from embedpipe.workers.descriptors.pooling import gem, l2n, mac, pool_all, spoc


@pytest.fixture
def fmap():
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(2, 5, 4, 3, generator=g))


def _naive(fmap, fn):
    b, c, h, w = fmap.shape
    out = np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            out[i, k] = fn([float(fmap[i, k, y, x]) for y in range(h) for x in range(w)])
    return out


def test_spoc_is_sum(fmap):
    assert np.allclose(spoc(fmap).numpy(), _naive(fmap, sum), atol=1e-5)


def test_mac_is_max(fmap):
    assert np.allclose(mac(fmap).numpy(), _naive(fmap, max), atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
def test_gem_generalised_mean(fmap, p):
    def ref(vals):
        vals = [max(v, 1e-6) for v in vals]
        return (sum(v**p for v in vals) / len(vals)) ** (1 / p)

    assert np.allclose(gem(fmap, p).numpy(), _naive(fmap, ref), rtol=1e-4)


def test_gem_limits(fmap):
    # p = 1 is average pooling; large p tends to max pooling
    assert torch.allclose(gem(fmap, 1.0), fmap.clamp(min=1e-6).mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(gem(fmap.double(), 200.0), mac(fmap).double(), rtol=0.05)


def test_pool_all_returns_unit_vectors(fmap):
    out = pool_all(fmap, ("gem", "spoc", "mac"))
    for v in out.values():
        assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out["spoc"], l2n(spoc(fmap)))
