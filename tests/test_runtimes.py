"""Extraction runtimes: ONNX Runtime and OpenVINO against eager torch on real photos, determinism, the
``auto`` choice kept and reused, int8, clear errors, and the model actor path through Ray."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from pydantic import ValidationError

from embedpipe.storage.contracts.config import ExtractConfig
from embedpipe.storage.contracts.errors import BackboneError
from embedpipe.workers.extract import runtimes
from embedpipe.workers.extract.embed import Embedder

from .helpers import SMALL_RUN, decoded_batch, embedpipe

POOLS = ("gem", "spoc", "mac", "rmac", "crow")


def _photos(demo_images: Path, side: int = 320) -> list[np.ndarray]:
    """Three real photos of the demo set in three aspect ratios, longer side ``side``."""
    out = []
    crops = (("100000.jpg", None), ("100100.jpg", (0, 0, 300, 400)), ("100200.jpg", (0, 0, 400, 300)))
    for name, box in crops:
        img = Image.open(demo_images / name).convert("RGB")
        img = img.crop(box) if box else img
        img.thumbnail((side, side), Image.Resampling.BICUBIC)
        out.append(np.ascontiguousarray(np.asarray(img)))
    return out


def _cos(a: dict, b: dict) -> float:
    return min(float(a[k] @ b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(demo_images):
    images = _photos(demo_images)
    torch_emb = Embedder(ExtractConfig(descriptors=POOLS, max_side=320, runtime="torch"), threads=2)
    return images, [torch_emb(im) for im in images]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_matches_eager_torch_and_is_deterministic(runtime, reference, tmp_path):
    images, expected = reference
    cfg = ExtractConfig(descriptors=POOLS, max_side=320, runtime=runtime)
    emb = Embedder(cfg, threads=2, models_dir=tmp_path / "models")
    assert (emb.runtime, emb.precision) == (runtime, "fp32")
    record = json.loads((tmp_path / "models" / "runtime.json").read_text())
    assert record["runtime"] == runtime and record["reason"] == "configured"
    assert [p.name for p in (tmp_path / "models").glob("*.onnx")] == record["files"]
    got = emb.embed_many(images)
    for out, ref in zip(got, expected, strict=True):
        assert set(out) == set(POOLS) and _cos(out, ref) >= 0.9999
    # same image, a fresh session: the same bytes
    again = Embedder(cfg, threads=2, models_dir=tmp_path / "models")
    for image, out in zip(images, got, strict=True):
        for name, v in again(image).items():
            assert v.tobytes() == out[name].tobytes(), name


def test_auto_choice_is_kept_in_the_run_and_the_machine_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = ExtractConfig(descriptors=("gem",), max_side=96)
    with caplog.at_level(logging.INFO, logger="embedpipe.extract"):
        first = Embedder(cfg, threads=1, models_dir=tmp_path / "run1" / "models")
    assert first.runtime in runtimes.RUNTIMES and first.precision == "fp32"
    assert any("extract runtime:" in r.message and "measured" in r.message for r in caplog.records)
    record = json.loads((tmp_path / "run1" / "models" / "runtime.json").read_text())
    assert record["runtime"] == first.runtime
    assert record["requested"] == {"runtime": "auto", "precision": "fp32"}
    assert set(record["cosine"]) == {"torch fp32", "onnxruntime fp32", "openvino fp32"}
    assert all(c >= runtimes.PARITY for c in record["cosine"].values())
    (decision,) = (tmp_path / "cache" / "embedpipe" / "runtimes" / "decisions").glob("*.json")
    assert json.loads(decision.read_text())["record"] == record

    def no_measuring(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(runtimes.Resolver, "_measure", no_measuring)
    image = np.full((64, 80, 3), 127, np.uint8)
    # a later run on this machine: the same choice, the same bytes, the same record
    second = Embedder(cfg, threads=1, models_dir=tmp_path / "run2" / "models")
    assert second.runtime == first.runtime and second(image)["gem"].tobytes() == first(image)["gem"].tobytes()
    assert (tmp_path / "run2" / "models" / "runtime.json").read_bytes() == (
        tmp_path / "run1" / "models" / "runtime.json"
    ).read_bytes()
    # a resumed run keeps its own decision, even where this machine decided otherwise
    other = "openvino" if first.runtime != "openvino" else "onnxruntime"
    files = runtimes.model_files(runtimes.file_stem(cfg.backbone, record["weights"]), "fp32", 96)
    (tmp_path / "run1" / "models" / "runtime.json").write_text(
        json.dumps({**record, "runtime": other, "files": files})
    )
    resumed = Embedder(cfg, threads=1, models_dir=tmp_path / "run1" / "models")
    assert resumed.runtime == other
    # without a run folder: this machine's cache holds the exported model
    assert Embedder(cfg, threads=1).runtime == first.runtime
    assert list((tmp_path / "cache" / "embedpipe" / "runtimes" / "models").glob("*-fp32-dynamic.onnx"))


def test_bf16_falls_back_to_fp32_when_no_runtime_reaches_parity(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(runtimes, "PARITY", 1.5)  # nothing reaches it: bf16 and fp32 candidates alike
    with caplog.at_level(logging.INFO, logger="embedpipe.extract"):
        emb = Embedder(ExtractConfig(descriptors=("gem",), max_side=96, precision="bf16"), threads=1)
    assert (emb.runtime, emb.precision) == ("torch", "fp32")
    assert emb.runtime_record["reason"].startswith("auto: no bf16 runtime reached cosine 1.5")
    assert any("torch bf16" in r.message and "openvino bf16" in r.message for r in caplog.records)


def test_int8_runs_with_a_sane_cosine(reference, tmp_path):
    images, expected = reference
    cfg = ExtractConfig(descriptors=POOLS, max_side=320, precision="int8", runtime="auto")
    emb = Embedder(cfg, threads=2, models_dir=tmp_path / "models")
    assert emb.precision == "int8" and emb.runtime in ("onnxruntime", "openvino")
    assert any("-int8-dynamic-s320.onnx" in f for f in emb.runtime_record["files"])
    assert runtimes.INT8_FLOOR <= emb.runtime_record["cosine_min"] < 1.0
    for image, ref in zip(images, expected, strict=True):
        assert _cos(emb(image), ref) >= 0.9  # lossy, but the same descriptor


def test_unsupported_combinations_fail_with_one_line():
    for sets, match in (
        ({"runtime": "torch", "precision": "int8"}, "int8 needs extract.runtime"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "no bf16 CPU kernels"),
        ({"runtime": "openvino", "precision": "fp16"}, "fp16 is torch CUDA autocast"),
        ({"runtime": "onnxruntime", "device": "cuda"}, "runs on the CPU"),
    ):
        with pytest.raises(ValidationError, match=match):
            ExtractConfig(**sets)
    with pytest.raises(BackboneError, match="runs on the CPU"):
        runtimes.check_combination("openvino", "fp32", "cuda")  # device auto that found a GPU
    with pytest.raises(BackboneError, match="unknown extract.runtime"):
        runtimes.check_combination("tensorrt", "fp32", "cpu")


@pytest.fixture(scope="module")
def alexnet(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_fc_codes_and_per_image_errors_on_a_runtime(alexnet, demo_images, tmp_path):
    """fc6/fc7 come from the runtime's conv map through torch; a runtime's failure on one image is a
    RuntimeError, so the model actor quarantines that image only."""
    from embedpipe.workers.engines.ray_stages import EmbedActor

    base = {"backbone": "torchvision:alexnet", "weights": alexnet, "descriptors": ("fc6", "fc7", "gem")}
    photo = np.asarray(Image.open(demo_images / "100100.jpg").convert("RGB"))
    image = np.ascontiguousarray(photo[:180, :240])
    ref = Embedder(ExtractConfig(**base, runtime="torch"))(image)
    cfg = ExtractConfig(**base, runtime="onnxruntime", forward_batch=8).with_models_dir(tmp_path / "models")
    out = Embedder(cfg)(image)
    assert {k: v.shape for k, v in out.items()} == {"fc6": (4096,), "fc7": (4096,), "gem": (256,)}
    assert _cos(out, ref) >= 0.9999
    images = [photo[:180, :240], photo[:10, :10], photo[20:200, :240]]  # alexnet cannot pool a 10x10 map
    batch = decoded_batch(images, ["a", "t", "b"])
    actor = EmbedActor(cfg, threads=1)  # the run's models folder travels with the config
    assert actor.embedder.runtime == "onnxruntime"
    got = actor(batch)
    assert list(got["error"][[0, 2]]) == ["", ""] and got["error"][1].startswith("model failed on image:")
    assert np.array_equal(got["d_gem"][0], out["gem"])
    # the runtime's own exceptions are RuntimeErrors too (ONNX Runtime's are not)
    with pytest.raises(RuntimeError, match="^onnxruntime: "):
        actor.embedder.trunk(torch.zeros(1, 4, 64, 64))


def test_a_run_through_ray_on_a_runtime(small_holidays, tmp_path):
    run = tmp_path / "run"
    sets = [a for s in [*SMALL_RUN, "extract.runtime=onnxruntime"] for a in ("--set", s)]
    out = embedpipe("run", "--images", small_holidays, "--out", run, *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run / "models" / "runtime.json").read_text())
    assert (
        record["runtime"] == "onnxruntime"
        and [p.name for p in (run / "models").glob("*.onnx")] == record["files"]
    )
    assert "extract runtime: onnxruntime fp32 (configured)" in out.stderr + out.stdout
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert all(r["map"] >= 0.9 for r in metrics["results"]), metrics["results"]
    html = (run / "report" / "index.html").read_text()
    assert "Extraction runtime" in html and "onnxruntime fp32" in html
    assert len(pd.read_parquet(run / "features" / "gem")) == len(list(small_holidays.glob("*.jpg")))


def test_a_runtime_replaces_an_earlier_one_only_when_clearly_faster():
    times = {"openvino fp32": 110.0, "onnxruntime fp32": 104.0, "torch fp32": 300.0}
    assert runtimes.preferred(["openvino fp32", "onnxruntime fp32"], times) == "openvino fp32"
    times["onnxruntime fp32"] = 95.0  # at most MARGIN of the kept one's time
    assert runtimes.preferred(["openvino fp32", "onnxruntime fp32"], times) == "onnxruntime fp32"
    assert runtimes.preferred(["onnxruntime fp32"], times) == "onnxruntime fp32"


def test_bench_runtimes_measures_each_runtime_against_eager_torch(tmp_path):
    out = tmp_path / "runtimes.json"
    args = ("--max-side", 160, "--threads", 1, "--passes", 1, "--json", out)
    done = embedpipe("bench", "runtimes", *args, "--only", "openvino fp32,openvino bf16", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {f"{r['runtime']} {r['precision']}": r for r in result["rows"]}
    # auto's fp32 choice (ours) is measured too, whatever --only names
    assert list(rows)[:3] == ["torch fp32", "openvino fp32", "openvino bf16"]
    assert result["ours"]["runtime"] in rows and len(rows) <= 4
    assert rows["torch fp32"]["cosine_min"] >= 0.99999 and set(rows["torch fp32"]["cosine"]) == set(POOLS)
    assert rows["openvino fp32"]["cosine_min"] >= runtimes.PARITY
    # bf16 is lossy, but compiled per shape it stays close to fp32 on every pooling
    assert 0.99 <= rows["openvino bf16"]["cosine_min"] < 1.0
    assert all(r["deterministic"] for r in rows.values())
    base, ours = result["baseline"]["ms_per_image"], rows[result["ours"]["runtime"]]["ms_per_image"]
    assert result["ratio"] == round(base / ours, 3) and base == rows["torch fp32"]["ms_per_image"]
    bad = embedpipe("bench", "runtimes", "--only", "tensorrt fp32", "--json", tmp_path / "x.json")
    assert bad.returncode == 2 and "unknown tensorrt fp32" in bad.stderr
