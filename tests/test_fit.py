import numpy as np
import pytest

from embedpipe.storage.contracts.config import FitConfig
from embedpipe.storage.features import FeatureWriter
from embedpipe.workers.engines.dask_jobs import fit_pca_whitening
from embedpipe.workers.fit.whitening import apply_whitening, pca_whitening_from_moments


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((16, 16))
    x = (rng.standard_normal((300, 16)) * np.linspace(5, 0.5, 16)) @ basis + 3.0
    writer = FeatureWriter(tmp_path / "gem", 16, 4, {"descriptor": "gem"})
    for shard in range(4):
        rows = x[shard * 75 : (shard + 1) * 75]
        writer.write(
            shard,
            [str(i) for i in range(len(rows))],
            ["p"] * len(rows),
            np.zeros(len(rows)),
            np.zeros(len(rows)),
            rows.astype(np.float32),
        )
    writer.close()
    return tmp_path / "gem", x.astype(np.float32)


def _reference(x, dim):
    x = x.astype(np.float64)
    mean = x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(vals)[::-1][:dim]
    return mean, vals[order], vecs[:, order]


@pytest.mark.parametrize("scheduler", ["threads", "local-cluster"])
def test_dask_fit_matches_numpy(store, scheduler):
    directory, x = store
    model, n = fit_pca_whitening(directory, FitConfig(dim=8, shrinkage=0.0, scheduler=scheduler))
    mean, vals, vecs = _reference(x, 8)
    assert n == 300
    assert np.allclose(model["mean"], mean, atol=1e-4)
    assert np.allclose(model["eigvals"], vals, rtol=1e-4)
    # rows of proj are eigenvectors scaled by 1/sqrt(eigval), up to sign
    scaled = model["proj"] * np.sqrt(model["eigvals"])[:, None]
    assert np.allclose(np.abs(scaled @ vecs), np.eye(8), atol=1e-3)


def test_whitened_covariance_is_identity(store):
    _, x = store
    x64 = x.astype(np.float64)
    model = pca_whitening_from_moments(x64.sum(0), x64.T @ x64, len(x), 0, shrinkage=0.0)
    y = (x - model["mean"]) @ model["proj"].T
    assert np.allclose(np.cov(y, rowvar=False), np.eye(y.shape[1]), atol=1e-3)
    z = apply_whitening(x, model["mean"], model["proj"])
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_dim_capped_by_rows():
    x = np.random.default_rng(0).standard_normal((5, 10))
    model = pca_whitening_from_moments(x.sum(0), x.T @ x, 5, 64, 1.0)
    assert model["proj"].shape == (4, 10)
