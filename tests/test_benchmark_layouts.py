"""Oxford/Paris layouts inside a run: box-cropped external queries, the original gt/ lists and revisitop's
gnd pickle (Easy/Medium/Hard), on real photos; the run's own scores equal eval-ranks on its rankings, and
the compression study and the table read the run as it scored."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from embedpipe.flows.config import load_config
from embedpipe.flows.pipeline import pipeline
from embedpipe.storage.features import read_features
from embedpipe.workers.evaluate.eval_ranks import eval_ranks

from .helpers import embedpipe

pytestmark = pytest.mark.slow
GROUPS = (1000, 1001, 1002)
SETS = [
    "extract.max_side=256",
    "extract.descriptors=[gem]",
    "fit.dim=16",
    "fit.scheduler=threads",
    "rerank.methods=[aqe]",
    "ray.num_cpus=2",
]


@pytest.fixture
def oxford_like(tmp_path, demo_images):
    """``jpg/`` with three landmarks (a query photo and its six copies each) and four distractors, plus
    ``gt/`` in the original Oxford format and ``gnd_roxford5k.pkl`` in revisitop's."""
    root = tmp_path / "oxford"
    (root / "jpg").mkdir(parents=True)
    (root / "gt").mkdir()
    members: dict[int, list[str]] = {}
    photos = sorted(demo_images.glob("*.jpg"))
    for p in photos:
        imno = int(p.stem)
        if imno // 100 in GROUPS:
            name = f"land{imno // 100}_{imno % 100:06d}"
            members.setdefault(imno // 100, []).append(name)
            (root / "jpg" / f"{name}.jpg").write_bytes(p.read_bytes())
    for p in [p for p in photos if int(p.stem) >= 200000][:4]:  # distractors
        members.setdefault(-1, []).append(f"other_{p.stem}")
        (root / "jpg" / f"other_{p.stem}.jpg").write_bytes(p.read_bytes())
    boxes = {}
    for g in GROUPS:
        query = members[g][0]
        with Image.open(root / "jpg" / f"{query}.jpg") as img:
            w, h = img.size
        boxes[g] = (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)
        (root / "gt" / f"land{g}_1_query.txt").write_text(
            f"oxc1_{query} " + " ".join(f"{v:.1f}" for v in boxes[g]) + "\n"
        )
        (root / "gt" / f"land{g}_1_good.txt").write_text("\n".join(members[g][:5]) + "\n")
        (root / "gt" / f"land{g}_1_ok.txt").write_text("\n".join(members[g][5:6]) + "\n")
        (root / "gt" / f"land{g}_1_junk.txt").write_text("\n".join(members[g][6:]) + "\n")
    # revisited: the query photos are not in the database (imlist); easy / hard / junk copies
    imlist = sorted(n for g, names in members.items() for n in (names if g == -1 else names[1:]))
    where = {n: i for i, n in enumerate(imlist)}
    gnd = [
        {
            "bbx": np.array(boxes[g]),
            "easy": np.array([where[n] for n in members[g][1:4]]),
            "hard": np.array([where[n] for n in members[g][4:6]]),
            "junk": np.array([where[n] for n in members[g][6:]]),
        }
        for g in GROUPS
    ]
    qimlist = [members[g][0] for g in GROUPS]
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return root, imlist


def _db_to_imlist(run: Path, imlist: list[str], ranks: np.ndarray) -> np.ndarray:
    meta, _ = read_features(run / "features" / "gem")
    index = {n: i for i, n in enumerate(imlist)}
    to_imlist = np.array([index[Path(p).stem] for p in meta.column("path").to_pylist()])
    return to_imlist[ranks]


def test_oxford_and_revisited_layouts(tmp_path, oxford_like):
    root, imlist = oxford_like
    with prefect_test_harness(server_startup_timeout=180):
        classic = pipeline(
            load_config(
                overrides={"images": str(root), "out": tmp_path / "classic", "protocol": "oxford5k"},
                sets=SETS,
            )
        )
        revisited = pipeline(
            load_config(
                overrides={"images": str(root), "out": tmp_path / "rox", "protocol": "roxford5k"}, sets=SETS
            )
        )
    assert classic["dataset"]["n_queries"] == 3 and classic["dataset"]["n_images"] == len(imlist) + 3
    assert all(r["map"] >= 0.8 for r in classic["results"]), classic["results"]
    assert len(read_features(tmp_path / "classic" / "queries" / "gem")[1]) == 3

    assert revisited["dataset"]["n_images"] == len(imlist)  # query photos are not in the database
    rows = {(r["post"], r["rerank"]): r for r in revisited["results"]}
    for (post, rerank), row in rows.items():
        assert row["map"] == row["map_medium"] and row["map_easy"] >= 0.8, row
        ranks = _db_to_imlist(
            tmp_path / "rox", imlist, np.load(tmp_path / "rox" / "report" / row["ranks_file"])
        )
        reference = eval_ranks("roxford5k", root / "gnd_roxford5k.pkl", ranks)
        for setup in ("easy", "medium", "hard"):
            assert row[f"map_{setup}"] == pytest.approx(reference[setup]["map"], abs=1e-12), (
                post,
                rerank,
                setup,
            )
            assert row[f"mp@10_{setup}"] == pytest.approx(reference[setup]["mp@10"], abs=1e-12)
    html = (tmp_path / "rox" / "report" / "index.html").read_text()
    assert "land1000_000000" in html  # the query grid shows the query's source photo

    # the compression study searches the box crops' own descriptors: its exact row scores what the run
    # scored, for each of the Easy/Medium/Hard setups; then the run goes into a table
    out = embedpipe("study", "compression", "--run", tmp_path / "rox")
    assert out.returncode == 0, out.stderr[-4000:]
    rox = tmp_path / "rox" / "report"
    study = {r["index"]: r for r in json.loads((rox / "compression.json").read_text())}
    assert set(study) == {"Flat", "PCA16,PQ16x4", "PQ32x4", "PQ64x4", "PQ128x4"}, sorted(study)  # 22 images
    plain = rows[("l2", "none")]
    for setup in ("easy", "medium", "hard"):
        assert study["Flat"][f"map_{setup}"] == pytest.approx(plain[f"map_{setup}"], abs=1e-9), setup
    assert all(r["map"] == r["map_medium"] and 0 <= r["map_hard"] <= 1 for r in study.values())
    table = embedpipe("table", tmp_path / "rox", "--format", "json")
    assert table.returncode == 0, table.stderr[-2000:]
    doc = json.loads(table.stdout)
    assert [c["label"] for c in doc["columns"]] == ["ROxf: oxford M", "ROxf: oxford H"]
    (cells,) = [r["cells"] for r in doc["rows"] if (r["post"], r["rerank"]) == ("l2", "none")]
    assert [c["value"] for c in cells] == [plain["map_medium"], plain["map_hard"]]
