import numpy as np
import pytest
import torch

from embedpipe.workers.descriptors.pooling import (
    crow,
    gem,
    l2n,
    mac,
    pool_all,
    rmac,
    rmac_regions,
    spoc,
    spoc_centre_prior,
)


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


def _cirtorch_rmac(x, L=3, eps=1e-6):
    """cnnimageretrieval-pytorch's rmac, transcribed (reference)."""
    import math

    import torch.nn.functional as F

    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    (tmp, idx) = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    Wd, Hd = 0, 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1
    v = F.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps).expand_as(v)
    for l in range(1, L + 1):  # noqa: E741
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(l - 1 + Wd + 1)) * b) - wl2
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(l - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                R = x[:, :, (int(i_) + torch.Tensor(range(wl)).long()).tolist(), :]
                R = R[:, :, :, (int(j_) + torch.Tensor(range(wl)).long()).tolist()]
                vt = F.max_pool2d(R, (R.size(-2), R.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps).expand_as(vt)
                v += vt
    return v.squeeze(-1).squeeze(-1)


@pytest.mark.parametrize("shape", [(7, 7), (6, 11), (13, 5), (3, 4)])
def test_rmac_matches_reference_and_naive_loop(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(2, 6, *shape, generator=g))
    ours = rmac(x)
    assert torch.allclose(ours, _cirtorch_rmac(x.clone()), atol=1e-5)
    naive = np.zeros((2, 6))
    for top, left, h, w in rmac_regions(*shape):
        for i in range(2):
            region = [
                [max(float(x[i, c, y, z]) for y in range(top, top + h) for z in range(left, left + w))]
                for c in range(6)
            ]
            v = np.array(region)[:, 0]
            naive[i] += v / (np.linalg.norm(v) + 1e-6)
    assert np.allclose(ours.numpy(), naive, atol=1e-5)


def test_rmac_regions_on_a_square_map():
    regions = rmac_regions(12, 12)
    assert len(regions) == 1 + 1 + 4 + 9  # whole map, then 1, 2x2, 3x3 squares
    assert regions[1] == (0, 0, 12, 12) and all(h == w == 8 for _, _, h, w in regions[2:6])
    assert all(t + h <= 12 and left + w <= 12 for t, left, h, w in regions)


def test_crow_matches_reference_loops(fmap):
    x = fmap.clone()
    x[0, 1] = 0.0  # an all-zero channel gets weight 0
    ours = crow(x).numpy()
    for i in range(2):
        X = x[i].numpy().astype(np.float64)
        S = X.sum(axis=0)
        S = S / (S**2).sum() ** 0.5
        S = S**0.5
        K, h, w = X.shape
        nz = np.array([np.count_nonzero(X[k]) / (h * w) for k in range(K)])
        C = np.array([np.log(nz.sum() / d) if d > 0 else 0.0 for d in nz])
        ref = np.array([sum(X[k, y, z] * S[y, z] for y in range(h) for z in range(w)) for k in range(K)]) * C
        assert np.allclose(ours[i], ref, rtol=1e-4, atol=1e-6)


def test_spoc_centre_prior_naive(fmap):
    h, w = fmap.shape[-2:]
    sigma = min(h, w) / 2 / 3

    def weight(y, x):
        return np.exp(-((y + 0.5 - h / 2) ** 2 + (x + 0.5 - w / 2) ** 2) / (2 * sigma**2))

    ref = np.array(
        [
            [
                sum(float(fmap[i, c, y, x]) * weight(y, x) for y in range(h) for x in range(w))
                for c in range(fmap.shape[1])
            ]
            for i in range(2)
        ]
    )
    assert np.allclose(spoc_centre_prior(fmap).numpy(), ref, atol=1e-5)
