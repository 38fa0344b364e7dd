"""Distractors and truncated rankings: the maths on seeded data, then a run of a small collection with a
folder of distractors (real photos): models fitted on the collection alone, and a curve whose point at
0 distractors is the collection searched alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpipe.storage.artifacts import load_npz
from embedpipe.storage.contracts.config import Config
from embedpipe.storage.features import read_features
from embedpipe.workers.evaluate.metrics import compute_map, ns_score
from embedpipe.workers.evaluate.protocols import holidays, on_positions
from embedpipe.workers.evaluate.stage import ranking_depth
from embedpipe.workers.fit.whitening import apply_whitening, pca_whitening_from_moments
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
def test_distractors_curve_starts_at_the_collection_alone(collection):
    images, extra, root = collection
    sets = [s for s in SMALL_RUN if not s.startswith(("fit.", "rerank."))]
    sets += ["fit.dim=8", "rerank.methods=[aqe]", "eval.distractor_steps=[0,2]"]
    run = root / "with"
    out = embedpipe(
        "run",
        "--images",
        images,
        "--distractors",
        extra,
        "--out",
        run,
        *[x for s in sets for x in ("--set", s)],
    )
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["dataset"]["n_queries"] == 3  # 100900.jpg, a distractor, is not a query
    assert {r["distractors"] for r in metrics["results"]} == {6}
    assert {r["top_k"] for r in metrics["results"]} == {15}  # 9 + 6: the whole database
    report = (run / "report" / "index.html").read_text()
    assert "id='distractors'" in report and "id='top-k'" in report

    meta, x = read_features(run / "features" / "gem")
    paths = meta.column("path").to_pylist()
    mine = np.array([not p.startswith("distractor:") for p in paths])
    assert mine.sum() == 9 and all(p.startswith("distractor:") for p in np.array(paths)[~mine])
    # the whitening was fitted on the collection alone: what the collection's own moments give
    arrays, fitted = load_npz(run / "models" / "pcaw-gem.npz")
    xc = x[mine].astype(np.float64)
    want = pca_whitening_from_moments(xc.sum(axis=0), xc.T @ xc, len(xc), 8, Config().fit.shrinkage)
    assert fitted["n_train"] == 9
    ours, theirs = (
        apply_whitening(x[mine], arrays["mean"], arrays["proj"]),
        apply_whitening(x[mine], want["mean"], want["proj"]),
    )
    assert np.allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-4)  # the same whitening, up to axis signs

    # each curve point at 0 distractors is the collection searched alone; the last, the run's row
    curve = metrics["distractor_curve"]
    pairs = {("l2", "none"), ("l2", "aqe"), ("pcaw8", "none"), ("pcaw8", "aqe")}
    assert {(p["post"], p["rerank"]) for p in curve} == pairs
    gt = holidays([paths[i] for i in np.flatnonzero(mine)])
    for post, vectors in (("l2", x[mine]), ("pcaw8", ours)):
        index = build_index(np.ascontiguousarray(vectors), "Flat", seed=0)
        alone = compute_map(search(index, vectors[gt.queries], 9)[1], gt.positives, gt.junk)["map"]
        points = {p["distractors"]: p["map"] for p in curve if (p["post"], p["rerank"]) == (post, "none")}
        assert sorted(points) == [0, 2, 6]
        assert points[0] == pytest.approx(alone, abs=1e-12)
    for row in metrics["results"]:
        points = {
            p["distractors"]: p["map"]
            for p in curve
            if (p["post"], p["rerank"]) == (row["post"], row["rerank"])
        }
        assert points[6] == row["map"]
    assert min(p["map"] for p in curve if p["post"] == "pcaw8") < 1.0  # distractors did get in the way


def test_store_rows_read_by_position_as_the_whole_store(tmp_path):
    """Rows read by position (whitened part by part, empty parts included) are the rows of the whole."""
    from embedpipe.flows.benchmarks.store import synthetic_store
    from embedpipe.storage.features import FeatureWriter
    from embedpipe.workers.evaluate.search import StoreRows

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
