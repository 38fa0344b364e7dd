"""``embedpipe table``: runs' metrics.json files (written as the contract gives them) assembled into one
comparison table: columns per dataset (distractors and revisited setups their own), rows per descriptor ×
post-processing × re-ranking, best cell of each column marked, the four output formats, the errors. The
same command on real runs is in test_compression.py."""

import csv
import io
import json
import math
from pathlib import Path

import pytest

from embedpipe.flows.cli import main
from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.report.table import build_table, count_label, dataset_name, render

from .helpers import embedpipe


def result(descriptor, post, dim, map_, rerank="none", backbone="efficientnet_lite0", **extra):
    return {
        "descriptor": descriptor,
        "post": post,
        "rerank": rerank,
        "backbone": backbone,
        "dim": dim,
        "index": "Flat",
        "bytes_per_vector": 4 * dim,
        "fitted_on": "this collection" if post.startswith("pcaw") else None,
        "map": map_,
        "mp@1": 1.0,
        "mp@5": 0.8,
        "mp@10": None if map_ is None else round(map_ / 2, 4),
        "time_s": 0.01,
        **extra,
    }


def write_run(root: Path, protocol: str, path: str, results: list, **more) -> Path:
    (root / "report").mkdir(parents=True)
    metrics = {
        "protocol": protocol,
        "dataset": {"path": path, "n_images": 100, "n_queries": 5, "n_quarantined": 0},
        "results": results,
        **more,
    }
    (root / "report" / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture
def runs(tmp_path):
    """Holidays, Oxford5k with 100k distractors (and its distractor curve), revisited Oxford."""
    holidays = write_run(
        tmp_path / "holidays",
        "holidays",
        "/data/holidays",
        [
            result("spoc", "l2", 1280, 0.70),
            result("spoc", "pcaw128", 128, 0.78),
            result("gem", "l2", 1280, 0.74),
            result("gem", "pcaw128", 128, 0.81),
            result("gem", "pcaw128", 128, 0.83, rerank="aqe"),
            result("hog", "pcaw128", 128, 0.41, backbone="opencv-hog"),
        ],
    )
    oxford = write_run(
        tmp_path / "oxford",
        "oxford5k",
        "/data/oxford5k",
        [
            result("spoc", "pcaw128", 128, 0.59, distractors=100000),
            result("gem", "pcaw128", 128, 0.63, distractors=100000),
            result("gem", "pcaw128", 128, 0.66, rerank="aqe", distractors=100000),
        ],
        distractor_curve=[
            {"distractors": n, "descriptor": d, "post": "pcaw128", "rerank": r, "map": m}
            for n, d, r, m in [
                (0, "spoc", "none", 0.65),
                (0, "gem", "none", 0.69),
                (0, "gem", "aqe", 0.72),
                (10000, "spoc", "none", 0.62),
                (10000, "gem", "none", 0.66),
                (10000, "gem", "aqe", 0.69),
                (100000, "spoc", "none", 0.59),
                (100000, "gem", "none", 0.63),
                (100000, "gem", "aqe", 0.66),
            ]
        ],
    )
    revisited = write_run(
        tmp_path / "rox",
        "roxford5k",
        "/data/roxford5k",
        [
            result(
                "gem",
                "pcaw128",
                128,
                0.45,
                map_easy=0.6,
                map_medium=0.45,
                map_hard=0.2,
                **{"mp@10_medium": 0.7, "mp@10_hard": 0.3},
            )
        ],
    )
    return [holidays, oxford, revisited]


def test_three_runs_at_128_dims(runs):
    table = build_table(runs, "map", dim=128)
    labels = [c.label for c in table.columns]
    assert labels == [
        "holidays",
        "oxford5k",
        "oxford5k +10k distractors",
        "oxford5k +100k distractors",
        "ROxf M",
        "ROxf H",
    ]
    keys = [r.key for r in table.rows]
    assert keys == [
        ("spoc", "efficientnet_lite0", "pcaw128", "none"),
        ("gem", "efficientnet_lite0", "pcaw128", "none"),
        ("gem", "efficientnet_lite0", "pcaw128", "aqe"),
        ("hog", "opencv-hog", "pcaw128", "none"),
    ]
    grid = [[table.cell(r, c) for c in table.columns] for r in table.rows]
    assert grid == [
        [0.78, 0.65, 0.62, 0.59, None, None],
        [0.81, 0.69, 0.66, 0.63, 0.45, 0.2],
        [0.83, 0.72, 0.69, 0.66, None, None],
        [0.41, None, None, None, None, None],
    ]
    assert [table.best(c) for c in table.columns] == [0.83, 0.72, 0.69, 0.66, 0.45, 0.2]


def test_markdown_marks_the_best_cell(runs):
    text = render(build_table(runs, "map", dim=128), "md")
    lines = text.splitlines()
    assert lines[0] == (
        "| descriptor | backbone | post | rerank | dim | holidays | oxford5k | oxford5k +10k distractors "
        "| oxford5k +100k distractors | ROxf M | ROxf H |"
    )
    assert (
        lines[2]
        == "| spoc | efficientnet_lite0 | pcaw128 | none | 128 | 0.7800 | 0.6500 | 0.6200 | 0.5900 | — | — |"
    )
    assert lines[4] == (
        "| gem | efficientnet_lite0 | pcaw128 | aqe | 128 "
        "| **0.8300** | **0.7200** | **0.6900** | **0.6600** | — | — |"
    )
    assert "**0.4500** | **0.2000** |" in lines[3]
    assert text.count("**") == 2 * 6  # one best cell per column
    assert "mAP; best of each column in bold; rows of dimension 128." in text


def test_all_dims_and_mp10(runs):
    table = build_table(runs, "mp@10")
    # without --dim every row is kept; the l2 rows come from the Holidays run alone
    assert ("gem", "efficientnet_lite0", "l2", "none") in [r.key for r in table.rows]
    # the distractor curve holds mAP only: mP@10 has one Oxford column, the run's own (100k)
    labels = [c.label for c in table.columns]
    assert labels == ["holidays", "oxford5k +100k distractors", "ROxf M", "ROxf H"]
    gem = next(r for r in table.rows if r.key == ("gem", "efficientnet_lite0", "pcaw128", "none"))
    assert [table.cell(gem, c) for c in table.columns] == [0.405, 0.315, 0.7, 0.3]
    assert table.best(table.columns[0]) == 0.415  # gem + aqe on Holidays


def test_csv_json_html(runs):
    table = build_table(runs, "map", dim=128)
    rows = list(csv.reader(io.StringIO(render(table, "csv"))))
    assert rows[0][:7] == ["descriptor", "backbone", "post", "rerank", "dim", "holidays", "holidays best"]
    aqe = rows[3]
    assert aqe[:4] == ["gem", "efficientnet_lite0", "pcaw128", "aqe"] and aqe[5:7] == ["0.83", "1"]
    assert rows[4][5:8] == ["0.41", "0", ""]  # hog: not best, no Oxford value
    doc = json.loads(render(table, "json"))
    assert doc["metric"] == "map" and doc["dim"] == 128
    assert doc["columns"][3] == {
        "label": "oxford5k +100k distractors",
        "run": str(runs[1]),
        "protocol": "oxford5k",
        "dataset": "oxford5k",
        "distractors": 100000,
        "setup": None,
    }
    assert doc["columns"][4]["setup"] == "medium"
    assert doc["rows"][2]["cells"][0] == {"value": 0.83, "best": True}
    assert doc["rows"][3]["cells"][1] == {"value": None, "best": False}
    page = render(table, "html")
    assert page.startswith("<!doctype html>") and page.count("<b>") == 6
    assert "<td class='best'><b>0.8300</b></td>" in page and "<th>ROxf H</th>" in page


def test_same_label_told_apart_and_names(tmp_path, runs):
    other = write_run(
        tmp_path / "holidays-b", "holidays", "/other/holidays/", [result("gem", "pcaw128", 128, 0.9)]
    )
    labels = [c.label for c in build_table([runs[0], other], dim=128).columns]
    assert labels == ["holidays [holidays]", "holidays [holidays-b]"]
    assert dataset_name("/data/set/*.jpg") == "set" and dataset_name("s3://b/shards-{000..009}.tar") == "b"
    counts = (999, 1000, 2500, 99782, 100071, 1_001_001)
    assert [count_label(n) for n in counts] == ["999", "1k", "2.5k", "99.8k", "100k", "1M"]
    demo = write_run(
        tmp_path / "demo", "holidays", "/tmp/run/demo-images", [result("gem", "l2", 1280, math.nan)]
    )
    (col,) = build_table([demo]).columns
    assert col.label == "holidays: demo-images" and build_table([demo]).best(col) is None


def test_errors(tmp_path, runs):
    with pytest.raises(InputError, match="is not a finished run"):
        build_table([runs[0], tmp_path / "nowhere"])
    with pytest.raises(InputError, match="no result rows with dim 77"):
        build_table(runs, dim=77)
    blind = write_run(tmp_path / "blind", "none", "/data/x", [result("gem", "l2", 1280, None)])
    with pytest.raises(InputError, match="protocol 'none'"):
        build_table([blind])
    bad = tmp_path / "bad" / "report"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{")
    with pytest.raises(InputError, match="not readable as JSON"):
        build_table([bad.parent])
    (bad / "metrics.json").write_text(
        json.dumps({"protocol": "holidays", "results": [{"descriptor": "gem"}]})
    )
    with pytest.raises(InputError, match="result 0 has no post, dim"):
        build_table([bad.parent])


def test_cli(tmp_path, runs, capsys):
    assert main(["table", *map(str, runs), "--dim", "128"]) == 0
    assert capsys.readouterr().out.startswith("| descriptor | backbone |")
    out = tmp_path / "table.csv"
    assert (
        main(["-q", "table", *map(str, runs), "--metric", "mp@10", "--format", "csv", "--out", str(out)]) == 0
    )
    assert f"written: {out}" in capsys.readouterr().out
    assert out.read_text().splitlines()[0].endswith("ROxf H,ROxf H best")
    # errors: exit 2, one line, no traceback (in a fresh process, as a user sees it)
    missing = embedpipe("table", runs[0], tmp_path / "nowhere", ephemeral=True, timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines()[-1] == (
        f"embedpipe: error: {tmp_path / 'nowhere'} is not a finished run (no report/metrics.json)"
    )
    assert "Traceback" not in missing.stderr


def test_classic_preset(tmp_path):
    """The classic preset validates, each of its descriptors is one the extractors know (a CNN pooling or a
    classical encoding of a stored local feature), its backbone passes the pre-run check, and the
    documented neural-codes variant (a torchvision VGG with a weights file) does too."""
    from embedpipe.flows.config import load_config
    from embedpipe.storage.contracts.errors import BackboneError
    from embedpipe.workers.descriptors.backbones import check_backbone
    from embedpipe.workers.descriptors.local import ENCODINGS, STORED_FEATURE, encoding_of, is_classical
    from embedpipe.workers.descriptors.pooling import POOLINGS

    cfg = load_config(preset="classic")
    names = cfg.extract.descriptors
    assert {"spoc", "mac", "gem", "rmac", "crow", "hog"} <= set(names)
    assert {f"{e}-rootsift" for e in ENCODINGS} <= set(names)
    for name in names:
        kind, feature = encoding_of(name)
        assert name in POOLINGS or name == "hog" or (kind in ENCODINGS and feature in STORED_FEATURE), name
    cnn = tuple(d for d in names if not is_classical(d))
    check_backbone(cfg.extract.backbone, cfg.extract.weights, cnn)
    assert cfg.fit.whiten and cfg.fit.dim == 128 and cfg.index.factory == "Flat" and cfg.rerank.methods == ()
    with pytest.raises(BackboneError, match="fc6/fc7 need a VGG-style torchvision backbone"):
        check_backbone(cfg.extract.backbone, None, ("fc6", "fc7"))
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"")
    vgg = load_config(
        preset="classic",
        sets=[
            "extract.backbone=torchvision:vgg16",
            f"extract.weights={weights}",
            "extract.descriptors=[fc6, fc7, spoc, mac, gem, rmac, crow]",
        ],
    )
    check_backbone(vgg.extract.backbone, vgg.extract.weights, vgg.extract.descriptors)


def test_ties_within_float_noise_are_all_best(tmp_path):
    run = write_run(
        tmp_path / "r",
        "holidays",
        "/data/holidays",
        [
            result("gem", "l2", 1280, 1.0),
            result("gem", "pcaw16", 16, 0.9999999999999999),
            result("hog", "l2", 9, 0.99),
        ],
    )
    doc = json.loads(render(build_table([run]), "json"))
    assert [r["cells"][0]["best"] for r in doc["rows"]] == [True, True, False]


def test_revisited_with_distractors(tmp_path):
    row = result("gem", "pcaw128", 128, 0.4, distractors=1_001_001, map_medium=0.4, map_hard=0.15)
    curve = [{"distractors": 0, "descriptor": "gem", "post": "pcaw128", "rerank": "none", "map": 0.5}]
    run = write_run(tmp_path / "r1m", "roxford5k", "/data/roxford5k", [row], distractor_curve=curve)
    table = build_table([run])
    assert [c.label for c in table.columns] == ["ROxf M +1M distractors", "ROxf H +1M distractors"]
    assert [table.cell(table.rows[0], c) for c in table.columns] == [0.4, 0.15]
