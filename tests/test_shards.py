"""Per-shard records, store completion, incremental index updates and the drift measure (no engines)."""

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe.storage.features import (
    feature_schema,
    feature_table,
    find_part,
    finish_store,
    part_files,
    read_features,
    write_part_table,
)
from embedpipe.storage.index_folder import save_version
from embedpipe.storage.inputs import InputRef
from embedpipe.storage.shards import ShardRecords, input_signature, shard_fingerprint
from embedpipe.workers.fit.whitening import captured_energy, pca_whitening_from_moments, subspace_drift
from embedpipe.workers.index import ann
from embedpipe.workers.index.build import (
    StoreOrderIndex,
    build_store_index,
    new_rows,
    update_store_index,
)


def test_records_round_trip_and_ignore_torn_files(tmp_path):
    records = ShardRecords(tmp_path / "shards" / "extract")
    assert records.read(0) is None and records.shards() == []
    records.write(3, {"fingerprint": "a"})
    records.write(1, {"fingerprint": "b"})
    assert records.shards() == [1, 3] and records.read(3) == {"fingerprint": "a"}
    records.path(2).write_text('{"finger')  # a torn write is no record
    assert records.read(2) is None
    records.prune({3})
    assert records.shards() == [3]


def test_shard_fingerprint_follows_inputs_and_config():
    a = InputRef("a.jpg", "/x/a.jpg", stamp="1")
    b = InputRef("b.jpg", "/x/b.jpg", stamp="1")
    base = shard_fingerprint("cfg", [a, b])
    assert base == shard_fingerprint("cfg", [a, b])
    assert base != shard_fingerprint("cfg2", [a, b])
    assert base != shard_fingerprint("cfg", [a])
    touched = InputRef("b.jpg", "/x/b.jpg", stamp="2")
    assert base != shard_fingerprint("cfg", [a, touched])
    assert input_signature(b) != input_signature(touched)


def _store(directory, x, n_shards, names=None):
    names = names or [f"img{i:03d}" for i in range(len(x))]
    schema = feature_schema(x.shape[1], {"embedpipe": "{}"})
    bounds = np.linspace(0, len(x), n_shards + 1).astype(int)
    for s in range(n_shards):
        a, b = bounds[s], bounds[s + 1]
        table = feature_table(
            schema, [f"id-{n}" for n in names[a:b]], names[a:b], [1] * (b - a), [1] * (b - a), x[a:b]
        )
        write_part_table(directory, s, n_shards, table)
    finish_store(directory, n_shards, schema, {"descriptor": "gem", "dim": x.shape[1]})
    return schema


def test_finish_store_renames_parts_drops_gone_shards_and_fills_empty_ones(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    schema = _store(tmp_path, x, 3)
    assert [p.name for p in part_files(tmp_path)][-1] == "part-00002-of-00003.parquet"
    (tmp_path / ".part-00001-of-00003.parquet.tmp").write_bytes(b"torn")
    finish_store(tmp_path, 5, schema, {"dim": 4})  # the collection grew: parts 3 and 4 are empty
    assert [p.name for p in part_files(tmp_path)] == [f"part-{s:05d}-of-00005.parquet" for s in range(5)]
    assert not list(tmp_path.glob(".*.tmp"))
    meta, vectors = read_features(tmp_path)
    assert np.array_equal(vectors, x) and json.loads((tmp_path / "_manifest.json").read_text())["rows"] == 12
    finish_store(tmp_path, 2, schema, {"dim": 4})  # shards 2.. gone
    assert len(part_files(tmp_path)) == 2 and find_part(tmp_path, 1).name == "part-00001-of-00002.parquet"
    assert find_part(tmp_path, 4) is None


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "PCA8,IVF4,PQ4"])
def test_incremental_update_matches_brute_force_and_keeps_training(tmp_path, factory):
    from embedpipe.storage.contracts.config import IndexConfig

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    names = [f"img{i:03d}" for i in range(len(x))]
    store, root = tmp_path / "gem", tmp_path / "index"
    _store(store, x[:300], 3, names[:300])
    cfg = IndexConfig(factory=factory, engine="local", train_size=300)
    index, ids = build_store_index(store, cfg, 0, engine="local")
    save_version(root, index, ids)
    trained = ann.serialize(index)

    # rows 0..49 gone, 300..399 new (a new shard), the store re-written in its new shape
    keep = np.r_[50:400]
    for p in part_files(store):
        p.unlink()
    _store(store, x[keep], 4, [names[i] for i in keep])
    assert new_rows(root, store).tolist() == list(range(250, 350))
    live, ids, added, removed = update_store_index(root, store)
    assert (added, removed, live.ntotal) == (100, 50, 350)
    assert sorted(ids.column("path").to_pylist()) == sorted(names[i] for i in keep)
    # no retraining: the coarse quantizer / codebooks are the ones trained before
    if factory != "Flat":
        before = ann.deserialize(trained)  # kept alive: the quantizers belong to their indices
        ivf_a, ivf_b = ann._ivf(before), ann._ivf(live)
        centroids = [faiss.downcast_index(i.quantizer).reconstruct_n(0, i.nlist) for i in (ivf_a, ivf_b)]
        assert np.array_equal(*centroids)
    searched = StoreOrderIndex(live, ids, store)
    q = x[keep][:20]
    # the same as filling the trained index with the final store from scratch (ids = store positions)
    refill = ann.deserialize(trained)
    refill.reset()  # trained, empty
    refill.add_with_ids(x[keep], np.arange(len(keep), dtype=np.int64))
    ann.set_search_params(refill, 4, 16)
    ann.set_search_params(live, 4, 16)
    want_scores, want = ann.search(refill, q, 10)
    got_scores, got = ann.search(searched, q, 10)
    assert np.array_equal(got, want) and np.allclose(got_scores, want_scores, atol=1e-5)
    if factory == "Flat":  # and exact: brute force
        assert np.array_equal(got, np.argsort(-(q @ x[keep].T), axis=1, kind="stable")[:, :10])
    assert pq.read_table(root / (root / "CURRENT").read_text().strip() / "ids.parquet").num_rows == 350


def test_subspace_drift_is_zero_in_distribution_and_grows_off_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((32, 32)))[0]
    scales = np.r_[np.full(4, 10.0), np.full(28, 0.1)]
    old = (rng.standard_normal((2000, 32)) * scales) @ basis.T
    same = (rng.standard_normal((500, 32)) * scales) @ basis.T
    other = (rng.standard_normal((500, 32)) * scales[::-1]) @ basis.T  # energy outside the subspace
    assert subspace_drift(old, same, 4) < 0.01
    assert subspace_drift(old, other, 4) > 0.9
    assert subspace_drift(old, old[:0], 4) == 0.0 and subspace_drift(old[:3], other, 4) == 0.0
    # few old rows, many dimensions: an in-sample measure would call everything new drift, this does not
    small = (rng.standard_normal((40, 32)) * scales) @ basis.T
    assert subspace_drift(small, same, 32) < 0.05
    # naive reference for the captured share
    model = pca_whitening_from_moments(old.sum(0), old.T @ old, len(old), 4, 0.0)
    basis_rows = model["proj"] / np.linalg.norm(model["proj"], axis=1, keepdims=True)
    xc = other - model["mean"]
    naive = sum(float(np.dot(basis_rows @ v, basis_rows @ v)) for v in xc) / sum(float(v @ v) for v in xc)
    assert captured_energy(other, model["mean"], model["proj"]) == pytest.approx(naive, rel=1e-6)


def test_weights_digest_follows_fine_tuned_and_local_weights(tmp_path):
    from embedpipe.workers.descriptors.backbones import weights_digest

    assert weights_digest("efficientnet_lite0") == "" and weights_digest("timm:resnet18", "cache") == ""
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "backbone.json").write_text('{"base": "efficientnet_lite0"}')
    (folder / "backbone.pt").write_bytes(b"weights v1")
    first = weights_digest(str(folder))
    assert first and first == weights_digest(str(folder))
    (folder / "backbone.pt").write_bytes(b"weights v2")  # retrained into the same folder
    assert weights_digest(str(folder)) != first
    local = tmp_path / "resnet.pth"
    local.write_bytes(b"a")
    assert weights_digest("timm:resnet18", local) != weights_digest("timm:resnet18", None)


@pytest.mark.parametrize("rows", [30, 300])  # fewer rows than dimensions (thin SVD) and more (eigh)
def test_principal_basis_spans_the_covariance_eigenvectors(rows):
    from embedpipe.workers.fit.whitening import principal_basis

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 64)) * np.linspace(5, 0.1, 64)
    xc = x - x.mean(0)
    got = principal_basis(xc, 8)
    ref = pca_whitening_from_moments(x.sum(0), x.T @ x, rows, 8, 0.0)["proj"]
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    assert got.shape == (8, 64) and np.allclose(got @ got.T, np.eye(8), atol=1e-10)
    assert np.allclose(np.abs(got @ ref.T), np.eye(8), atol=1e-6)  # same directions, up to sign
    old, new = x[: rows // 2 * 2], rng.standard_normal((20, 64))
    half = old[: len(old) // 2]
    model = pca_whitening_from_moments(half.sum(0), half.T @ half, len(half), 8, 0.0)
    held = captured_energy(old[len(old) // 2 :], model["mean"], model["proj"])
    naive = max(0.0, 1 - captured_energy(new, model["mean"], model["proj"]) / held)
    assert subspace_drift(old, new, 8) == pytest.approx(naive, rel=1e-6)
