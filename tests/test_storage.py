import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from embedpipe.storage import features
from embedpipe.storage.artifacts import load_npz, save_npz
from embedpipe.storage.features import (
    FeatureWriter,
    kept_store_reads,
    part_files,
    read_features,
    read_part,
    read_parts,
    read_store_manifest,
)
from embedpipe.storage.quarantine import read_quarantine, write_quarantine


def _write(directory, shards, dim=8, n_shards=3):
    rng = np.random.default_rng(1)
    writer = FeatureWriter(directory, dim, n_shards, {"descriptor": "gem", "backbone": "x"})
    expected = []
    for shard, n in shards:
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        ids = [f"id{shard}-{i}" for i in range(n)]
        writer.write(shard, ids, [f"/p/{x}.jpg" for x in ids], np.full(n, 640), np.full(n, 480), vecs)
        expected.append(vecs)
    writer.close()
    return np.concatenate(expected)


def test_parquet_round_trip(tmp_path):
    expected = _write(tmp_path / "gem", [(0, 5), (0, 2), (2, 4)])
    names = [p.name for p in part_files(tmp_path / "gem")]
    assert names == [
        "part-00000-of-00003.parquet",
        "part-00001-of-00003.parquet",
        "part-00002-of-00003.parquet",
    ]
    meta, vectors = read_features(tmp_path / "gem")
    assert vectors.dtype == np.float32 and np.array_equal(vectors, expected)
    assert meta.column("id").to_pylist()[:2] == ["id0-0", "id0-1"]
    assert read_store_manifest(tmp_path / "gem")["rows"] == 11
    # standard tools read it
    df = pd.read_parquet(tmp_path / "gem")
    assert len(df) == 11 and len(df["descriptor"].iloc[0]) == 8
    n = duckdb.sql(f"select count(*) from read_parquet('{tmp_path / 'gem'}/part-*.parquet')").fetchall()[0][0]
    assert n == 11


def test_parallel_read_keeps_store_order(tmp_path):
    """Many parts of uneven sizes, some empty: the one-table read equals reading the parts one by one."""
    sizes = np.random.default_rng(2).integers(0, 300, 40)
    expected = _write(tmp_path / "gem", [(i, int(n)) for i, n in enumerate(sizes)], n_shards=40)
    whole = read_parts(tmp_path / "gem")
    assert whole.equals(pa.concat_tables([read_part(p) for p in part_files(tmp_path / "gem")]))
    meta, vectors = read_features(tmp_path / "gem")
    assert np.array_equal(vectors, expected) and meta.num_rows == sizes.sum()
    assert read_parts(tmp_path / "gem", ["path"]).column_names == ["path"]
    assert read_parts(tmp_path / "none") is None


def test_kept_store_reads_reuse_unchanged_stores_only(tmp_path, monkeypatch):
    """Inside ``kept_store_reads`` a store read again while its parts are unchanged is not scanned again
    and comes back as a copy of the same rows; a replaced part, or more stores than are kept, mean a new
    scan; outside the scope every read scans. Vectors come back read-only, as Arrow hands them over."""
    scans = []
    real = features.read_parts
    monkeypatch.setattr(features, "read_parts", lambda d, columns=None: scans.append(d) or real(d, columns))
    a = _write(tmp_path / "a", [(0, 5), (1, 3)])
    b = _write(tmp_path / "b", [(0, 2)])
    c = _write(tmp_path / "c", [(2, 4)])
    with kept_store_reads():
        meta, x = read_features(tmp_path / "a")
        with pytest.raises(ValueError, match="read-only"):
            x[:] = 0
        meta2, x2 = read_features(tmp_path / "a")
        assert np.array_equal(x2, a) and meta2.equals(meta) and len(scans) == 1
        assert np.array_equal(read_features(tmp_path / "b")[1], b) and len(scans) == 2
        # part 1 of store a written again (another file under the same name): scanned again
        writer = FeatureWriter(tmp_path / "a", 8, 3, {"descriptor": "gem", "backbone": "x"})
        writer.write(0, ["n"], ["/p/n.jpg"], [1], [1], np.ones((1, 8), np.float32))
        writer.close()
        assert np.array_equal(read_features(tmp_path / "a")[1], np.ones((1, 8))) and len(scans) == 3
        read_features(tmp_path / "b")
        assert len(scans) == 3
        # a third store pushes out the one read longest ago (a), not b
        assert np.array_equal(read_features(tmp_path / "c")[1], c) and len(scans) == 4
        read_features(tmp_path / "b")
        read_features(tmp_path / "a")
        assert len(scans) == 5
    read_features(tmp_path / "b")
    assert len(scans) == 6


def test_writer_rejects_out_of_order_shards(tmp_path):
    with pytest.raises(ValueError, match="arrived after"):
        _write(tmp_path / "gem", [(1, 2), (0, 2)])


def test_npz_is_byte_identical_and_loads_with_numpy(tmp_path):
    arrays = {"mean": np.arange(4, dtype=np.float32), "proj": np.eye(4, dtype=np.float32)}
    save_npz(tmp_path / "a.npz", {"k": 1}, **arrays)
    save_npz(tmp_path / "b.npz", {"k": 1}, **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded, meta = load_npz(tmp_path / "a.npz")
    assert meta == {"k": 1} and np.array_equal(loaded["proj"], arrays["proj"])
    assert np.array_equal(np.load(tmp_path / "a.npz")["mean"], arrays["mean"])


def test_quarantine_round_trip(tmp_path):
    rows = [
        {"path": "/b.jpg", "id": None, "stage": "extract", "reason": "empty file"},
        {"path": "/a.jpg", "id": "ab", "stage": "extract", "reason": "not an image"},
    ]
    write_quarantine(tmp_path / "q.parquet", rows)
    table = read_quarantine(tmp_path / "q.parquet")
    assert table.column("path").to_pylist() == ["/a.jpg", "/b.jpg"]
    assert read_quarantine(tmp_path / "missing.parquet").num_rows == 0


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("actors", [0, 1, 2, 3])
def test_actor_pool_never_starves_decode(cpus, actors):
    from embedpipe.storage.contracts.config import ExtractConfig
    from embedpipe.workers.engines.ray_stages import pool_size

    auto = pool_size(ExtractConfig(actors=actors), cpus)
    assert auto.actors == (actors or max(1, cpus // 4))
    assert auto.fused == (cpus < 4)  # small CPU nodes decode inside the actors
    assert auto.actors * auto.actor_cpus <= cpus + 1e-9
    split = pool_size(ExtractConfig(actors=actors, decode_in="stage"), cpus)
    assert not split.fused and split.actors * split.actor_cpus + split.decode_cpus <= cpus + 1e-9
    if not actors:  # default pools ask distinct CPU amounts for decode tasks and actors
        assert split.actor_cpus != split.decode_cpus
    gpu = pool_size(ExtractConfig(actors=actors), cpus, gpus=2)
    assert not gpu.fused and gpu.actors == (actors or 2) and 0 < gpu.actor_gpus <= 1
