"""Distractors and truncated rankings: the maths on seeded data, then one collection run with and
without a folder of distractors (real photos), whose curve at 0 distractors must equal the run
without them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpipe.storage.contracts.config import Config
from embedpipe.workers.evaluate.metrics import compute_map, ns_score
from embedpipe.workers.evaluate.protocols import holidays, on_positions
from embedpipe.workers.evaluate.stage import ranking_depth
from embedpipe.workers.index.ann import build_index, search, set_search_params
from embedpipe.workers.ingest.demo_data import load_photo, transform

from .helpers import SMALL_RUN, embedpipe


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16", "PCA16,IVF16,SQ8", "LSH"])
def test_search_among_allowed_ids_is_the_filtered_full_ranking(factory):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, factory, seed=0)
    set_search_params(index, 4, 32)
    allowed = np.sort(rng.choice(3000, 1000, replace=False))
    _, got = search(index, x[:7], 10, allowed)
    _, full = search(index, x[:7], 3000)
    want = np.array([row[np.isin(row, allowed)][:10] for row in full])
    assert np.array_equal(got, want)


def test_ground_truth_restated_over_a_database_with_distractors():
    paths = ["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg", "100102.jpg"]
    sub = holidays(paths)
    positions = np.array([0, 2, 3, 5, 6])  # distractors at rows 1 and 4 of 7
    gt = on_positions(sub, positions, 7)
    assert gt.queries.tolist() == [0, 3]
    assert [p.tolist() for p in gt.positives] == [[2], [5, 6]]
    assert [j.tolist() for j in gt.junk] == [[0], [3]]
    assert gt.groups.tolist() == [1000, -1, 1000, 1001, -1, 1001, 1001]
    # the same rankings, with the distractors put in and the rows renumbered, score the same
    ranks = np.array([[0, 1, 2, 3, 4], [2, 0, 4, 3, 1]])
    base = compute_map(ranks, sub.positives, sub.junk)["map"]
    moved = compute_map(positions[ranks], gt.positives, gt.junk)["map"]
    assert moved == base
    # UKBench-style N-S score over the queries' own rows
    assert ns_score(positions[ranks][:, :4], gt.groups, gt.queries) == pytest.approx(
        ns_score(ranks[:, :4], sub.groups, sub.queries)
    )


def test_ranking_depth_and_truncated_map():
    cfg = Config()
    assert ranking_depth(cfg, 5000) == 5000 and ranking_depth(cfg, 100_000) == 100_000
    assert ranking_depth(cfg, 1_000_000) == 1000
    assert ranking_depth(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"top_k": 50})}), 40) == 40
    # revisitop on a truncated ranking: positives not retrieved count as missed
    positives = [np.array([1, 7])]
    full = compute_map(np.array([[1, 2, 3, 4, 5, 6, 7]]), positives)["map"]
    cut = compute_map(np.array([[1, 2, 3]]), positives)["map"]
    assert full == pytest.approx(0.5 + (1 / 6 + 2 / 7) / 4) and cut == pytest.approx(0.5)  # trapezoids


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Three real photos with two copies each (Holidays layout), and a folder of other real photos to
    add as distractors, one of them named like a Holidays query to show it is never one."""
    root = tmp_path_factory.mktemp("distractor-run")
    images, extra = root / "images", root / "distractors"
    images.mkdir()
    extra.mkdir()
    for g, name in enumerate(("astronaut.png", "chelsea.png", "coffee.png")):
        photo = load_photo("skimage", name)
        photo.save(images / f"{100000 + 100 * g:06d}.jpg", quality=90)
        rng = np.random.default_rng(g)
        for k, kind in enumerate(("crop", "colour"), start=1):
            copy, quality = transform(photo, kind, rng)
            copy.save(images / f"{100000 + 100 * g + k:06d}.jpg", quality=quality)
    for d, name in enumerate(("camera.png", "coins.png", "moon.png", "horse.png", "rocket.jpg", "brick.png")):
        load_photo("skimage", name).save(extra / (f"{100900:06d}.jpg" if d == 0 else f"d{d}.jpg"), quality=90)
    return images, extra, root


@pytest.mark.slow
def test_distractors_curve_starts_at_the_run_without_them(collection):
    images, extra, root = collection
    sets = [s for s in SMALL_RUN if not s.startswith(("fit.", "rerank."))]
    sets += ["fit.dim=8", "rerank.methods=[aqe]", "eval.distractor_steps=[0,2]"]
    args = [x for s in sets for x in ("--set", s)]
    plain, with_d = root / "plain", root / "with"
    out = embedpipe("run", "--images", images, "--out", plain, *args)
    assert out.returncode == 0, out.stderr[-4000:]
    out = embedpipe("run", "--images", images, "--distractors", extra, "--out", with_d, *args)
    assert out.returncode == 0, out.stderr[-4000:]
    a = json.loads((plain / "report" / "metrics.json").read_text())
    b = json.loads((with_d / "report" / "metrics.json").read_text())
    assert a["dataset"]["n_queries"] == b["dataset"]["n_queries"] == 3  # 100900.jpg is not a query
    assert a["distractor_curve"] == []
    assert {r["distractors"] for r in a["results"]} == {0} and {r["distractors"] for r in b["results"]} == {6}
    assert {r["top_k"] for r in b["results"]} == {15}  # 9 + 6: the whole database
    # the models were fitted on the collection alone: the same whitening, byte for byte
    assert (plain / "models" / "pcaw-gem.npz").read_bytes() == (
        with_d / "models" / "pcaw-gem.npz"
    ).read_bytes()
    report = (with_d / "report" / "index.html").read_text()
    assert "id='distractors'" in report and "id='top-k'" in report
    assert "id='distractors'" not in (plain / "report" / "index.html").read_text()
    curve = b["distractor_curve"]
    assert {(p["post"], p["rerank"]) for p in curve} == {
        ("l2", "none"),
        ("l2", "aqe"),
        ("pcaw8", "none"),
        ("pcaw8", "aqe"),
    }
    for row in a["results"]:
        points = {
            p["distractors"]: p["map"]
            for p in curve
            if (p["post"], p["rerank"]) == (row["post"], row["rerank"])
        }
        assert sorted(points) == [0, 2, 6]
        assert points[0] == row["map"]  # at 0 distractors: the run without them
        (full,) = [r for r in b["results"] if (r["post"], r["rerank"]) == (row["post"], row["rerank"])]
        assert points[6] == full["map"]


def test_store_rows_read_by_position_as_the_whole_store(tmp_path):
    """Rows read by position (whitened part by part, empty parts included) are the rows of the whole."""
    from embedpipe.flows.benchmarks.store import synthetic_store
    from embedpipe.storage.features import FeatureWriter, read_features
    from embedpipe.workers.evaluate.search import StoreRows
    from embedpipe.workers.fit.whitening import apply_whitening

    store = synthetic_store(tmp_path / "store", 900, 16, 3)
    empty = FeatureWriter(tmp_path / "store", 16, 4, {"descriptor": "synthetic"})
    empty.write(3, [], [], np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 16), np.float32))
    empty.close()
    _, x = read_features(store)
    rng = np.random.default_rng(0)
    transform = (
        rng.standard_normal(16).astype(np.float32) * 0.01,
        rng.standard_normal((8, 16)).astype(np.float32),
    )
    rows = StoreRows(store, transform, 8)
    want = apply_whitening(x, *transform)
    picks = rng.integers(0, 900, (5, 7))
    assert len(rows) == 900 and rows.shape == (900, 8)
    assert np.allclose(rows[picks], want[picks], atol=1e-6)
    assert np.allclose(rows.all(), want, atol=1e-6)
