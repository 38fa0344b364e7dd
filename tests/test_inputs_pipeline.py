"""The same collection in every container gives the same features and mAP; broken inputs cost only their
own quarantine rows. Real engines: Prefect test harness, local Ray, a real HTTP server on 127.0.0.1."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from embedpipe.flows.config import load_config
from embedpipe.flows.pipeline import pipeline
from embedpipe.storage.features import read_features
from embedpipe.storage.quarantine import read_quarantine

from .helpers import write_webdataset
from .http_fixture import serve

pytestmark = pytest.mark.slow

SETS = [
    "extract.max_side=256",
    "extract.descriptors=[gem]",
    "extract.shard_size=8",
    "fit.dim=16",
    "fit.scheduler=threads",
    "rerank.methods=[dba]",
    "ray.num_cpus=2",
]


def _run(images, out, protocol="holidays"):
    cfg = load_config(overrides={"images": str(images), "out": out, "protocol": protocol}, sets=SETS)
    return pipeline(cfg)


@pytest.mark.timeout(1800)  # several full runs; a loaded host can take long
def test_every_container_gives_the_same_features_and_map(tmp_path, small_holidays):
    files = sorted(small_holidays.glob("*.jpg"))
    wds = tmp_path / "wds"
    wds.mkdir()
    write_webdataset(files, str(wds / "holidays-{:05d}.tar"), 9, {f.name: int(f.stem) // 100 for f in files})
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"{f}\n" for f in files))
    served = tmp_path / "www"
    shutil.copytree(small_holidays, served)
    (served / "urls.txt").write_text("".join(f"{f.name}\n" for f in files))
    shutil.copytree(wds, served / "wds")
    with prefect_test_harness(server_startup_timeout=180), serve(served) as (base, hits):
        runs = {
            "folder": _run(small_holidays, tmp_path / "r-folder"),
            "webdataset": _run(f"{wds}/holidays-{{00000..00002}}.tar", tmp_path / "r-wds"),
            "csv": _run(tmp_path / "list.csv", tmp_path / "r-csv"),
            "http": _run(f"{base}/urls.txt", tmp_path / "r-http"),
            "http-wds": _run(f"{base}/wds/holidays-{{00000..00002}}.tar", tmp_path / "r-http-wds"),
            "labels": _run(wds, tmp_path / "r-labels", protocol="labels"),
        }
    assert all(hits.get(f"/{f.name}", 0) >= 1 for f in files)  # the http run really read over http
    assert all(hits.get(f"ranges:/wds/{t.name}", 0) >= 1 for t in wds.iterdir())  # shards read in place
    reference = runs["folder"]["results"]
    assert reference[0]["map"] >= 0.9
    for name in ("webdataset", "csv", "http", "http-wds"):
        assert len(runs[name]["results"]) == len(reference)
        for a, b in zip(reference, runs[name]["results"], strict=True):
            assert (a["descriptor"], a["post"], a["rerank"]) == (b["descriptor"], b["post"], b["rerank"])
            assert abs(a["map"] - b["map"]) <= 1e-9, (name, a, b)
        meta_a, x_a = read_features(tmp_path / "r-folder" / "features" / "gem")
        meta_b, x_b = read_features(
            tmp_path / f"r-{'wds' if name == 'webdataset' else name}" / "features" / "gem"
        )
        assert np.array_equal(x_a, x_b) and meta_a.column("id") == meta_b.column("id"), name
    # the webdataset's .cls members are the classes of the labels protocol: every image queries
    assert runs["labels"]["dataset"]["n_queries"] == len(files)
    assert runs["labels"]["results"][0]["map"] >= 0.9
    manifest = pd.read_parquet(tmp_path / "r-labels" / "dataset.parquet")
    assert set(manifest["label"]) == {str(int(f.stem) // 100) for f in files}
    assert (manifest["status"] == "ok").all() and manifest["id"].str.len().eq(64).all()


def test_broken_files_cost_only_their_own_rows(tmp_path, small_holidays):
    root = tmp_path / "mixed"
    shutil.copytree(small_holidays, root)
    photo = sorted(root.glob("*.jpg"))[0]
    data = photo.read_bytes()
    bad = {
        "truncated.jpg": (data[: len(data) // 3], "truncated or corrupt"),
        "empty.jpg": (b"", "empty file"),
        "notes.jpg": (b"this is text, not a photo\n", "not an image"),
        "bomb.png": (None, "image too large"),
    }
    for name, (blob, _) in bad.items():
        if blob is None:
            Image.new("1", (12000, 12000)).save(root / name)
        else:
            (root / name).write_bytes(blob)
    # good but unusual, in the photo's group: CMYK JPEG, EXIF-rotated copy, a duplicate under another name
    group = int(photo.stem) // 100 * 100
    cmyk, rotated, copy = (root / f"{group + n}.jpg" for n in (90, 91, 92))
    Image.open(photo).convert("CMYK").save(cmyk, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(photo).save(rotated, exif=exif.tobytes(), quality=95)
    copy.write_bytes(data)
    with prefect_test_harness(server_startup_timeout=180):
        metrics = _run(root, tmp_path / "run")
    quarantine = {
        q["path"].rsplit("/", 1)[-1]: q
        for q in read_quarantine(tmp_path / "run" / "quarantine.parquet").to_pylist()
    }
    assert set(quarantine) == set(bad)
    for name, (_, reason) in bad.items():
        assert reason in quarantine[name]["reason"], quarantine[name]
    n_good = len(files := list(root.iterdir())) - len(bad)
    assert (
        metrics["dataset"]["n_images"]
        == n_good
        == len(pd.read_parquet(tmp_path / "run" / "features" / "gem"))
    )
    manifest = pd.read_parquet(tmp_path / "run" / "dataset.parquet").set_index("key")
    assert len(manifest) == len(files)
    assert manifest.loc[str(copy.resolve()), "duplicate_of"] == str(photo.resolve())
    turned = manifest.loc[str(rotated.resolve())]
    with Image.open(photo) as img:
        assert (turned["width"], turned["height"]) == (img.height, img.width)
    assert all(r["map"] >= 0.9 for r in metrics["results"]), metrics["results"]


def test_orientation_correction_turns_stored_rotations_upright(tmp_path, small_holidays):
    """Photos stored on their side (as in the original Holidays) and a correction list: the corrected run
    describes them as the upright photos, the uncorrected one does not."""
    upright, turned = tmp_path / "upright", tmp_path / "turned"
    upright.mkdir()
    turned.mkdir()
    files = sorted(small_holidays.glob("*.jpg"))
    sideways = [f.stem for f in files if f.stem.endswith("01")]  # a non-query image of each group
    for f in files:
        pixels = np.asarray(Image.open(f).convert("RGB"))
        Image.fromarray(pixels).save(upright / f"{f.stem}.png")
        Image.fromarray(np.rot90(pixels) if f.stem in sideways else pixels).save(turned / f"{f.stem}.png")
    rotations = tmp_path / "holidays_rotations.txt"
    rotations.write_text("".join(f"{stem}.png 90\n" for stem in sideways))

    def gem(run):
        meta, x = read_features(tmp_path / run / "features" / "gem")
        return dict(zip([p.rsplit("/", 1)[-1][:-4] for p in meta.column("path").to_pylist()], x, strict=True))

    with prefect_test_harness(server_startup_timeout=180):
        _run(upright, tmp_path / "r-upright")
        _run(turned, tmp_path / "r-turned")
        cfg = load_config(
            overrides={"images": str(turned), "out": tmp_path / "r-fixed", "protocol": "holidays"},
            sets=[*SETS, f"ingest.rotations={rotations}"],
        )
        pipeline(cfg)
    ref, raw, fixed = gem("r-upright"), gem("r-turned"), gem("r-fixed")
    assert len(sideways) >= 3 and set(ref) == set(fixed)
    for stem in ref:
        cos = float(np.dot(ref[stem], fixed[stem]))
        assert cos > 0.995 if stem in sideways else np.array_equal(ref[stem], fixed[stem]), (stem, cos)
    assert all(float(np.dot(ref[s], raw[s])) < 0.98 for s in sideways)
    manifest = pd.read_parquet(tmp_path / "r-fixed" / "dataset.parquet")
    turned_rows = manifest[manifest["key"].str.contains("|".join(sideways))]
    assert (turned_rows["width"] > turned_rows["height"]).tolist() == [
        Image.open(small_holidays / f"{s}.jpg").width > Image.open(small_holidays / f"{s}.jpg").height
        for s in sorted(sideways)
    ]
