"""``embedpipe reindex``: new inputs extracted alone, gone ones dropped, live indices updated without
retraining (checked against brute-force search of the final store), refit past the drift threshold."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe.flows.config import load_config
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import read_features
from embedpipe.workers.evaluate.database import run_ground_truth
from embedpipe.workers.evaluate.metrics import compute_map

from .helpers import embedpipe

pytestmark = pytest.mark.slow

SETS = [
    "extract.max_side=224",
    "extract.shard_size=8",
    "extract.descriptors=[gem]",
    "fit.dim=8",
    "ray.num_cpus=2",
]


def _sets() -> list[str]:
    return [a for s in SETS for a in ("--set", s)]


def _reindex(run: Path, images: Path, *sets: str):
    return embedpipe("reindex", run, "--images", images, *_sets(), *(a for s in sets for a in ("--set", s)))


def _brute_force_map(run: Path, images: Path) -> float:
    """mAP of exact inner-product search over the run's final store (no index involved)."""
    cfg = load_config(overrides={"images": str(images), "out": run, "protocol": "holidays"})
    meta, x = read_features(run / "features" / "gem")
    gt = run_ground_truth(RunLayout(run), cfg, meta.column("path").to_pylist())
    ranks = np.argsort(-(x[gt.queries] @ x.T), axis=1, kind="stable")
    return compute_map(ranks, gt.positives, gt.junk)["map"]


def _row(metrics: dict, post: str) -> dict:
    return next(r for r in metrics["results"] if r["post"] == post and r["rerank"] == "none")


def test_reindex_adds_new_drops_gone_and_keeps_models(tmp_path, demo_images, small_holidays):
    run = tmp_path / "run"
    first = embedpipe("run", "--images", small_holidays, "--protocol", "holidays", "--out", run, *_sets())
    assert first.returncode == 0, first.stderr[-3000:]
    records = run / "shards" / "extract"
    before = {p.name: p.stat().st_mtime_ns for p in records.glob("shard-*.json")}
    model = next((run / "models").glob("*.npz")).read_bytes()
    live = (run / "index" / "gem-l2" / "CURRENT").read_text()

    # one new group (a query and its copies) arrives, one distractor goes
    for p in sorted(demo_images.glob("1003*.jpg")):
        shutil.copy(p, small_holidays / p.name)
    gone = small_holidays / "200101.jpg"
    gone.unlink()
    out = _reindex(run, small_holidays, "reindex.drift_threshold=1")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())

    # two shards extracted: the new inputs' one, and the one that lost a file (its other rows kept)
    assert manifest["stages"]["extract"]["result"]["shards_done"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("shard-*.json")}
    changed = {name for name in after if before.get(name) != after[name]}
    assert len(changed) == 2 and len(after) == len(before) + 1
    lost = json.loads((records / sorted(changed)[0]).read_text())
    assert lost["reused"] == len(lost["inputs"]) > 0  # rows kept, nothing recomputed

    # models kept; each index is a new version holding exactly the store's rows
    assert next((run / "models").glob("*.npz")).read_bytes() == model
    assert metrics["reindex"]["refit"] is False
    assert (run / "index" / "gem-l2" / "CURRENT").read_text() != live
    store = pq.read_table(run / "features" / "gem", columns=["id", "path"])
    for root in (run / "index").iterdir():
        ids = pq.read_table(root / (root / "CURRENT").read_text().strip() / "ids.parquet")
        assert sorted(ids.column("path").to_pylist()) == sorted(store.column("path").to_pylist())
        assert str(gone) not in ids.column("path").to_pylist()
    assert metrics["dataset"]["n_queries"] == 4
    assert _row(metrics, "l2")["map"] == pytest.approx(_brute_force_map(run, small_holidays), abs=1e-12)

    # past the drift threshold: whitening refitted, indices retrained
    for p in sorted(demo_images.glob("1004*.jpg")):
        shutil.copy(p, small_holidays / p.name)
    refit = _reindex(run, small_holidays, "reindex.drift_threshold=0")
    assert refit.returncode == 0, refit.stderr[-3000:]
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["reindex"]["refit"] is True and metrics["reindex"]["drift"]["gem"] > 0
    assert next((run / "models").glob("*.npz")).read_bytes() != model
    assert _row(metrics, "l2")["map"] == pytest.approx(_brute_force_map(run, small_holidays), abs=1e-12)

    # up to date: nothing to do
    again = _reindex(run, small_holidays)
    assert again.returncode == 0 and "nothing to do" in again.stderr + again.stdout


def test_bench_reindex_writes_side_by_side_json(tmp_path, small_holidays):
    out = tmp_path / "bench.json"
    sets = ["extract.max_side=96", "extract.descriptors=[gem]", "fit.whiten=false", "rerank.methods=[]"]
    done = embedpipe(
        "bench", "reindex", "--images", small_holidays, "--fraction", "0.2", "--out", tmp_path / "work",
        "--json", out, *(a for s in sets for a in ("--set", s)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["name"] == "reindex" and result["new_images"] == round(23 * 0.2)
    assert result["ours"]["seconds"] > 0 and result["baseline"]["seconds"] > 0
    assert result["ratio"] == pytest.approx(
        result["baseline"]["seconds"] / result["ours"]["seconds"], rel=1e-2
    )
    assert result["ours"]["best_map"] == pytest.approx(result["baseline"]["best_map"], abs=1e-9)
    assert result["held_back"] == "spread" and result["prefect_start_s"] >= 0
    # the reindex timed before and after the full run, from the same state, with the same results
    ours, before, after = result["ours"], result["ours"]["before_full_run"], result["ours"]["after_full_run"]
    assert ours["seconds"] == pytest.approx((before["seconds"] + after["seconds"]) / 2, abs=2e-3)
    assert result["ratio_before_after"] == [
        pytest.approx(result["baseline"]["seconds"] / s["seconds"], rel=1e-2) for s in (before, after)
    ]
    assert ours["same_metrics"] is True
    for side in (before, after, result["baseline"]):
        assert set(side["stage_seconds"]) == {"extract", "fit", "evaluate"}
        assert {"list", "ray_start", "report"} <= set(side["phase_seconds"])
        assert side["extract_images_per_s"] > 0
    assert "drift" in before["phase_seconds"] and "drift" in after["phase_seconds"]
    assert before["stage_seconds"]["fit"] == after["stage_seconds"]["fit"] == 0.0  # models kept


def test_bench_holds_back_a_spread_or_a_tail():
    from embedpipe.flows.benchmarks.reindex import held_back

    files = [Path(f"{i:06d}.jpg") for i in range(106)]
    spread = held_back(files, 0.1, "spread")
    assert sum(spread) == 11 and spread[-1] and not any(spread[:8])
    gaps = np.diff(np.flatnonzero(spread))
    assert gaps.min() >= 9 and gaps.max() <= 10  # evenly over the collection
    assert held_back(files, 0.1, "tail") == [i >= 95 for i in range(106)]
    assert sum(held_back(files[:3], 0.5, "spread")) == 2
