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
    """Ours against the eager loops and Ray Data on the same real photos (the Daft peer needs its own
    environment: left out here, and said so in the JSON)."""
    out = embedpipe(
        "bench",
        "extract",
        "--images",
        small_holidays,
        "--n",
        6,
        "--peers",
        "eager,ray_data",
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
    assert result["runtime"] and result["precision"]
    peers = result["peers"]
    assert set(peers) == {"eager_nchw", "eager_channels_last", "ray_data", "daft"}
    assert peers["daft"] == {"skipped": "not asked for (--peers)"}
    for name in ("eager_nchw", "eager_channels_last", "ray_data"):
        side = peers[name]
        assert side["images"] == 6 and side["failed"] == 0, name
        assert side["ratio"] == pytest.approx(side["time_s"] / result["ours"]["time_s"], rel=1e-2), name
        assert side["images_per_s"] > 0
    assert 1 <= peers["eager_nchw"]["images_per_forward"] <= 4
    # every side's descriptors against the eager NCHW loop's, image by image
    assert result["cosine_reference"] == "eager_nchw"
    assert result["cosine_min"] >= 0.9999 and set(result["cosine_min_by_descriptor"]) == {"gem", "spoc"}
    assert peers["eager_channels_last"]["cosine_min"] >= 0.9999 and peers["ray_data"]["cosine_min"] >= 0.9999
    assert result["same_images"] is True
    assert result["ours"]["images"] == 6 and result["ours"]["failed"] == 0
    assert 0 < result["ours"]["first_batch_s"] <= result["ours"]["time_s"]
    faster = min(("eager_nchw", "eager_channels_last"), key=lambda k: peers[k]["time_s"])
    assert result["baseline"]["side"] == faster and result["ratio"] == peers[faster]["ratio"]
    assert result["ratio_engines"] == peers["ray_data"]["ratio"]
    assert result["sweep"] == []
    assert result["images"] == {"images": str(small_holidays), "distinct": 6}
    assert json.loads(out.stdout) == result
