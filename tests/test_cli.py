import json

import pytest

from .helpers import embedpipe


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["bench"], ["bench", "extract"], ["presets"]])
def test_help(command):
    out = embedpipe(*command, "--help")
    assert out.returncode == 0 and "usage: embedpipe" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--images", "/nonexistent/photos"], "images path not found: /nonexistent/photos"),
        (["run"], "no images given"),
        (["run", "--images", ".", "--set", "extract.bogus=1"], "unknown config key 'extract.bogus'"),
        (["run", "--images", ".", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "/nonexistent.yaml"], "config file not found"),
        (["bench", "extract", "--n", "0"], "--n must be at least 1"),
        (
            ["run", "--images", ".", "--set", "extract.backbone=torchvision:vgg16"],
            "needs a local weights file",
        ),
        (["run", "--images", ".", "--set", "extract.descriptors=[fc6]"], "fc6/fc7 need a VGG-style"),
        (["run", "--images", ".", "--set", "extract.scales=[0]"], "scales must be"),
        (["bench", "extract", "--sweep", "1,x"], "--sweep expects comma-separated actor counts"),
        (["bench", "ingest", "--max-side", "8"], "--max-side must be at least 32"),
        (["bench", "ingest", "--images", "/nonexistent/photos"], "--images must be a folder of image files"),
        (["bench", "train", "--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    out = embedpipe(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedpipe: error:") and message in lines[0]
    assert "Traceback" not in out.stderr


def test_argparse_errors_exit_2():
    assert embedpipe().returncode == 2
    assert embedpipe("run", "--protocol", "nope").returncode == 2


@pytest.mark.slow
def test_bench_extract_writes_side_by_side_json(tmp_path, small_holidays):
    out = embedpipe(
        "bench",
        "extract",
        "--images",
        small_holidays,
        "--n",
        6,
        "--sweep",
        "1,2",
        "--set",
        "extract.max_side=256",
        "--set",
        "extract.forward_batch=4",
        "--json",
        tmp_path / "b.json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["name"] == "extract" and result["n_images"] == 6
    assert result["device"] == "cpu" and result["forward_batch"] == 4
    assert 1 <= result["images_per_forward"] <= 4
    for side in ("ours", "baseline"):
        assert result[side]["time_s"] > 0 and result[side]["failed"] == 0
    assert 0 < result["ours"]["first_batch_s"] <= result["ours"]["time_s"]
    assert [r["actors"] for r in result["sweep"]] == [1, 2] and all(r["failed"] == 0 for r in result["sweep"])
    assert result["ratio"] == pytest.approx(result["baseline"]["time_s"] / result["ours"]["time_s"], rel=1e-3)
    assert json.loads(out.stdout) == result
