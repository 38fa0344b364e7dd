"""The index's training sample drawn by a Dask job, and the merged / on-disk / sharded index layouts."""

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from embedpipe.flows.config import load_config
from embedpipe.storage.contracts.config import Config, FitConfig, IndexConfig
from embedpipe.storage.contracts.errors import InputError, RunFailed
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import (
    feature_schema,
    feature_table,
    finish_store,
    part_files,
    read_features,
    sample_quotas,
    write_part_table,
)
from embedpipe.storage.index_folder import TRAINED_FILE, index_layout, read_index, read_shard
from embedpipe.workers.engines.dask_jobs import sample_store
from embedpipe.workers.evaluate.stage import variant_index
from embedpipe.workers.index import ann
from embedpipe.workers.index.build import (
    StoreOrderIndex,
    add_part,
    load_current,
    publish_store_index,
    remove_content_ids,
    save_layout,
    train_on_store,
    update_store_index,
)

DIM = 32
SIZES = (130, 0, 257, 41, 300, 7, 199, 66)  # uneven parts, one empty


def _vectors(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, DIM))
    x = centres[rng.integers(0, 24, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(directory, x, sizes, names=None):
    """A feature store whose parts hold ``sizes`` rows of ``x`` in order."""
    names = names or [f"img{i:04d}" for i in range(len(x))]
    schema = feature_schema(DIM, {"embedpipe": "{}"})
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        ids, paths = [f"id-{n}" for n in names[a:b]], names[a:b]
        write_part_table(
            directory, s, len(sizes), feature_table(schema, ids, paths, [1] * (b - a), [1] * (b - a), x[a:b])
        )
    finish_store(directory, len(sizes), schema, {"descriptor": "gem", "backbone": "test", "dim": DIM})
    return directory


@pytest.fixture(scope="module")
def data():
    return _vectors(sum(SIZES))


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    return _store(tmp_path_factory.mktemp("layouts") / "gem", data, SIZES)


def _naive_sample(x, sizes, n, seed):
    """Reference: the whole store in memory; per part the rows that (seed, part) picks, in part order,
    with quotas from exact fractions (largest remainder, earlier part first on ties)."""
    from fractions import Fraction

    total = sum(sizes)
    n = min(n, total)
    exact = [Fraction(n * c, total) for c in sizes]
    quotas = [int(e) for e in exact]
    by_rest = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_rest[: n - sum(quotas)]:
        quotas[i] += 1
    out, start = [], 0
    for part, (c, q) in enumerate(zip(sizes, quotas, strict=True)):
        rows = np.sort(np.random.default_rng([seed, part]).choice(c, size=q, replace=False))
        out.append(x[start + rows])
        start += c
    return np.concatenate(out)


@pytest.mark.parametrize("n", [1, 100, 333, 999, sum(SIZES), 5000])
def test_quotas_are_proportional_and_sum_to_the_sample(n):
    quotas = sample_quotas(list(SIZES), n)
    total = sum(SIZES)
    assert sum(quotas) == min(n, total)
    assert all(abs(q - min(n, total) * c / total) < 1 for q, c in zip(quotas, SIZES, strict=True))
    assert all(q <= c for q, c in zip(quotas, SIZES, strict=True)) and quotas[1] == 0


@pytest.mark.parametrize("n, seed", [(100, 0), (333, 7), (sum(SIZES) + 10, 3)])
def test_dask_sample_equals_naive_reference(store, data, n, seed):
    got = sample_store(store, n, seed, "threads")
    want = _naive_sample(data, SIZES, n, seed)
    assert got.dtype == np.float32 and got.shape == (min(n, len(data)), DIM)
    assert got.tobytes() == want.tobytes()
    if n >= len(data):  # everything, in store order
        assert np.array_equal(got, data)


def test_dask_sample_does_not_depend_on_the_scheduler(store):
    threads = sample_store(store, 500, 11, "threads")
    import dask

    with dask.config.set(num_workers=1):
        one_worker = sample_store(store, 500, 11, "threads")
    cluster = sample_store(store, 500, 11, "local-cluster")
    ray_without_session = sample_store(store, 500, 11, "ray")  # no Ray session here: local threads
    assert threads.tobytes() == one_worker.tobytes() == cluster.tobytes() == ray_without_session.tobytes()
    assert sample_store(store, 500, 12, "threads").tobytes() != threads.tobytes()


def test_trained_index_is_identical_between_runs(store):
    cfg = IndexConfig(factory="OPQ4,IVF16,PQ4x4", train_size=600)
    with ann.threads_for(0):  # one FAISS thread: small problem
        a = ann.serialize(train_on_store(store, cfg, 5, None, FitConfig(scheduler="threads")))
        b = ann.serialize(train_on_store(store, cfg, 5, None, FitConfig(scheduler="local-cluster")))
        # and it is the index trained on the reference sample
        sample = _naive_sample(read_features(store)[1], SIZES, 600, 5)
        ref = ann.serialize(ann.train_index(cfg.factory, sample, 5))
    assert np.array_equal(a, b) and np.array_equal(a, ref)


LAYOUT_FACTORIES = ["Flat", "IVF16,Flat", "IVF16,PQ8x8", "IVF16_HNSW8,PQ8x8"]


def _publish(root, store, factory, layout):
    cfg = IndexConfig(factory=factory, train_size=1000, nprobe=4, engine="local", layout=layout)
    return publish_store_index(root, store, cfg, 0)


@pytest.mark.parametrize("factory", LAYOUT_FACTORIES)
def test_layouts_search_alike(tmp_path, store, data, factory):
    queries = data[::37]
    merged, ids, _ = _publish(tmp_path / "merged", store, factory, "merged")
    want_d, want_i = ann.search(merged, queries, 25)
    layouts = ["sharded", "ondisk"] if ann.is_ivf(factory) else ["sharded"]
    for layout in layouts:
        index, got_ids, version = _publish(tmp_path / layout, store, factory, layout)
        assert index_layout(version) == layout and got_ids.equals(ids)
        got_d, got_i = ann.search(index, queries, 25)
        assert np.array_equal(got_i, want_i) and np.allclose(got_d, want_d, atol=1e-5), layout
        assert ann.bytes_per_vector(index) == ann.bytes_per_vector(merged)
        reread, _, _ = load_current(tmp_path / layout, IndexConfig(nprobe=4))
        assert np.array_equal(ann.search(reread, queries, 25)[1], want_i)
    if "sharded" in layouts:  # one file per non-empty part, each readable with faiss alone
        shards = json.loads((tmp_path / "sharded" / "v0001" / "shards.json").read_text())["shards"]
        assert len(shards) == sum(1 for s in SIZES if s)
        first = tmp_path / "sharded" / "v0001" / "shards" / shards[0]["file"]
        assert faiss.read_index(str(first)).ntotal == SIZES[0] and shards[0]["rows"] == [0, SIZES[0]]
        if ann.is_ivf(factory):  # its lists: the coarse quantiser is the version's trained.faiss, once
            assert _quantiser_size(first) == 0


_PROBE = """
import sys, faiss, numpy as np
index = faiss.read_index(sys.argv[1], int(sys.argv[2]))
faiss.extract_index_ivf(index).nprobe = 4
q = np.load(sys.argv[3])
d, i = index.search(q, 25)
np.save(sys.argv[4], i)
"""


def test_ondisk_index_opens_with_faiss(tmp_path, store, data):
    """``faiss.read_index`` on the index file finds the .ivfdata next to it (its recorded path, or the
    same folder with IO_FLAG_ONDISK_SAME_DIR after a move). Reads run in child processes, so a crash
    cannot take the tests down: the plain read is what embedpipe uses and must work; mapping the index
    (IO_FLAG_MMAP) has crashed with on-disk lists, so it is only required to agree where it survives."""
    merged, _, _ = _publish(tmp_path / "merged", store, "IVF16,PQ8x8", "merged")
    _publish(tmp_path / "ondisk", store, "IVF16,PQ8x8", "ondisk")
    moved = tmp_path / "elsewhere"
    (tmp_path / "ondisk" / "v0001").rename(moved)
    np.save(tmp_path / "q.npy", data[::37])
    ann.set_search_params(merged, 4, 0)
    want = ann.search(merged, data[::37], 25)[1]
    results = {}
    for name, flag in [
        ("plain", 0),
        ("same-dir", faiss.IO_FLAG_ONDISK_SAME_DIR),
        ("mmap", faiss.IO_FLAG_MMAP),
    ]:
        path = moved / "index.faiss" if name == "same-dir" else None
        if path is None:  # at its written place
            (moved).rename(tmp_path / "ondisk" / "v0001")
            path = tmp_path / "ondisk" / "v0001" / "index.faiss"
        out = tmp_path / f"{name}.npy"
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), str(flag), str(tmp_path / "q.npy"), str(out)],
            capture_output=True,
            timeout=120,
        )
        if path.parent != moved:
            path.parent.rename(moved)
        results[name] = proc.returncode
        if proc.returncode == 0:
            assert np.array_equal(np.load(out), want), name
    assert results["plain"] == 0 and results["same-dir"] == 0, results


def test_sharded_update_links_untouched_shards(tmp_path, data):
    """Adding a part writes one new shard file; every other shard of the new version is a hard link to
    the previous version's file (nothing re-read or re-written). Removals rewrite only the shards
    holding the removed rows. The results equal the merged layout's after the same updates."""
    sizes = (300, 300, 300)
    roots = {}
    for layout in ("merged", "sharded"):
        store = _store(tmp_path / f"store-{layout}", data[:900], sizes)
        _publish(tmp_path / layout, store, "IVF16,PQ8x8", layout)
        extra = _store(
            tmp_path / f"extra-{layout}", data[900:1000], (100,), [f"img{i:04d}" for i in range(900, 1000)]
        )
        add_part(tmp_path / layout, part_files(extra)[0])
        remove_content_ids(tmp_path / layout, ["id-img0005", "id-img0950"])
        roots[layout] = tmp_path / layout
    v1, v2, v3 = (roots["sharded"] / f"v000{i}" for i in (1, 2, 3))
    shards = json.loads((v2 / "shards.json").read_text())["shards"]
    assert [s["rows"] for s in shards] == [[0, 300], [300, 600], [600, 900], [900, 1000]]
    for s in shards[:3]:
        assert os.stat(v2 / "shards" / s["file"]).st_ino == os.stat(v1 / "shards" / s["file"]).st_ino
    touched = {
        s["file"]
        for s in shards
        if os.stat(v3 / "shards" / s["file"]).st_ino != os.stat(v2 / "shards" / s["file"]).st_ino
    }
    assert touched == {"shard-00000.faiss", "shard-00003.faiss"}
    cfg = IndexConfig(nprobe=4)
    merged, merged_ids, _ = load_current(roots["merged"], cfg)
    sharded, sharded_ids, _ = load_current(roots["sharded"], cfg)
    assert merged_ids.equals(sharded_ids) and sharded.ntotal == merged.ntotal == 998
    md, mi = ann.search(merged, data[::41], 30)
    sd, si = ann.search(sharded, data[::41], 30)
    assert np.array_equal(mi, si) and np.allclose(md, sd, atol=1e-5)
    assert not {5, 950} & set(si.ravel().tolist())


def _quantiser_size(path):
    index = read_index(path)  # held while its inverted file is looked at
    return faiss.downcast_index(faiss.extract_index_ivf(index)).quantizer.ntotal


def test_a_version_of_whole_shard_files_still_searches_and_updates(tmp_path, store, data):
    """Sharded versions written before shards held lists alone (every shard a whole index file, its
    own quantiser) are read, searched and updated as they are; new shards are lists."""
    index, _, version = _publish(tmp_path / "ix", store, "IVF16,PQ8x8", "sharded")
    want = ann.search(index, data[::37], 25)
    trained = read_index(version / TRAINED_FILE)
    entries = json.loads((version / "shards.json").read_text())["shards"]
    for entry in entries:  # rewritten as the older format had them, each with its own quantiser
        path = version / "shards" / entry["file"]
        whole = read_shard(path, trained)
        path.unlink()
        faiss.write_index(whole, str(path))
    again, _, _ = load_current(tmp_path / "ix", IndexConfig(nprobe=4))
    got = ann.search(again, data[::37], 25)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-5)
    extra = _store(tmp_path / "extra", _vectors(50, 9), (50,), [f"new{i:04d}" for i in range(50)])
    v2 = add_part(tmp_path / "ix", part_files(extra)[0])
    files = [v2 / "shards" / s["file"] for s in json.loads((v2 / "shards.json").read_text())["shards"]]
    quantisers = [_quantiser_size(f) for f in files]
    assert quantisers == [16] * len(entries) + [0]  # the old shards linked as they are, the new one lists
    assert load_current(tmp_path / "ix")[0].ntotal == sum(SIZES) + 50


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x8"])
def test_update_store_index_per_layout(tmp_path, data, factory):
    """update_store_index: merged and sharded give the same live index (searched in store order);
    ondisk refuses with one line."""
    names = [f"img{i:04d}" for i in range(len(data))]
    keep = np.r_[40:1000]  # rows 0..39 gone, 900..999 new
    found = {}
    layouts = ("merged", "sharded", "ondisk") if ann.is_ivf(factory) else ("merged", "sharded")
    for layout in layouts:
        store = _store(tmp_path / f"s-{layout}", data[:900], (450, 450), names[:900])
        _publish(tmp_path / layout, store, factory, layout)
        for p in part_files(store):
            p.unlink()
        _store(store, data[keep], (480, 480), [names[i] for i in keep])
        if layout == "ondisk":
            with pytest.raises(InputError, match="'ondisk'.*need layout 'merged' or 'sharded'") as err:
                update_store_index(tmp_path / layout, store)
            assert "\n" not in str(err.value)
            continue
        live, ids, added, removed = update_store_index(tmp_path / layout, store)
        assert (added, removed, live.ntotal) == (100, 40, 960)
        ann.set_search_params(live, 4, 16)
        found[layout] = ann.search(StoreOrderIndex(live, ids, store), data[keep][::23], 10)
    (md, mi), (sd, si) = found["merged"], found["sharded"]
    assert np.array_equal(mi, si) and np.allclose(md, sd, atol=1e-5)
    if factory == "Flat":  # store positions, exact
        q = data[keep][::23]
        assert np.array_equal(si, np.argsort(-(q @ data[keep].T), axis=1, kind="stable")[:, :10])


@pytest.mark.parametrize("layout", ["sharded", "ondisk"])
def test_variant_index_evaluates_each_layout(tmp_path, data, layout):
    """The evaluation's index path: built in the layout, it searches like the merged layout; the next,
    incremental pass updates it like the merged layout (sharded) or rebuilds it like a fresh build
    (ondisk, whose lists are written once)."""
    names = [f"img{i:04d}" for i in range(len(data))]
    icfg = IndexConfig(factory="IVF16,PQ8x8", train_size=800, nprobe=4, engine="local", layout=layout)
    cfg = Config(index=icfg, fit=FitConfig(whiten=False, scheduler="threads"))
    ref_cfg = cfg.model_copy(update={"index": icfg.model_copy(update={"layout": "merged"})})
    run, ref = RunLayout(tmp_path / "run"), RunLayout(tmp_path / "ref")
    for step, (rows, sizes) in enumerate([(np.r_[:900], (450, 450)), (np.r_[:1000], (500, 500))]):
        incremental = bool(step)
        if layout == "ondisk" and step:  # rebuilt: compare with a fresh build
            ref = RunLayout(tmp_path / "fresh")
        for where in (run, ref):
            for p in part_files(where.feature_dir("gem")) if where.feature_dir("gem").exists() else ():
                p.unlink()
            _store(where.feature_dir("gem"), data[rows], sizes, [names[i] for i in rows])
        built, searched, factory = variant_index(run, cfg, "gem", "l2", incremental)
        assert factory == "IVF16,PQ8x8" and ann.bytes_per_vector(built) == 8
        _, want, _ = variant_index(ref, ref_cfg, "gem", "l2", incremental)
        assert searched.ntotal == want.ntotal == len(rows)
        q = data[rows][::29]
        gd, gi = ann.search(searched, q, 20)
        wd, wi = ann.search(want, q, 20)
        assert np.array_equal(gi, wi) and np.allclose(gd, wd, atol=1e-5), step
    assert sorted(p.name for p in run.index_dir("gem-l2").glob("v*")) == ["v0001", "v0002"]
    assert index_layout(run.index_dir("gem-l2") / "v0002") == layout


def test_ondisk_needs_ivf_one_line():
    with pytest.raises(InputError, match="'ondisk' needs an IVF factory") as err:
        load_config(sets=["index.layout=ondisk", "index.factory=PCA16,PQ8"])
    assert "\n" not in str(err.value)
    assert load_config(sets=["index.layout=ondisk", "index.factory=PCA16,IVF64,PQ8"]).index.layout == "ondisk"
    with pytest.raises(InputError, match="index.layout"):
        load_config(sets=["index.layout=split"])


def test_empty_store_in_every_layout(tmp_path):
    """No vectors: merged and sharded publish an empty index that searches to -1; ondisk (which cannot
    map an empty file) refuses with one line and publishes nothing."""
    schema = feature_schema(DIM, {"embedpipe": "{}"})
    finish_store(tmp_path / "gem", 2, schema, {"descriptor": "gem", "dim": DIM})
    x = _vectors(300)
    for layout in ("merged", "sharded", "ondisk"):
        cfg = IndexConfig(factory="IVF4,Flat", train_size=300, engine="local", layout=layout)
        parts = []
        trained = ann.serialize(ann.train_index(cfg.factory, x, 0))
        if layout == "ondisk":
            with pytest.raises(RunFailed, match="no vectors to put on disk"):
                save_layout(tmp_path / layout, parts, trained, layout)
            assert not (tmp_path / layout).exists()
            continue
        save_layout(tmp_path / layout, parts, trained, layout)
        index, ids, _ = load_current(tmp_path / layout, cfg)
        assert index.ntotal == 0 and ids.num_rows == 0
        assert (index.search(x[:2], 3)[1] == -1).all()
