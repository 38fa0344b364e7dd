"""Classical descriptors: local features, codebooks, BoW/tf-idf/inverted file, VLAD, HOG, spatial
verification — each checked against a brute-force reference on seeded random data or real photos."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from PIL import Image

from embedpipe.flows.config import load_config
from embedpipe.storage.contracts.config import BowConfig
from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.storage.local_features import LocalFeatureWriter, list_values
from embedpipe.workers.classical import codebook as cb
from embedpipe.workers.classical.encode import cap_sample, sample_part
from embedpipe.workers.descriptors.bow import (
    InvertedFile,
    image_seed,
    inverse_document_frequency,
    sample_rows,
    soft_weights,
    term_frequencies,
    tfidf,
    vlad,
)
from embedpipe.workers.descriptors.local import (
    HOG_DIM,
    descriptor_vectors,
    extract_local,
    grayscale,
    hog_descriptor,
    keypoint_order,
    stored_features,
)
from embedpipe.workers.evaluate.rerank import ransac_inliers, verified_order, word_matches


@pytest.fixture(scope="module")
def photo(demo_images) -> np.ndarray:
    return np.asarray(Image.open(demo_images / "100000.jpg").convert("RGB"))


def test_keypoint_order_is_a_total_order():
    rng = np.random.default_rng(0)
    kp = rng.integers(0, 3, (200, 4)).astype(np.float32)
    response = rng.integers(0, 3, 200).astype(np.float32)
    expected = sorted(range(200), key=lambda i: (-response[i], *kp[i]))
    assert keypoint_order(kp, response).tolist() == expected


@pytest.mark.parametrize("stored", ["sift", "orb"])
def test_local_features_deterministic_and_capped(photo, stored):
    gray = grayscale(photo)
    a, b = extract_local(gray, stored, 150), extract_local(gray, stored, 150)
    assert np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.descriptors, b.descriptors)
    assert len(a.keypoints) == len(a.descriptors) and 100 <= len(a.keypoints) <= 150
    assert a.descriptors.dtype == np.uint8 and a.descriptors.shape[1] == {"sift": 128, "orb": 32}[stored]
    h, w = gray.shape
    assert (a.keypoints[:, 0] < w).all() and (a.keypoints[:, 1] < h).all() and (a.keypoints[:, 2] > 0).all()


def test_sift_uint8_is_lossless(photo):
    import cv2

    _, raw = cv2.SIFT_create(nfeatures=200).detectAndCompute(grayscale(photo), None)
    assert (
        raw.dtype == np.float32 and np.array_equal(raw, np.rint(raw)) and raw.min() >= 0 and raw.max() <= 255
    )


def test_rootsift_is_hellinger_and_orb_bits_are_hamming():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 128), dtype=np.uint8)
    ra, rb = descriptor_vectors(np.stack([a, b]), "rootsift")
    hellinger = np.sum(np.sqrt(a / a.sum() * b / b.sum()))
    assert np.isclose(np.sum((ra - rb) ** 2), 2 - 2 * hellinger, atol=1e-5)
    oa, ob = rng.integers(0, 256, (2, 32), dtype=np.uint8)
    ua, ub = descriptor_vectors(np.stack([oa, ob]), "orb")
    hamming = sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(oa, ob, strict=True))
    assert np.sum((ua - ub) ** 2) == hamming


def test_hog_dim_and_norm(photo):
    v = hog_descriptor(photo, 128)
    assert v.shape == (HOG_DIM,) and np.isclose(np.linalg.norm(v), 1.0)
    assert np.array_equal(v, hog_descriptor(photo, 128))
    assert hog_descriptor(photo, 64).shape == (HOG_DIM,)


def test_term_frequencies_and_tfidf_match_naive():
    rng = np.random.default_rng(2)
    k, n = 20, 12
    words = [rng.integers(0, k, rng.integers(0, 30)) for _ in range(n)]
    weights = [rng.random(len(w)).astype(np.float32) for w in words]
    tf = term_frequencies(words, weights, k)
    naive = np.zeros((n, k))
    for i, (w, v) in enumerate(zip(words, weights, strict=True)):
        for word, weight in zip(w, v, strict=True):
            naive[i, word] += weight
    assert np.allclose(tf.toarray(), naive)
    df = (naive > 0).sum(axis=0)
    idf = np.where(df > 0, np.log(n / np.maximum(df, 1)), 0.0)
    assert np.allclose(inverse_document_frequency(tf), idf)
    for burst in (True, False):
        x = (np.sqrt(naive) if burst else naive) * idf
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1)
        assert np.allclose(tfidf(tf, idf, burst).toarray(), x, atol=1e-6)


def test_inverted_file_is_exact_cosine():
    rng = np.random.default_rng(3)
    dense = rng.random((50, 300)) * (rng.random((50, 300)) < 0.05)
    dense /= np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
    ivf = InvertedFile(sp.csr_matrix(dense.astype(np.float32)))
    queries = sp.csr_matrix(dense[:7].astype(np.float32))
    assert np.allclose(ivf.scores(queries), dense[:7] @ dense.T, atol=1e-6)
    scores, rows = ivf.search(queries, 50)
    brute = dense[:7] @ dense.T
    for q in range(7):  # best first, ties (e.g. zero scores) by row
        expected = sorted(range(50), key=lambda j: (-np.float32(brute[q, j]), j))
        assert rows[q].tolist() == expected
    assert np.isclose(ivf.bytes_per_vector(), 8 * np.count_nonzero(dense) / 50)


def test_soft_weights():
    d2 = np.array([[1.0, 1.2, 4.0], [2.0, 2.0, 2.0]])
    w = soft_weights(d2, 0.2)
    assert np.allclose(w.sum(axis=1), 1) and (np.diff(w[0]) < 0).all() and np.allclose(w[1], 1 / 3)
    sigma2 = 0.2 * 1.5
    e = np.exp(-(d2[0] - 1.0) / (2 * sigma2))
    assert np.allclose(w[0], e / e.sum())


def test_vlad_matches_naive():
    rng = np.random.default_rng(4)
    x, c = rng.normal(size=(40, 6)), rng.normal(size=(5, 6))
    assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    blocks = []
    for j in range(5):
        r = sum((x[i] - c[j] for i in range(40) if assign[i] == j), np.zeros(6))
        blocks.append(r / np.linalg.norm(r) if np.linalg.norm(r) > 0 else r)
    v = np.concatenate(blocks)
    v = np.sign(v) * np.sqrt(np.abs(v))
    assert np.allclose(vlad(x, c, assign), v / np.linalg.norm(v), atol=1e-6)
    assert np.array_equal(vlad(x[:0], c, assign[:0]), np.zeros(30, np.float32))


def test_sampling_is_seeded_per_image():
    a = sample_rows(100, 10, image_seed(0, "abc"))
    assert np.array_equal(a, sample_rows(100, 10, image_seed(0, "abc")))
    assert not np.array_equal(a, sample_rows(100, 10, image_seed(1, "abc")))
    assert len(a) == 10 and (np.diff(a) > 0).all()
    assert np.array_equal(sample_rows(5, 10, image_seed(0, "x")), np.arange(5))
    capped = cap_sample([np.ones((30, 2)), np.zeros((0, 0)), np.zeros((30, 2))], 20, 0)
    assert capped.shape == (20, 2) and np.array_equal(
        capped, cap_sample([np.ones((30, 2)), np.zeros((30, 2))], 20, 0)
    )
    with pytest.raises(RunFailed):
        cap_sample([np.zeros((0, 0))], 20, 0)


def test_kmeans_deterministic_and_assignment_exact():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    c1, c2 = cb.train_kmeans(x, 32, 10, seed=3), cb.train_kmeans(x, 32, 10, seed=3)
    assert c1.tobytes() == c2.tobytes() and c1.shape == (32, 16)
    index = cb.deserialize(cb.serialize(cb.assignment_index(c1, flat_max=64, seed=0)))
    d2, words = cb.assign(index, x, 2)
    brute = ((x[:, None] - c1[None]) ** 2).sum(-1)
    assert np.array_equal(words[:, 0], brute.argmin(1))
    assert np.allclose(d2[:, 0], brute.min(1), rtol=1e-4, atol=1e-4)
    with pytest.raises(RunFailed, match="visual words"):
        cb.train_kmeans(x[:10], 32, 10, seed=0)


def test_large_codebook_assigns_through_ivf():
    rng = np.random.default_rng(6)
    centroids = rng.normal(size=(2000, 8)).astype(np.float32)
    index = cb.assignment_index(centroids, flat_max=1000, seed=0)
    assert "IVF" in type(index).__name__
    x = centroids[:500] + 0.01 * rng.normal(size=(500, 8)).astype(np.float32)
    _, words = cb.assign(index, x, 1)
    assert (words[:, 0] == np.arange(500)).mean() > 0.95  # approximate, nearly always right
    again = cb.assignment_index(centroids, flat_max=1000, seed=0)
    assert cb.serialize(index).tobytes() == cb.serialize(again).tobytes()


def test_word_matches_match_brute_force():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 15, 40), rng.integers(0, 15, 30)
    ia, ib = word_matches(a, b, max_per_word=3)
    ca, cb_ = np.bincount(a, minlength=15), np.bincount(b, minlength=15)
    expected = sorted(
        (a[i], i, j)
        for i in range(40)
        for j in range(30)
        if a[i] == b[j] and ca[a[i]] <= 3 and cb_[b[j]] <= 3
    )
    assert list(zip(a[ia], ia, ib, strict=True)) == expected


def test_ransac_counts_inliers_of_an_affine_transform():
    rng = np.random.default_rng(8)
    src = rng.uniform(0, 500, (60, 2))
    affine = np.array([[0.8, -0.3, 20.0], [0.25, 0.9, -10.0]])
    dst = src @ affine[:, :2].T + affine[:, 2]
    dst[40:] = rng.uniform(0, 500, (20, 2))  # 20 outliers
    n = ransac_inliers(src, dst, "affine", 3.0)
    assert 40 <= n <= 42 and n == ransac_inliers(src, dst, "affine", 3.0)
    assert 40 <= ransac_inliers(src, dst, "homography", 3.0) <= 42
    assert ransac_inliers(src[:2], dst[:2], "affine", 3.0) == 0


def test_verified_order():
    ranks = np.array([5, 3, 9, 1, 7, 2])
    inliers = np.array([0, 12, 4, 30])  # shortlist of 4; min 5 -> 1 then 3 verified
    assert verified_order(ranks, inliers, 5).tolist() == [1, 3, 5, 9, 7, 2]


def test_local_store_roundtrip(tmp_path):
    rng = np.random.default_rng(9)
    w = LocalFeatureWriter(tmp_path / "local-sift", 128, 2, {"descriptor": "local-sift", "backbone": "x"})
    kps = [rng.random((n, 4)).astype(np.float32) for n in (3, 0, 5)]
    descs = [rng.integers(0, 256, (len(k), 128), dtype=np.uint8) for k in kps]
    w.write_images(0, ["a", "b"], ["pa", "pb"], [10, 20], [30, 40], kps[:2], descs[:2])
    w.write_images(1, ["c"], ["pc"], [5], [6], kps[2:], descs[2:])
    w.close()
    df = pd.read_parquet(tmp_path / "local-sift")
    assert df["id"].tolist() == ["a", "b", "c"] and [len(x) for x in df["x"]] == [3, 0, 5]
    assert np.allclose(np.stack(df["y"].iloc[2]), kps[2][:, 1])
    table = pq.read_table(tmp_path / "local-sift" / "part-00001-of-00002.parquet")
    offsets, values = list_values(table, "descriptors")
    assert offsets.tolist() == [0, 5] and np.array_equal(values, descs[2])
    sample = sample_part(str(tmp_path / "local-sift" / "part-00000-of-00002.parquet"), "sift", 2, 0)
    assert sample.shape == (2, 128)


def test_config_classical_descriptors():
    cfg = load_config(preset="bow")
    assert "bow-rootsift" in cfg.extract.descriptors and cfg.verify.enabled
    assert stored_features(("gem", "bow-rootsift", "vlad-sift", "bow-orb", "hog")) == ("sift", "orb")
    assert load_config(preset="vlad").extract.descriptors == ("vlad-rootsift",)
    assert load_config(preset="hog").extract.descriptors == ("hog",)
    with pytest.raises(InputError, match="bow.assign"):
        load_config(preset="bow", sets=["bow.assign=fuzzy"])
    with pytest.raises(InputError, match="local.hog_size"):
        load_config(sets=["local.hog_size=100"])
    assert BowConfig().k == 1000


@pytest.mark.parametrize(
    ("stored", "feature", "assign"), [("sift", "rootsift", "soft"), ("orb", "orb", "hard")]
)
def test_encode_part_bow_and_vlad(demo_images, tmp_path, stored, feature, assign):
    """One part of a real local-feature store encoded as BoW (words, weights per keypoint) and VLAD."""
    from embedpipe.storage.features import read_features
    from embedpipe.storage.local_features import write_manifest
    from embedpipe.workers.classical.encode import encode_part

    photos = [np.asarray(Image.open(demo_images / f"10000{i}.jpg").convert("RGB")) for i in range(3)]
    feats = [extract_local(grayscale(p), stored, 200) for p in photos]
    w = LocalFeatureWriter(tmp_path / "local", feats[0].descriptors.shape[1], 1, {"descriptor": "local"})
    w.write_images(0, list("abc"), list("abc"), [1, 1, 1], [1, 1, 1], [f.keypoints for f in feats],
                   [f.descriptors for f in feats])  # fmt: skip
    w.close()
    part = str(tmp_path / "local" / "part-00000-of-00001.parquet")
    x = np.concatenate([descriptor_vectors(f.descriptors, feature) for f in feats])
    centroids = cb.train_kmeans(x, 8, 5, seed=0)
    blob = cb.serialize(cb.assignment_index(centroids, 64, 0))
    bcfg = BowConfig(assign=assign, soft_neighbours=3)
    encode_part("bow", feature, part, str(tmp_path / "bow"), 0, 1, blob, centroids, bcfg, {"k": 8})
    encode_part("vlad", feature, part, str(tmp_path / "vlad"), 0, 1, blob, centroids, bcfg, {"k": 8})
    bow = pd.read_parquet(tmp_path / "bow")
    m = 3 if assign == "soft" else 1
    brute = ((x[:, None] - centroids[None]) ** 2).sum(-1).argsort(1, kind="stable")
    start = 0
    for i, f in enumerate(feats):
        words = np.asarray(bow["words"].iloc[i]).reshape(-1, m)
        weights = np.asarray(bow["weights"].iloc[i]).reshape(-1, m)
        n = len(f.keypoints)
        assert words.shape == (n, m) and np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)
        assert (words[:, 0] == brute[start : start + n, 0]).mean() > 0.99  # float ties aside
        start += n
    write_manifest(tmp_path / "vlad", {"dim": centroids.size, "rows": 3, "n_parts": 1})
    _, v = read_features(tmp_path / "vlad")
    assert v.shape == (3, centroids.size) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assign0 = brute[: len(feats[0].keypoints), 0]
    assert np.allclose(v[0], vlad(x[: len(feats[0].keypoints)], centroids, assign0), atol=1e-5)
