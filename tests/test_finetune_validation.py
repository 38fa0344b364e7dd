"""Fine-tuning that keeps what the base model knew: L2-SP, frozen stages and the learning-rate schedule on
seeded data against naive computations; validation maths (mAP, early stopping, the epoch kept, the
overlap check); and one ``finetune --validate`` through the CLI where training only hurts, so the folder
keeps the base model and ``run --backbone FT_DIR`` loads the base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from embedpipe.flows.config import load_config
from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.evaluate.protocols import holidays
from embedpipe.workers.train.finetune import (
    RetrievalNet,
    freeze_stages,
    is_near_copy,
    l2sp_penalty,
    lr_factor,
    trunk_stages,
)
from embedpipe.workers.train.loop import kept_model, optimiser, set_lr, start_weights, train_step
from embedpipe.workers.train.validate import (
    ValidationSet,
    best_epoch,
    check_disjoint,
    retrieval_map,
    selected_post,
    should_stop,
)
from tests.helpers import demo_subset, embedpipe

SPEC = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _tiny_net() -> RetrievalNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU()),
    )
    return RetrievalNet(trunk, "gem", 3.0)


def _batch(seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(4)] for _ in range(2)]


def _cfg(**finetune):
    sets = [f"finetune.{k}={v}" for k, v in finetune.items()]
    return load_config(preset="default", sets=sets)


def test_l2sp_term_matches_a_naive_sum_and_a_huge_alpha_holds_the_start_weights():
    net = _tiny_net()
    w0 = start_weights(net)
    with torch.no_grad():
        for p in net.trunk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    params = dict(net.trunk.named_parameters())
    naive = 0.5 * 0.3 * sum(float(((params[n].detach() - w0[n]) ** 2).sum()) for n in w0)
    assert float(l2sp_penalty(params, w0, 0.3).detach()) == pytest.approx(naive, rel=1e-6)
    assert float(l2sp_penalty(params, w0, 0.0)) == 0.0

    def drift(alpha: float) -> float:
        net = _tiny_net()
        cfg = _cfg(lr=0.01, l2sp=alpha, negatives=2)
        start = start_weights(net)
        opt = optimiser(net, cfg.finetune)
        for step in range(8):
            train_step(net, opt, _batch(step), 2, cfg.finetune, SPEC, "cpu", None, start)
        return max(float((p.detach() - start[n]).abs().max()) for n, p in net.trunk.named_parameters())

    free, held = drift(0.0), drift(1e8)
    # without L2-SP eight Adam steps of 0.01 drift up to 0.08; with a huge alpha every step after the
    # first is pulled straight back: the weights stay within about one step of w0
    assert free > 0.03 and held <= 0.0125, (free, held)


def test_frozen_stages_stay_bit_identical_and_the_others_change():
    net = _tiny_net()
    assert [s for s, _ in trunk_stages(net.trunk)] == ["0", "1", "2"]
    assert freeze_stages(net.trunk, 2) == ["0", "1"]
    before = {n: p.detach().clone() for n, p in net.trunk.named_parameters()}
    cfg = _cfg(lr=0.01, negatives=2)
    opt = optimiser(net, cfg.finetune)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in net.parameters() if p.requires_grad
    )
    train_step(net, opt, _batch(0), 2, cfg.finetune, SPEC, "cpu")
    for n, p in net.trunk.named_parameters():
        if n.startswith(("0.", "1.")):
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n


def test_registry_backbone_stages_are_stem_blocks_head():
    from embedpipe.workers.descriptors.backbones import load_backbone

    trunk, _ = load_backbone("efficientnet_lite0")
    names = [s for s, _ in trunk_stages(trunk)]
    assert names == ["stem", *[f"model.blocks.{i}" for i in range(7)], "head"]
    assert freeze_stages(trunk, 3) == ["stem", "model.blocks.0", "model.blocks.1"]
    frozen = [n for n, p in trunk.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.startswith(("model.conv_stem", "model.bn1", "model.blocks.0.", "model.blocks.1.")) for n in frozen
    )


def test_learning_rate_warms_up_linearly_then_decays_per_epoch():
    got = [lr_factor(s, 0, 4, 4, "constant", 0.0) for s in range(6)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert lr_factor(10, 3, 4, 4, "exp", 0.01) == pytest.approx(math.exp(-0.03))
    assert lr_factor(1, 2, 4, 4, "exp", 0.01) == pytest.approx(0.5 * math.exp(-0.02))
    assert lr_factor(10, 2, 4, 0, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 0, 4, 0, "cosine", 0.0) == pytest.approx(1.0)
    net = _tiny_net()
    cfg = _cfg(lr=0.001, warmup_steps=2, schedule="exp", lr_decay=0.5, epochs=3)
    opt = optimiser(net, cfg.finetune)
    lrs = [(set_lr(opt, s, e, cfg.finetune), opt.param_groups[1]["lr"]) for s, e in ((0, 0), (1, 0), (5, 2))]
    want = [0.0005, 0.001, 0.001 * math.exp(-1.0)]
    assert [a for a, _ in lrs] == pytest.approx(want) and [b for _, b in lrs] == pytest.approx(
        [10 * w for w in want]
    )


def test_validation_map_early_stopping_and_the_epoch_kept():
    gt = holidays(["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg", "200001.jpg"])
    v = np.eye(5, dtype=np.float32)
    v[1] = v[0] * 0.9 + v[1] * 0.1  # 100001 next to its query; 100101 far from 100100
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # query 100000: its view first (AP 1); query 100100: its view after two ties ranked by row (AP 1/6)
    assert retrieval_map(v, gt) == pytest.approx((1.0 + 1.0 / 6.0) / 2.0)

    curve = [{"epoch": 0, "map": 0.6}, {"epoch": 1, "map": 0.7}, {"epoch": 2, "map": 0.65}]
    assert best_epoch(curve) == 1 and not should_stop(curve, 2)
    assert should_stop([*curve, {"epoch": 3, "map": 0.7}], 2)  # a tie is not better
    hurts = [{"epoch": 0, "map": 0.6}, {"epoch": 1, "map": 0.6}, {"epoch": 2, "map": 0.1}]
    assert best_epoch(hurts) == 0 and should_stop(hurts, 2)
    # the base at the fine-tuning image size is a bar too: an image size alone is no better model
    sized = [{"epoch": 0, "map": 0.6, "map_at_size": 0.8}, {"epoch": 1, "map": 0.7}, {"epoch": 2, "map": 0.8}]
    assert best_epoch(sized) == 0 and should_stop(sized, 2)
    assert best_epoch([*sized, {"epoch": 3, "map": 0.85}]) == 3
    best = {"w": torch.ones(1)}
    assert kept_model({"validation": curve, "best_model": best, "model": {}}, True) is best
    assert kept_model({"validation": hurts, "best_model": None, "model": {"w": 0}}, True) is None
    assert kept_model({"validation": [], "model": best}, False) is best


def test_the_whitened_map_picks_the_epoch_only_on_collections_large_enough_to_whiten():
    assert selected_post(_cfg(), 300) == "pcaw" and selected_post(_cfg(), 256) == "l2"
    assert selected_post(_cfg(), 27) == "l2" and selected_post(_cfg(validation_post="pcaw"), 27) == "pcaw"
    assert selected_post(load_config(preset="default", sets=["fit.whiten=false"]), 1000) == "l2"


def test_validation_images_must_not_be_training_images():
    val = ValidationSet(
        "v", [SimpleNamespace(key="v/a.jpg"), SimpleNamespace(key="v/b.jpg")], ["x", "y"], None
    )
    check_disjoint(["p", "q"], ["t/p.jpg", "t/q.jpg"], val)
    with pytest.raises(InputError, match="1 validation image.*v/b.jpg = t/q.jpg"):
        check_disjoint(["p", "y"], ["t/p.jpg", "t/q.jpg"], val)


def test_mined_pairs_tell_real_views_from_near_copies(demo_images, tmp_path):
    """Real photos of one scene from two viewpoints (OpenCV's examples) are views; the demo's edited
    copies of one photo (crop, rotation, scale, colour, JPEG) are near-copies."""
    from embedpipe.workers.ingest.sources import list_inputs
    from embedpipe.workers.train.loop import local_features, pair_geometry
    from tests.multiview import opencv_examples

    assert is_near_copy(100, 75) and not is_near_copy(100, 74) and not is_near_copy(0, 0)
    source = opencv_examples()
    if source is None:
        pytest.skip("the opencv-doc example photos cannot be fetched here (apt-get download)")
    folder = tmp_path / "pairs"
    folder.mkdir()
    real = ["graf1.png", "graf3.png", "left.jpg", "right.jpg", "aloeL.jpg", "aloeR.jpg"]
    for i, name in enumerate(real):
        shutil.copy(source / name, folder / f"a{i}{Path(name).suffix}")
    copies = sorted(demo_images.glob("1000*.jpg"))[:5]  # 100000 and four of its edited copies
    for i, p in enumerate(copies):
        shutil.copy(p, folder / f"b{i}.jpg")
    torch.set_num_threads(1)
    cfg = load_config(preset="default", overrides={"images": str(folder)})
    refs = list_inputs(str(folder)).refs
    want = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)]
    assert [Path(r.key).name[:2] for r in refs] == want
    features = local_features(refs, cfg)
    views = [pair_geometry(features[i], features[i + 1], cfg) for i in (0, 2, 4)]
    near = [pair_geometry(features[6], features[j], cfg) for j in range(7, 11)]
    assert all(n >= cfg.finetune.min_inliers for n, _ in views + near), (views, near)
    assert not any(is_near_copy(*g) for g in views), views
    assert all(is_near_copy(*g) for g in near), near


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetune_validate_keeps_the_base_when_training_only_hurts(demo_images, tmp_path):
    from embedpipe.flows.config import backbone_overrides
    from embedpipe.workers.descriptors.backbones import load_backbone

    train = demo_subset(demo_images, tmp_path / "train", (1003, 1004, 1005), (200001, 200301))
    val = demo_subset(demo_images, tmp_path / "val", (1000, 1001, 1002), (201001, 201201))
    sets = [
        "--set", "finetune.max_side=48", "--set", "extract.max_side=64", "--set", "finetune.negatives=2",
        "--set", "finetune.tuples_per_step=8", "--set", "ray.num_cpus=2", "--set", "finetune.patience=1",
        "--set", "finetune.lr=0.5",
    ]  # fmt: skip
    # a validation image that is a training image (same bytes, another name): one clear error
    shutil.copy(next(train.glob("1003*.jpg")), val / "300001.jpg")
    bad = embedpipe("finetune", "--images", train, "--validate", val, "--out", tmp_path / "bad", *sets)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "also training images" in bad.stderr and "Traceback" not in bad.stderr
    (val / "300001.jpg").unlink()

    ft = tmp_path / "ft"
    done = embedpipe("finetune", "--images", train, "--validate", val, "--out", ft, "--epochs", 3, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((ft / "backbone.json").read_text())
    curve = info["validation"]["curve"]
    # lr 0.5 wrecks the trunk: epoch 1 is worse than the base, patience 1 stops before epoch 2
    assert [c["epoch"] for c in curve] == [0, 1] and curve[1]["map"] < curve[0]["map"]
    assert info["adapted"] is False and info["validation"]["best_epoch"] == 0
    assert info["max_side"] == 64 and info["gem_p"] == 3.0 and info["training"]["epochs"] == 1
    assert "kept the base model" in done.stdout
    # epoch 0 is the base model as a default run extracts it: PCA-whitened on the collection and L2
    # (a whitening of up to fit.dim dims fitted on 23 images hardly tells models apart: l2 picks)
    at_size = {"map_at_size", "l2_at_size", "pcaw_at_size"}  # the base at finetune.max_side too
    assert set(curve[0]) == {"epoch", "map", "l2", "pcaw", "post", *at_size} and curve[0]["post"] == "l2"
    assert curve[0]["map"] == curve[0]["l2"] and info["validation"]["post"] == "l2"
    # run --backbone FT_DIR: the base model itself, at the base's image size
    trunk, spec = load_backbone(str(ft))
    base, _ = load_backbone("efficientnet_lite0")
    a, b = trunk.state_dict(), base.state_dict()
    assert spec.gem_p is None and all(torch.equal(a[k], b[k]) for k in b)
    assert backbone_overrides(str(ft))["max_side"] == 64
    page = (ft / "report.html").read_text()
    assert "Validation" in page and "base model kept" in page
    # a run with it says once that the base is used, and warns when it evaluates the validation images
    import logging

    from embedpipe.flows.config import check_not_training_set

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("embedpipe")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    run_cfg = load_config(overrides={"images": str(val), "extract": {"backbone": str(ft)}})
    try:
        check_not_training_set(run_cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("using the base model efficientnet_lite0" in m for m in seen), seen
    assert any("validation collection" in m for m in seen), seen
    # the run report's rows extracted with FT_DIR name the validation result
    from embedpipe.workers.report.html import _with_validation

    rows = _with_validation([{"backbone": str(ft), "map": 0.5}, {"backbone": "other"}], run_cfg)
    assert rows[0]["validation"].startswith("base model kept") and "validation" not in rows[1]
