from embedpipe.workers.evaluate.protocols import holidays
from embedpipe.workers.ingest.demo_data import QUERY_PHOTOS, TRANSFORMS, generate_demo


def test_demo_is_deterministic(tmp_path, demo_images):
    again = generate_demo(tmp_path / "again")
    names = sorted(p.name for p in demo_images.glob("*.jpg"))
    assert names == sorted(p.name for p in again.root.glob("*.jpg"))
    for name in names:
        assert (demo_images / name).read_bytes() == (again.root / name).read_bytes(), name


def test_demo_follows_holidays_layout(demo_images):
    paths = sorted(str(p) for p in demo_images.glob("*.jpg"))
    gt = holidays(paths)
    assert len(gt.queries) == len(QUERY_PHOTOS)
    assert all(len(p) == len(TRANSFORMS) >= 4 for p in gt.positives)
    distractors = [p for p in paths if int(p[-10:-4]) % 100 != 0 and int(p[-10:-4]) // 100 >= 2000]
    assert len(distractors) >= 20


def test_demo_regenerates_only_when_needed(tmp_path):
    info = generate_demo(tmp_path)
    (tmp_path / "100001.jpg").unlink()
    assert generate_demo(tmp_path).n_images == info.n_images  # stamp matches: trusted as is
    assert generate_demo(tmp_path, seed=1).n_images == info.n_images
    assert (tmp_path / "100001.jpg").exists()
