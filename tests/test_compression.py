"""Compressed indices in a real run (demo photos, Holidays layout) and the compression study."""

import json

import numpy as np
import pytest

from embedpipe.storage.artifacts import load_npz
from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.evaluate.stage import borrowed_whitening
from embedpipe.workers.evaluate.study import candidates, pq_factory, pq_nbits

from .helpers import embedpipe

pytestmark = pytest.mark.slow

# 106 images: too few to train 256-centroid (8-bit) sub-quantizers, so the PQ runs on 16 centroids
# (4 bits): PCA to 64 dims, 64 sub-quantizers of 4 bits = 32 bytes per vector (half the 64 bytes of
# PQ64x8, so a stricter test of the loss).
COMPRESSED = "PCA64,PQ64x4"
ARGS = ["--preset", "demo", "--set", "extract.descriptors=[gem]", "--set", "rerank.methods=[]"]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory, demo_images):
    run = tmp_path_factory.mktemp("compression") / "run"
    out = embedpipe("run", "--images", demo_images, "--out", run, *ARGS)
    assert out.returncode == 0, out.stderr[-4000:]
    return run, json.loads((run / "report" / "metrics.json").read_text())


def test_compressed_index_loses_at_most_two_map_points(flat_run, demo_images):
    run, flat = flat_run
    exact = {r["post"]: r for r in flat["results"]}
    assert exact["l2"]["index"] == "Flat" and exact["l2"]["bytes_per_vector"] == 1280 * 4
    manifest = json.loads((run / "manifest.json").read_text())
    out = embedpipe(
        "run", "--images", demo_images, "--out", run, *ARGS, "--set", f"index.factory={COMPRESSED}"
    )
    assert out.returncode == 0, out.stderr[-4000:]
    after = json.loads((run / "manifest.json").read_text())
    assert after["stages"]["extract"] == manifest["stages"]["extract"]  # only the evaluation re-ran
    rows = json.loads((run / "report" / "metrics.json").read_text())["results"]
    assert [r["post"] for r in rows] == ["l2", "pcaw64"]
    for row in rows:
        assert row["index"] == COMPRESSED and row["bytes_per_vector"] == 32
        assert row["map"] >= exact["l2"]["map"] - 0.02, (row, exact["l2"])
    # the compressed index is a new version; the exact one stays beside it
    root = run / "index" / "gem-l2"
    assert (root / "CURRENT").read_text().strip() == "v0002"
    assert (root / "v0001" / "index.faiss").is_file() and (root / "v0002" / "ids.parquet").is_file()


def test_study_compression(flat_run):
    run, flat = flat_run
    out = embedpipe("study", "compression", "--run", run)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads((run / "report" / "compression.json").read_text())
    assert all(set(r) >= {"descriptor", "dim", "index", "bytes_per_vector", "map"} for r in rows)
    by_index = {r["index"]: r for r in rows}
    # the study's exact row scores what the run scored for the raw descriptor
    exact = next(r for r in flat["results"] if r["post"] == "l2")
    assert by_index["Flat"]["map"] == pytest.approx(exact["map"], abs=1e-9)
    assert by_index["PCA32,Flat"]["bytes_per_vector"] == 128 and by_index["PCA64,Flat"]["dim"] == 64
    assert sorted(r["bytes_per_vector"] for r in rows if "PQ" in r["index"]) == [8, 16, 32, 64]
    assert all(0.5 < r["map"] <= 1.0 for r in rows)
    assert (run / "report" / "compression.png").read_bytes()[:4] == b"\x89PNG"
    assert "bytes/vector" in out.stdout and "PCA64,PQ64x4" in out.stdout


def test_study_needs_a_finished_run(tmp_path):
    out = embedpipe("study", "compression", "--run", tmp_path)
    assert out.returncode == 2 and "is not a finished run" in out.stderr


def test_pq_candidates_fit_the_training_set():
    assert pq_nbits(106) == 4 and pq_nbits(5000) == 8 and pq_nbits(10) == 0
    # few vectors: PCA capped below n, 4-bit codes; 64 bytes = 128 sub-quantizers on the raw vectors
    assert pq_factory(1280, 106, 32) == "PCA64,PQ64x4"
    assert pq_factory(1280, 106, 64) == "PQ128x4"
    # enough vectors: 8-bit codes on 128 PCA dims
    assert pq_factory(2048, 100_000, 16) == "PCA128,PQ16x8"
    assert pq_factory(2048, 100_000, 64) == "PCA128,PQ64x8"
    assert candidates(512, 100_000)[:5] == ["PCA32,Flat", "PCA64,Flat", "PCA128,Flat", "PCA256,Flat", "Flat"]


def test_auto_index_within_budget(flat_run, demo_images):
    run, flat = flat_run
    sets = ["--set", "index.factory=auto", "--set", "index.budget_bytes_per_vector=64"]
    out = embedpipe("run", "--images", demo_images, "--out", run, *ARGS, *sets)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads((run / "report" / "metrics.json").read_text())["results"]
    exact = next(r for r in flat["results"] if r["post"] == "l2")
    for row in rows:
        assert row["index"] != "auto" and row["bytes_per_vector"] <= 64
        choice = json.loads((run / "report" / f"index-choice-gem-{row['post']}.json").read_text())
        picked = [c for c in choice["rows"] if c["picked"]]
        assert len(picked) == 1 and picked[0]["index"] == row["index"]
        assert {"recall", "qps", "bytes_per_vector", "build_s"} <= set(picked[0])
        assert row["map"] >= exact["map"] - 0.02


def test_whitening_learnt_on_another_run(flat_run, small_holidays, tmp_path):
    """fit.from_run: learn PCA-whitening on one dataset (the demo photos), apply it to another."""
    source, _ = flat_run
    run = tmp_path / "target"
    out = embedpipe(
        "run", "--images", small_holidays, "--out", run, *ARGS, "--set", f"fit.from_run={source}"
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    mine, meta = load_npz(run / "models" / "pcaw-gem.npz")
    theirs, their_meta = load_npz(source / "models" / "pcaw-gem.npz")
    assert all(np.array_equal(mine[k], theirs[k]) for k in ("mean", "proj", "eigvals"))
    assert meta["n_train"] == their_meta["n_train"] == 106  # fitted on the source's 106 images
    rows = json.loads((run / "report" / "metrics.json").read_text())["results"]
    # GeM 0.97 plain, 0.99 with the borrowed whitening on this data
    assert [r["post"] for r in rows] == ["l2", "pcaw64"] and all(r["map"] >= 0.93 for r in rows)
    # provenance: the whitened row's model came from the source run, the plain row has none
    assert rows[1]["fitted_on"] == str(source) and rows[1]["models"] == {"whitening": str(source)}
    assert rows[0]["fitted_on"] is None


def test_borrowed_whitening_errors(flat_run, tmp_path):
    source, _ = flat_run
    with pytest.raises(InputError, match="no PCA-whitening for 'spoc'"):
        borrowed_whitening(source, "spoc", 1280)
    with pytest.raises(InputError, match="1280-dim 'gem' descriptors, this run's are 512-dim"):
        borrowed_whitening(source, "gem", 512)


@pytest.mark.parametrize(
    "layout, factory", [("sharded", COMPRESSED), ("ondisk", "PCA64,IVF4,PQ64x4")], ids=["sharded", "ondisk"]
)
def test_index_layouts_in_a_run(flat_run, demo_images, layout, factory):
    """index.layout in a real run: the index is written in the layout and evaluation searches it; its
    rankings are those of the same index built in one piece (the store's 106 rows, fewer than
    index.train_size, are the training sample; nprobe covers every list)."""
    from embedpipe.storage.features import read_features
    from embedpipe.workers.evaluate.protocols import holidays
    from embedpipe.workers.index.ann import build_index, search, set_search_params

    run, _ = flat_run
    sets = ["--set", f"index.factory={factory}", "--set", f"index.layout={layout}", "--set", "index.nprobe=4"]
    out = embedpipe("run", "--images", demo_images, "--out", run, *ARGS, *sets)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads((run / "report" / "metrics.json").read_text())["results"]
    row = next(r for r in rows if r["post"] == "l2")
    assert row["index"] == factory and row["bytes_per_vector"] == 32
    live = (run / "index" / "gem-l2" / "CURRENT").read_text().strip()
    files = {p.name for p in (run / "index" / "gem-l2" / live).iterdir()}
    assert files >= ({"shards", "shards.json"} if layout == "sharded" else {"index.faiss", "lists.ivfdata"})
    meta, x = read_features(run / "features" / "gem")
    gt = holidays(meta.column("path").to_pylist())
    ref = build_index(x, factory, seed=0)
    set_search_params(ref, 4, 64)
    want = search(ref, x[gt.queries], ref.ntotal)[1]
    assert np.array_equal(np.load(run / "report" / "ranks-gem-l2.npy"), want)
