"""A reduced-precision run scored against fp32 on the same collection: the eager torch fp32 reference
pooled beside the int8 descriptors, its own stores, evaluated alike, and the mAP change per result row
in metrics.json and the report; nothing of it in an fp32 run."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from embedpipe.storage.contracts.config import Config, ExtractConfig
from embedpipe.workers.evaluate.stage import post_kind
from embedpipe.workers.extract.embed import Embedder
from embedpipe.workers.extract.reference import fp32_reference

from .helpers import SMALL_RUN, demo_subset, embedpipe

# whitened and re-ranked rows too: every result row gets its change; images small enough that neither
# run ranks every positive first, and that int8 and fp32 rank them differently
SETS = [*SMALL_RUN, "extract.max_side=64", "fit.whiten=true", "rerank.methods=[aqe]"]


def _run(images: Path, out: Path, *extra: str) -> dict:
    sets = [a for s in [*SETS, *extra] for a in ("--set", s)]
    done = embedpipe("run", "--images", images, "--out", out, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report" / "metrics.json").read_text())


def test_auto_is_on_for_a_reduced_precision_with_a_protocol():
    int8 = {"precision": "int8", "runtime": "onnxruntime"}
    assert fp32_reference(Config(extract=int8))
    assert not fp32_reference(Config(extract=int8, protocol="none"))
    assert fp32_reference(Config(extract={**int8, "fp32_reference": True}, protocol="none"))
    assert not fp32_reference(Config(extract={**int8, "fp32_reference": False}))
    assert not fp32_reference(Config(extract={"fp32_reference": True}))  # fp32 already


def test_the_reference_is_the_eager_torch_fp32_descriptor(demo_images, tmp_path):
    photo = Image.open(demo_images / "100100.jpg").convert("RGB")
    photo.thumbnail((128, 128))
    image = np.ascontiguousarray(np.asarray(photo))
    base = {"descriptors": ("gem", "spoc"), "max_side": 128}
    torch_fp32 = Embedder(ExtractConfig(**base, runtime="torch"), threads=1)(image)
    cfg = ExtractConfig(**base, precision="int8", runtime="onnxruntime", fp32_reference=True)
    emb = Embedder(cfg.with_models_dir(tmp_path / "models"), threads=1)
    assert emb.precision == "int8"
    assert set(emb.dims()) == {"gem", "spoc", "gem@fp32", "spoc@fp32"}
    out = emb(image)
    for name in base["descriptors"]:
        assert out[f"{name}@fp32"].tobytes() == torch_fp32[name].tobytes(), name
        assert out[name].tobytes() != torch_fp32[name].tobytes(), name  # int8 is lossy
    # auto is resolved by the extract stage: an embedder built from the bare config computes none
    auto = Embedder(cfg.model_copy(update={"fp32_reference": "auto"}), threads=1, models_dir=tmp_path / "m")
    assert set(auto(image)) == {"gem", "spoc"}


def test_an_int8_run_reports_its_map_change_against_an_fp32_run(demo_images, tmp_path):
    images = demo_subset(demo_images, tmp_path / "holidays", (1002, 1005, 1009), (200001, 200101))
    int8_run, fp32_run = tmp_path / "int8", tmp_path / "fp32"
    reduced = _run(images, int8_run, "extract.precision=int8", "extract.runtime=onnxruntime")
    full = _run(images, fp32_run, "extract.runtime=torch")

    # the reference store is the fp32 run's store, row for row and byte for byte
    ref = pd.read_parquet(int8_run / "features" / "gem@fp32")
    own = pd.read_parquet(fp32_run / "features" / "gem")
    assert list(ref["id"]) == list(own["id"])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ref["descriptor"], own["descriptor"], strict=True))

    change = reduced["precision_change"]
    assert (change["precision"], change["runtime"]) == ("int8", "onnxruntime")
    fp32_maps = {(r["descriptor"], r["post"], r["rerank"]): r["map"] for r in full["results"]}
    int8_maps = {(r["descriptor"], r["post"], r["rerank"]): r["map"] for r in reduced["results"]}
    keys = [(r["descriptor"], r["post"], r["rerank"]) for r in change["rows"]]
    assert sorted(keys) == sorted(int8_maps) and len(keys) == 4  # l2 and whitened, plain and αQE
    assert {post_kind(k[1]) for k in keys} == {"l2", "pcaw"}
    for row, key in zip(change["rows"], keys, strict=True):
        assert row["map"] == int8_maps[key]
        assert row["map_fp32"] == fp32_maps[key]
        assert row["change"] == row["map"] - row["map_fp32"]
    assert all(r["map_fp32"] < 1.0 for r in change["rows"])
    assert any(r["change"] != 0.0 for r in change["rows"])
    # the reference rows are no contract rows
    assert all("@" not in r["descriptor"] for r in reduced["results"])

    html = (int8_run / "report" / "index.html").read_text()
    assert "mAP change of int8 against fp32" in html
    assert all(f"{r['change']:+.4f}" in html for r in change["rows"])

    # an fp32 run has neither the stores nor the rows
    assert "precision_change" not in full
    assert not list((fp32_run / "features").glob("*@fp32"))
    assert "mAP change of" not in (fp32_run / "report" / "index.html").read_text()
