"""Fisher vectors, VLAD vocabulary adaptation, triangulation embedding and Dalal-Triggs HOG, each checked
against a naive implementation (plain loops) on seeded data or real photos, and their fit/encode jobs on a
small local-feature store."""

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedpipe.flows.config import load_config
from embedpipe.storage.artifacts import load_npz
from embedpipe.storage.contracts.config import LocalConfig
from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import read_features, read_store_manifest
from embedpipe.storage.local_features import LocalFeatureWriter
from embedpipe.workers.classical.models import train_gmm
from embedpipe.workers.descriptors.bow import adapt_centroids, vlad, word_sums
from embedpipe.workers.descriptors.fisher import Gmm, fisher_vector, fit_gmm, log_posteriors
from embedpipe.workers.descriptors.local import (
    HOG_DIM,
    descriptor_vectors,
    hog_descriptor,
    hog_dim,
    hog_of,
    is_classical,
    stored_features,
)
from embedpipe.workers.descriptors.temb import democratic_weights, embed, temb_vector, triangulate
from embedpipe.workers.engines.dask_jobs import adapt_codebook, encode_descriptor, fit_sampled_model
from embedpipe.workers.fit.stage import encoded_descriptors, fit_encoding


def _random_gmm(rng, k: int, d: int) -> Gmm:
    w = rng.uniform(0.5, 2.0, k)
    return Gmm(w / w.sum(), rng.normal(size=(k, d)), rng.uniform(0.3, 2.0, (k, d)))


def _naive_posteriors(x, gmm: Gmm) -> list[list[float]]:
    k, d = gmm.means.shape
    out = []
    for t in range(len(x)):
        p = []
        for j in range(k):
            dens = gmm.weights[j]
            for i in range(d):
                var = gmm.variances[j, i]
                dens *= math.exp(-((x[t, i] - gmm.means[j, i]) ** 2) / (2 * var)) / math.sqrt(
                    2 * math.pi * var
                )
            p.append(dens)
        total = sum(p)
        out.append([v / total for v in p])
    return out


def _naive_fisher_vector(x, gmm: Gmm) -> np.ndarray:
    k, d = gmm.means.shape
    gamma = _naive_posteriors(x, gmm)
    g_mu, g_sigma = np.zeros((k, d)), np.zeros((k, d))
    for t in range(len(x)):
        for j in range(k):
            for i in range(d):
                sigma = math.sqrt(gmm.variances[j, i])
                u = (x[t, i] - gmm.means[j, i]) / sigma
                g_mu[j, i] += gamma[t][j] * u
                g_sigma[j, i] += gamma[t][j] * (u * u - 1)
    for j in range(k):
        g_mu[j] /= len(x) * math.sqrt(gmm.weights[j])
        g_sigma[j] /= len(x) * math.sqrt(2 * gmm.weights[j])
    v = [math.copysign(math.sqrt(abs(a)), a) for a in [*g_mu.ravel(), *g_sigma.ravel()]]
    norm = math.sqrt(sum(a * a for a in v))
    return np.array([a / norm for a in v])


def test_fisher_vector_matches_the_naive_formulas():
    rng = np.random.default_rng(0)
    gmm = _random_gmm(rng, 4, 3)
    x = rng.normal(size=(25, 3)) * 1.5
    v = fisher_vector(x, gmm)
    assert v.shape == (2 * 4 * 3,) and v.dtype == np.float32
    assert np.allclose(v, _naive_fisher_vector(x, gmm), atol=1e-5)
    assert np.allclose(np.exp(log_posteriors(x, gmm)), _naive_posteriors(x, gmm), atol=1e-12)
    assert not fisher_vector(np.zeros((0, 3)), gmm).any()  # no descriptor: the zero vector, as VLAD


def test_posteriors_in_log_space_survive_far_descriptors():
    gmm = _random_gmm(np.random.default_rng(1), 3, 16)
    far = np.full((2, 16), 1e4)  # every density underflows to 0 in linear space
    p = np.exp(log_posteriors(far, gmm))
    assert np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1.0)
    assert np.isfinite(fisher_vector(far, gmm)).all()


def _naive_em(x, init_means, iterations: int) -> Gmm:
    n, d = x.shape
    k = len(init_means)
    mean = [sum(x[t, i] for t in range(n)) / n for i in range(d)]
    var = [sum((x[t, i] - mean[i]) ** 2 for t in range(n)) / n for i in range(d)]
    gmm = Gmm(np.full(k, 1.0 / k), np.array(init_means, float), np.array([var] * k))
    for _ in range(iterations):
        gamma = _naive_posteriors(x, gmm)
        weights, means, variances = np.zeros(k), np.zeros((k, d)), np.zeros((k, d))
        for j in range(k):
            mass = sum(gamma[t][j] for t in range(n))
            weights[j] = mass / n
            for i in range(d):
                means[j, i] = sum(gamma[t][j] * x[t, i] for t in range(n)) / mass
                variances[j, i] = sum(gamma[t][j] * (x[t, i] - means[j, i]) ** 2 for t in range(n)) / mass
        gmm = Gmm(weights, means, variances)
    return gmm


@pytest.mark.parametrize("d", [2, 8])
def test_gmm_em_matches_a_naive_em(d):
    rng = np.random.default_rng(d)
    centres = rng.normal(size=(3, d)) * 4
    x = np.concatenate([c + rng.normal(size=(40, d)) * (1 + j) for j, c in enumerate(centres)])
    init = x[[0, 50, 100]] + 0.1
    ours, naive = fit_gmm(x, init, 6), _naive_em(x, init, 6)
    for a, b in ((ours.weights, naive.weights), (ours.means, naive.means), (ours.variances, naive.variances)):
        assert np.allclose(a, b, rtol=1e-7, atol=1e-9)
    assert np.isclose(ours.weights.sum(), 1.0)


def test_gmm_is_deterministic_and_floors_variances():
    rng = np.random.default_rng(3)
    bits = np.unpackbits(rng.integers(0, 256, (600, 4), dtype=np.uint8), axis=1).astype(np.float32)
    bits[:, 0] = 1.0  # a constant bit: its variance would collapse to 0
    cfg = load_config(sets=["bow.fv_iterations=5", "bow.iterations=5"])
    a, b = train_gmm(bits, 8, cfg), train_gmm(bits, 8, cfg)
    assert all(a[key].tobytes() == b[key].tobytes() for key in a)
    assert a["means"].dtype == np.float64 and (a["variances"] > 0).all() and (a["weights"] > 0).all()
    assert np.isfinite(fisher_vector(bits[:50], Gmm(a["weights"], a["means"], a["variances"]))).all()


def test_vocabulary_adaptation_matches_naive_means():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 5))
    centroids = rng.normal(size=(6, 5)).astype(np.float32)
    words = rng.integers(0, 5, 60)  # word 5 gets nothing
    words[:3] = -1  # unassigned rows are left out
    sums, counts, n = word_sums(x, words, 6)
    adapted = adapt_centroids(centroids, sums, counts)
    assert n == 57 and counts.tolist() == [sum(1 for w in words if w == j) for j in range(6)]
    for j in range(5):
        rows = [x[t] for t in range(60) if words[t] == j]
        assert np.allclose(adapted[j], sum(rows) / len(rows), atol=1e-6)
    assert np.array_equal(adapted[5], centroids[5])


def _naive_democratic_check(y, lam):
    n = len(y)
    return [lam[i] * sum(lam[j] * max(float(np.dot(y[i], y[j])), 0.0) for j in range(n)) for i in range(n)]


def test_triangulation_embedding_and_aggregation_match_naive_loops():
    rng = np.random.default_rng(5)
    x, c = rng.normal(size=(30, 4)), rng.normal(size=(3, 4))
    c[0] = x[0]  # a descriptor on a centroid: that direction is 0
    mean, proj = rng.normal(size=12) * 0.1, rng.normal(size=(7, 12))
    naive_y = []
    for t in range(30):
        r = []
        for j in range(3):
            diff = [x[t, i] - c[j, i] for i in range(4)]
            norm = math.sqrt(sum(v * v for v in diff))
            r += [v / norm if norm > 0 else 0.0 for v in diff]
        naive_y.append([sum(proj[o, i] * (r[i] - mean[i]) for i in range(12)) for o in range(7)])
    naive_y = np.array(naive_y)
    assert not triangulate(x[:1], c)[0, :4].any()
    y = embed(x, c, mean, proj)
    assert np.allclose(y, naive_y, atol=1e-10)

    def finish(v):
        v = np.sign(v) * np.sqrt(np.abs(v))
        return v / np.linalg.norm(v)

    assert np.allclose(temb_vector(x, c, mean, proj, "sum"), finish(naive_y.sum(axis=0)), atol=1e-5)
    lam = democratic_weights(y)
    naive_lam = np.ones(30)  # Sinkhorn-like damped iterations, written out
    for _ in range(10):
        sigma = _naive_democratic_check(naive_y, naive_lam)
        naive_lam = np.array([naive_lam[i] / sigma[i] ** 0.3 for i in range(30)])
    naive_lam /= math.sqrt(np.mean(_naive_democratic_check(naive_y, naive_lam)))
    assert np.allclose(lam, naive_lam, rtol=1e-8)
    expected = finish(sum(naive_lam[t] * naive_y[t] for t in range(30)))
    assert np.allclose(temb_vector(x, c, mean, proj, "democratic"), expected, atol=1e-5)
    # each descriptor's total (positive) similarity to the image is 1: within 5% after the default 10
    # damped iterations, to 1e-4 given more
    assert np.allclose(_naive_democratic_check(y, lam), 1.0, atol=0.05)
    assert np.allclose(_naive_democratic_check(y, democratic_weights(y, iterations=40)), 1.0, atol=1e-4)
    assert not temb_vector(x[:0], c, mean, proj).any()


@pytest.fixture(scope="module")
def photo(demo_images) -> np.ndarray:
    return np.asarray(Image.open(demo_images / "100000.jpg").convert("RGB"))


def test_hog_grid_default_is_unchanged(photo):
    import cv2
    from skimage.feature import hog

    cfg = LocalConfig()
    assert cfg.hog_layout == "grid" and hog_dim(cfg) == HOG_DIM
    # the grid layout written out: the whole image squashed to 128², cells of 16 px
    small = cv2.resize(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), (128, 128), interpolation=cv2.INTER_AREA)
    v = hog(small, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), block_norm="L2-Hys")
    v = v.astype(np.float32) / np.float32(np.linalg.norm(v.astype(np.float32)))
    assert np.array_equal(hog_of(photo, cfg), hog_descriptor(photo, 128))
    assert np.allclose(hog_of(photo, cfg), v, atol=1e-7)


def test_hog_dalal_triggs_keeps_the_aspect(photo):
    import cv2

    cfg = LocalConfig(hog_layout="dalal-triggs")
    n = 128 // 8 - 1
    assert hog_dim(cfg) == n * n * 2 * 2 * 9 == 8100
    h, w = photo.shape[:2]
    wide = photo[: h // 2]  # a landscape crop: its blocks sit in the middle rows of the canvas
    tall = np.ascontiguousarray(photo[:, : w // 3])
    for image in (photo, wide, tall):
        v = hog_of(image, cfg)
        assert v.shape == (hog_dim(cfg),) and np.isclose(np.linalg.norm(v), 1.0)
    grid = hog_of(wide, cfg).reshape(n, n, -1)
    empty_rows = [r for r in range(n) if not grid[r].any()]
    assert empty_rows and empty_rows[0] == 0 and empty_rows[-1] == n - 1  # zeros above and below
    half = cv2.resize(wide, (wide.shape[1] // 2, wide.shape[0] // 2), interpolation=cv2.INTER_AREA)
    assert float(hog_of(wide, cfg) @ hog_of(half, cfg)) > 0.97  # same aspect, other size: ~ same vector
    other = load_config(sets=["local.hog_layout=dalal-triggs", "local.hog_cell=16", "local.hog_bins=6"]).local
    assert hog_of(photo, other).shape == (hog_dim(other),) == (7 * 7 * 4 * 6,)
    with pytest.raises(InputError, match="local.hog_cell"):
        load_config(sets=["local.hog_layout=dalal-triggs", "local.hog_cell=24"])


def test_config_new_descriptors():
    cfg = load_config(
        sets=["extract.descriptors=[gem, fv-rootsift, temb-orb, vlad-sift, hog]", "bow.vlad_adapt=true"]
    )
    assert encoded_descriptors(cfg) == ["fv-rootsift", "temb-orb", "vlad-sift"]
    assert stored_features(cfg.extract.descriptors) == ("sift", "orb")
    assert is_classical("fv-sift") and is_classical("temb-rootsift") and not is_classical("gem")
    assert (cfg.bow.fv_k, cfg.bow.fv_iterations, cfg.bow.temb_k, cfg.bow.temb_aggregate) == (
        64,
        20,
        16,
        "democratic",
    )
    with pytest.raises(InputError, match="bow.temb_aggregate"):
        load_config(sets=["bow.temb_aggregate=max"])


def _local_store(layout: RunLayout, rng, counts: list[int]) -> list[np.ndarray]:
    """A two-part SIFT local-feature store of images with ``counts`` descriptors each (clustered uint8)."""
    centres = rng.integers(0, 200, (6, 128))
    descs = [
        np.clip(centres[rng.integers(0, 6, n)] + rng.integers(0, 40, (n, 128)), 0, 255).astype(np.uint8)
        for n in counts
    ]
    w = LocalFeatureWriter(layout.feature_dir("local-sift"), 128, 2, {"descriptor": "local-sift"})
    half = len(counts) // 2
    for shard, rows in ((0, range(half)), (1, range(half, len(counts)))):
        w.write_images(
            shard,
            [f"img{i}" for i in rows],
            [f"/x/{i}.jpg" for i in rows],
            [64] * len(rows),
            [48] * len(rows),
            [np.zeros((counts[i], 4), np.float32) for i in rows],
            [descs[i] for i in rows],
        )
    w.close()
    return descs


SETS = ["fit.scheduler=threads", "bow.sample_per_image=40", "bow.iterations=5", "bow.vlad_k=4"]


def test_vlad_adaptation_job(tmp_path):
    layout = RunLayout(tmp_path / "run")
    descs = _local_store(layout, np.random.default_rng(6), [30, 0, 25, 40, 35, 20])
    # a codebook from 8 descriptors per image: its centroids are not yet the collection's means
    plain = load_config(
        sets=[*SETS, "bow.sample_per_image=8", "extract.descriptors=[vlad-rootsift]"]
    ).model_copy(update={"out": layout.root})
    adapt = plain.model_copy(update={"bow": plain.bow.model_copy(update={"vlad_adapt": True})})
    fit_encoding(plain, layout, "vlad-rootsift")
    encode_descriptor(layout, plain, "vlad-rootsift")
    _, before = read_features(layout.feature_dir("vlad-rootsift"))
    fit_encoding(adapt, layout, "vlad-rootsift")
    arrays, meta = load_npz(layout.model("codebook-rootsift-k4-adapted"))
    assert meta["adapted"] is True and meta["n_descriptors"] == 150
    x = descriptor_vectors(np.concatenate(descs), "rootsift")
    centroids = load_npz(layout.model("codebook-rootsift-k4"))[0]["centroids"]
    words = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    for j in range(4):
        rows = x[words == j]
        assert np.allclose(
            arrays["centroids"][j], rows.mean(axis=0) if len(rows) else centroids[j], atol=1e-5
        )
    assert arrays["counts"].sum() == 150
    assert adapt_codebook(layout, adapt, "rootsift", 4) == meta  # reused while the store is the same
    encode_descriptor(layout, adapt, "vlad-rootsift")
    _, after = read_features(layout.feature_dir("vlad-rootsift"))
    assert (
        read_store_manifest(layout.feature_dir("vlad-rootsift"))["codebook"] == "codebook-rootsift-k4-adapted"
    )
    assert after.shape == before.shape == (6, 4 * 128) and not np.allclose(after, before, atol=1e-3)
    assert not after[1].any()  # the image without descriptors
    first = x[:30]
    assert np.allclose(after[0], vlad(first, arrays["centroids"], words[:30]), atol=1e-5)


def test_fisher_and_temb_jobs(tmp_path):
    layout = RunLayout(tmp_path / "run")
    descs = _local_store(layout, np.random.default_rng(7), [30, 0, 25, 40, 35, 20])
    sets = [*SETS, "bow.fv_k=3", "bow.fv_iterations=4", "bow.temb_k=3", "bow.temb_drop=2"]
    cfg = load_config(sets=[*sets, "extract.descriptors=[fv-rootsift, temb-rootsift]"])
    cfg = cfg.model_copy(update={"out": layout.root})
    fit_encoding(cfg, layout, "fv-rootsift")
    first = (tmp_path / "run" / "models" / "gmm-rootsift-k3.npz").read_bytes()
    assert fit_sampled_model(layout, cfg, "fv", "rootsift", 3)["kind"] == "gmm"  # reused
    other = RunLayout(tmp_path / "other")
    _local_store(other, np.random.default_rng(7), [30, 0, 25, 40, 35, 20])
    fit_sampled_model(other, cfg, "fv", "rootsift", 3)
    assert (tmp_path / "other" / "models" / "gmm-rootsift-k3.npz").read_bytes() == first  # same bytes
    gmm, meta = load_npz(layout.model("gmm-rootsift-k3"))
    assert meta["n_train"] == 150 and gmm["means"].shape == (3, 128)
    info = encode_descriptor(layout, cfg, "fv-rootsift")
    _, fv = read_features(layout.feature_dir("fv-rootsift"))
    assert info["dim"] == 2 * 3 * 128 and fv.shape == (6, 768) and not fv[1].any()
    x0 = descriptor_vectors(descs[0], "rootsift")
    assert np.allclose(
        fv[0], fisher_vector(x0, Gmm(gmm["weights"], gmm["means"], gmm["variances"])), atol=1e-6
    )

    fit_encoding(cfg, layout, "temb-rootsift")
    model, meta = load_npz(layout.model("temb-rootsift-k3"))
    kept = 150 - 1 - 2  # 150 sampled descriptors support 149 whitened components; the first 2 dropped
    assert meta["kind"] == "temb" and model["proj"].shape == (kept, 3 * 128)
    sample = descriptor_vectors(np.concatenate(descs), "rootsift")  # 150 < the per-image cap: the sample
    y = embed(sample, model["centroids"], model["mean"], model["proj"])
    cov = np.cov(y.T)  # whitened on the sample: ~ identity on the leading components
    assert np.allclose(np.diag(cov)[:50], 1.0, atol=0.02)
    info = encode_descriptor(layout, cfg, "temb-rootsift")
    _, t = read_features(layout.feature_dir("temb-rootsift"))
    assert info["dim"] == kept and t.shape == (6, kept) and not t[1].any()
    assert np.allclose(t[0], temb_vector(x0, model["centroids"], model["mean"], model["proj"]), atol=1e-5)
    manifest = read_store_manifest(layout.feature_dir("temb-rootsift"))
    assert manifest["aggregate"] == "democratic" and manifest["codebook"] == "temb-rootsift-k3"
    assert pd.read_parquet(layout.feature_dir("fv-rootsift"))["id"].tolist() == [f"img{i}" for i in range(6)]


def test_extraction_stage_writes_the_layout_asked_for(demo_images):
    """The local-feature stage of the extraction (``local_batch``) writes HOG in ``local.hog_layout``."""
    from embedpipe.storage.contracts.config import IngestConfig
    from embedpipe.workers.engines.ray_stages import _columns, input_items, local_batch

    files = [str(demo_images / name) for name in ("100000.jpg", "100100.jpg")]
    for cfg in (LocalConfig(), LocalConfig(hog_layout="dalal-triggs")):
        out = local_batch(_columns(input_items(files)), cfg, IngestConfig(), (), True)
        assert out["d_hog"].shape == (2, hog_dim(cfg)) and not any(out["error"])
        assert np.allclose(np.linalg.norm(out["d_hog"], axis=1), 1.0, atol=1e-5)
