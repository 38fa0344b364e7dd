"""Fine-tuning: losses and learned whitening against naive formulas, tuple mining against a naive loop,
real training steps on real photos (loss decreases, a matching pair gets closer), and Ray Train runs
through the CLI (checkpoint resume gives the identical next epoch; ``run --backbone FT_DIR`` extracts
with the result)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedpipe.flows.config import load_config
from embedpipe.workers.descriptors.pooling import gem
from embedpipe.workers.fit.whitening import apply_whitening, learned_whitening
from embedpipe.workers.train.finetune import (
    GeM,
    contrastive_loss,
    groups_of,
    hard_negatives,
    mine_tuples,
    triplet_loss,
)
from embedpipe.workers.train.loop import latest_state
from tests.helpers import demo_subset, embedpipe, kill_cli_when


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = _unit(rng, 6, 8)
        q, p, negs = v[0], v[1], v[2:]
        m = float(rng.uniform(0.1, 1.5))
        want_c = 0.5 * np.sum((q - p) ** 2)
        want_t = 0.0
        for n in negs:
            d = np.sqrt(np.sum((q - n) ** 2))
            want_c += 0.5 * max(0.0, m - d) ** 2
            want_t += 0.5 * max(0.0, m + np.sum((q - p) ** 2) - np.sum((q - n) ** 2))
        t = torch.from_numpy(v)
        assert float(contrastive_loss(t[0], t[1], t[2:], m)) == pytest.approx(want_c, rel=1e-10)
        assert float(triplet_loss(t[0], t[1], t[2:], m)) == pytest.approx(want_t, rel=1e-10, abs=1e-12)


def test_learnable_gem_is_gem_and_learns_p():
    x = torch.rand(2, 5, 4, 3)
    head = GeM(2.5)
    assert torch.allclose(head(x), gem(x, 2.5), atol=1e-6)
    head(x).sum().backward()
    assert head.p.grad is not None and float(head.p.grad.abs()) > 0


def test_learned_whitening_whitens_pair_differences_then_decorrelates():
    rng = np.random.default_rng(1)
    d, n = 6, 400
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    q, p = np.arange(0, n, 2), np.arange(1, n, 2)
    w = learned_whitening(x, q, p, dim=0, shrinkage=0.0)
    # naive reference: cnnimageretrieval-pytorch's whitenlearn
    m = x[q].mean(axis=0)
    df = (x[q] - x[p]).T
    s = df @ df.T / df.shape[1]
    pw = np.linalg.inv(np.linalg.cholesky(s))
    white = pw @ (x - m).T
    vals, vecs = np.linalg.eig(white @ white.T)
    order = vals.argsort()[::-1]
    ref = vecs[:, order].T @ pw
    ours = w["proj"].astype(np.float64)
    for i in range(d):  # the same rows up to sign
        assert np.allclose(ours[i], ref[i], rtol=1e-4, atol=1e-5) or np.allclose(
            ours[i], -ref[i], rtol=1e-4, atol=1e-5
        )
    # the whitened pair differences have identity covariance
    diffs = (x[q] - x[p]) @ ours.T
    assert np.allclose(diffs.T @ diffs / len(q), np.eye(d), atol=1e-4)
    assert w["mean"] == pytest.approx(m.astype(np.float32))
    y = apply_whitening(x, w["mean"], w["proj"][:3])
    assert y.shape == (n, 3)


def test_hard_negatives_match_a_naive_loop():
    rng = np.random.default_rng(2)
    v = _unit(rng, 40, 16).astype(np.float32)
    groups = rng.integers(0, 12, size=40)
    for a in range(40):
        sims = [(-float(v[j] @ v[a]), j) for j in range(40)]
        want, seen = [], {groups[a]}
        for _, j in sorted(sims):
            if groups[j] not in seen:
                seen.add(groups[j])
                want.append(j)
        assert list(hard_negatives(v, groups, a, 4)) == want[:4]


def test_tuples_cover_every_grouped_image_and_are_seeded():
    keys = ["100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100101.jpg", "200001.jpg", "x.jpg"]
    groups = groups_of(keys, [None] * len(keys))
    assert groups.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert groups_of(["a", "b", "c"], ["cat", "dog", "cat"]).tolist() == [0, 1, 0]
    v = _unit(np.random.default_rng(3), len(keys), 8).astype(np.float32)
    tuples = mine_tuples(v, groups, 2, seed=0, epoch=0)
    assert [t.query for t in tuples] == [0, 1, 2, 3, 4]
    for t in tuples:
        assert groups[t.positive] == groups[t.query] and t.positive != t.query
        assert all(groups[n] != groups[t.query] for n in t.negatives) and len(t.negatives) == 2
    assert mine_tuples(v, groups, 2, seed=0, epoch=0) == tuples


@pytest.fixture
def train_images(demo_images, tmp_path) -> Path:
    """Training collection: four demo groups and three distractors."""
    return demo_subset(demo_images, tmp_path / "train", (1003, 1004, 1005, 1006), (200001, 200301, 200601))


def test_training_steps_lower_the_loss_and_pull_a_matching_pair_together(train_images):
    from embedpipe.workers.train.loop import build_model, embed_images, load_images, optimiser, train_step

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config(
        preset="default",
        overrides={"images": str(train_images)},
        sets=["finetune.lr=1e-4", "finetune.max_side=96"],
    )
    files = sorted(train_images.glob("*.jpg"))
    names = [f.name for f in files]
    from embedpipe.workers.ingest.sources import list_inputs

    refs = list_inputs(str(train_images)).refs
    images = load_images(refs, 96, cfg)
    model, spec = build_model(cfg)
    opt = optimiser(model, cfg.finetune)
    q, p = names.index("100300.jpg"), names.index("100305.jpg")  # a photo and its colour-jittered copy
    negs = [names.index(n) for n in ("100400.jpg", "100500.jpg", "200001.jpg")]
    batch = [[images[q], images[p], *[images[n] for n in negs]]]
    before = embed_images(model, [images[q], images[p]], spec, "cpu")
    losses = [train_step(model, opt, batch, 1, cfg.finetune, spec, "cpu") for _ in range(4)]
    after = embed_images(model, [images[q], images[p]], spec, "cpu")
    assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert float(after[0] @ after[1]) > float(before[0] @ before[1])


@pytest.fixture
def eval_images(demo_images, tmp_path) -> Path:
    """Evaluation collection, disjoint from ``train_images``: three other groups and distractors."""
    return demo_subset(demo_images, tmp_path / "eval", (1000, 1001, 1002), (201001, 201201))


FT_SETS = [
    "--set", "finetune.max_side=64", "--set", "finetune.negatives=2", "--set", "finetune.tuples_per_step=3",
    "--set", "finetune.whiten_dim=16", "--set", "ray.num_cpus=2",
]  # fmt: skip


def _checkpointed(ft_dir: Path, epoch: int) -> bool:
    """A complete checkpoint of ``epoch`` is on disk (one being copied does not load yet)."""
    state = latest_state(ft_dir)  # only checkpoints that load completely
    return state is not None and torch.load(state, weights_only=True)["epoch"] >= epoch


@pytest.mark.slow
@pytest.mark.timeout(1800)  # several full runs; a loaded host can take long
def test_finetune_resumes_to_the_identical_epoch_and_run_extracts_with_it(
    train_images, eval_images, tmp_path
):
    ft = tmp_path / "ft"
    done = embedpipe("finetune", "--images", train_images, "--out", ft, "--epochs", 2, *FT_SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((ft / "backbone.json").read_text())
    assert info["base"] == "efficientnet_lite0" and info["head"] == "gem" and info["max_side"] == 64
    assert info["training"]["images"] == str(train_images) and info["training"]["epochs"] == 2
    assert (ft / "backbone.pt").is_file() and (ft / "whitening-gem.npz").is_file()
    lw, lw_base = (np.load(ft / name)["proj"] for name in ("whitening-gem.npz", "whitening-gem-base.npz"))
    assert lw.shape == lw_base.shape == (16, 1280) and not np.allclose(lw, lw_base)
    assert (ft / "report.html").is_file()
    assert sorted(p.name for p in (ft / "tuples").glob("*.parquet")) == [
        "epoch-001.parquet",
        "epoch-002.parquet",
    ]
    import pyarrow.parquet as pq

    tuples = pq.read_table(ft / "tuples" / "epoch-001.parquet").to_pylist()
    assert len(tuples) == 28 and all(t["source"] == "label" and len(t["negatives"]) == 2 for t in tuples)

    # kill -9 of the whole training (CLI, Ray, Ray Train workers) once its first epoch is checkpointed
    cut = tmp_path / "cut"
    args = ["finetune", "--images", train_images, "--out", cut, "--epochs", 2, *FT_SETS]
    kill_cli_when(args, lambda: _checkpointed(cut, 1), tmp_path / "killed.log")
    assert not (cut / "backbone.pt").exists() and latest_state(cut) is not None
    again = embedpipe(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(1 this run" in again.stdout
    assert json.loads((cut / "train_log.json").read_text()) == json.loads((ft / "train_log.json").read_text())
    a, b = torch.load(ft / "backbone.pt"), torch.load(cut / "backbone.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "run"
    run = embedpipe(
        "run", "--images", eval_images, "--backbone", ft, "--protocol", "holidays", "--out", out,
        "--set", "extract.descriptors=[gem]", "--set", "rerank.methods=[]", "--set", "fit.dim=16",
        "--set", f"fit.from_run={ft}", "--set", "ray.num_cpus=2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert {r["post"] for r in metrics["results"]} == {"l2", "lw16"}
    assert all(r["backbone"] == str(ft) for r in metrics["results"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["extract"]["max_side"] == 64

    page = (out / "report" / "index.html").read_text()
    assert "id='adapted'" in page and str(train_images) in page and str(eval_images) in page
    # the off-the-shelf backbone with the Lw learnt on the same pairs from its own vectors
    base = tmp_path / "run-base"
    run = embedpipe(
        "run", "--images", eval_images, "--protocol", "holidays", "--out", base,
        "--set", "extract.descriptors=[gem]", "--set", "rerank.methods=[]", "--set", "extract.max_side=64",
        "--set", f"fit.from_run={ft}", "--set", "ray.num_cpus=2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((base / "report" / "metrics.json").read_text())["results"]
    assert {(r["backbone"], r["post"]) for r in rows} == {
        ("efficientnet_lite0", "l2"),
        ("efficientnet_lite0", "lw16"),
    }
    used = np.load(base / "models" / "pcaw-gem.npz")["proj"]
    assert np.array_equal(used, lw_base)
    rep = embedpipe("report", ft, "--runs", out, base)
    assert rep.returncode == 0, rep.stderr[-2000:]
    ft_page = (ft / "report.html").read_text()
    assert "lw16" in ft_page and "(adapted)" in ft_page and "(off-the-shelf)" in ft_page
    assert "Training loss" in ft_page

    same = embedpipe("run", "--images", train_images, "--backbone", ft, "--out", tmp_path / "bad")
    assert same.returncode == 2 and "training collection" in same.stderr


@pytest.mark.slow
def test_bench_train_writes_side_by_side_json(train_images, tmp_path):
    out = tmp_path / "train.json"
    done = embedpipe(
        "bench", "train", "--images", train_images, "--steps", 2, "--json", out,
        "--set", "finetune.max_side=48", "--set", "finetune.negatives=2",
        "--set", "finetune.tuples_per_step=1", "--set", "ray.num_cpus=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["name"] == "train" and result["ratio"] > 0
    assert result["ours"]["steps"] == result["baseline"]["steps"] == 2
    assert result["ours"]["workers"] == 2 and result["tuples_per_step"] == 2
    assert result["ratio"] == pytest.approx(result["baseline"]["time_s"] / result["ours"]["time_s"])
    assert result["ours"]["images_per_s"] > 0 and result["baseline"]["images_per_s"] > 0
    # the baseline was tuned on this machine (threads x batched or not, each tried on the first step)
    # and its steps ran before and after ours
    base = result["baseline"]
    assert len(base["tuning"]) == 4 and {t["threads"] for t in base["tuning"]} == {1, 2}
    assert base["step_s"] > 0 and (base["threads"], base["batched"]) in {
        (t["threads"], t["batched"]) for t in base["tuning"]
    }
    assert result["order"][1] == "ours"
    # two Ray Train workers took the same steps as the single process: the same loss at every step
    losses = result["losses"]
    assert len(losses["ours"]) == len(losses["baseline"]) == 3 and result["loss_max_rel_diff"] <= 1e-3
    assert losses["ours"] == pytest.approx(losses["baseline"], rel=1e-3) and losses["ours"][0] > 0


def test_mining_without_labels_keeps_geometrically_verified_pairs(train_images, tmp_path):
    from embedpipe.workers.train.finetune import components, knn_pairs
    from embedpipe.workers.train.loop import (
        build_model,
        embed_images,
        load_images,
        local_features,
        mining_features,
        pair_kinds,
        training_inputs,
        verified_groups,
    )

    assert components(5, [(0, 3), (3, 4)]).tolist() == [0, 1, 2, 0, 0]
    v = _unit(np.random.default_rng(4), 12, 8)
    sims = v @ v.T
    for i, j in knn_pairs(v, 2):  # every pair is among one side's two nearest
        ranked = lambda a: [b for b in np.argsort(-sims[a]) if b != a][:2]  # noqa: E731
        assert j in ranked(i) or i in ranked(j)

    plain = tmp_path / "plain"  # the same photos without labels or Holidays names
    plain.mkdir()
    truth = {}
    for k, p in enumerate(sorted(train_images.glob("*.jpg"))):
        shutil.copy(p, plain / f"photo-{k:02d}.jpg")
        truth[k] = int(p.stem) // 100
    torch.set_num_threads(1)
    cfg = load_config(
        preset="default", overrides={"images": str(plain)}, sets=["local.max_side=400", "finetune.knn=3"]
    )
    refs, groups, mining = training_inputs(cfg)
    assert mining == "verified" and groups.tolist() == list(range(len(refs)))
    model, spec = build_model(cfg)
    vectors = embed_images(model, load_images(refs, 128, cfg), spec, "cpu")
    cache: dict = {}
    found, pairs = verified_groups(vectors, local_features(refs, cfg), cache, cfg)
    assert len(pairs) >= 5
    # edited copies of one photo: mostly near-copies, and every verified pair counted once
    kinds = pair_kinds(pairs, cache)
    assert kinds["verified_pairs"] == len(pairs) == kinds["near_copies"] + kinds["views"]
    assert kinds["near_copies"] > kinds["views"], kinds
    assert all(truth[i] == truth[j] and n >= cfg.finetune.min_inliers for i, j, n in pairs)
    assert len(set(found.tolist())) < len(refs)
    # the same through BoW spatial verification: keypoints sharing a visual word
    words_cfg = cfg.model_copy(
        update={
            "finetune": cfg.finetune.model_copy(update={"matches": "words"}),
            "bow": cfg.bow.model_copy(update={"k": 256}),
        }
    )
    features = mining_features(refs, words_cfg)
    assert all(w.shape == (len(xy),) and w.max() < 256 for xy, w in features)
    found_w, pairs_w = verified_groups(vectors, features, {}, words_cfg)
    assert len(pairs_w) >= 5, pairs_w
    assert all(truth[i] == truth[j] and n >= cfg.finetune.min_inliers for i, j, n in pairs_w)
    assert len(set(found_w.tolist())) < len(refs)


def test_evaluation_collection_is_disjoint_from_the_demo_and_deterministic(tmp_path):
    from embedpipe.workers.ingest import demo_data

    demo = set(demo_data.QUERY_PHOTOS + demo_data.DISTRACTOR_PHOTOS)
    assert not demo & set(demo_data.EVAL_QUERY_PHOTOS + demo_data.EVAL_DISTRACTOR_PHOTOS)
    info = demo_data.generate_eval(tmp_path / "a")
    assert info.n_queries == 2 and info.n_images == 2 * 13 + 8 * 3 + demo_data.EVAL_FACES
    (tmp_path / "a" / ".demo.json").unlink()
    demo_data.generate_eval(tmp_path / "b")
    for p in sorted((tmp_path / "a").glob("*.jpg")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
