"""`embedpipe datasets`: fetch from a real HTTP or FTP server on 127.0.0.1 serving archives in a benchmark's
layout; checksums, resume, unsafe archives refused, nothing partial left behind."""

import hashlib
import io
import tarfile

import pytest
import yaml

from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.ingest import datasets as benchmarks

from .ftp_fixture import ftp_server
from .helpers import embedpipe
from .http_fixture import serve


def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archives(tmp_path, small_holidays):
    www = tmp_path / "www"
    www.mkdir()
    files = sorted(small_holidays.glob("*.jpg"))
    half = len(files) // 2
    sums = {
        "jpg1.tar.gz": _tar_gz(
            www / "jpg1.tar.gz", [(f"jpg/{f.name}", f.read_bytes(), "file") for f in files[:half]]
        ),
        "jpg2.tar.gz": _tar_gz(
            www / "jpg2.tar.gz", [(f"jpg/{f.name}", f.read_bytes(), "file") for f in files[half:]]
        ),
        "evil.tar.gz": _tar_gz(www / "evil.tar.gz", [("jpg/../../escape.txt", b"x", "file")]),
        "link.tar.gz": _tar_gz(www / "link.tar.gz", [("jpg/passwd", "../../../etc/passwd", "link")]),
    }
    return www, sums, len(files)


def _registry(path, base, sums, n, **override):
    entry = {
        "protocol": "holidays",
        "description": "a small Holidays",
        "archives": [
            {"url": f"{base}/{name}", "sha256": sums[name]} for name in ("jpg1.tar.gz", "jpg2.tar.gz")
        ],
        "counts": {"jpg/*.jpg": n},
    }
    entry.update(override)
    path.write_text(yaml.safe_dump({"mini": entry}))
    return path


def test_fetch_verify_and_refetch(tmp_path, archives):
    www, sums, n = archives
    root = tmp_path / "data"
    with serve(www) as (base, hits):
        reg = _registry(tmp_path / "reg.yaml", base, sums, n)
        listed = embedpipe("datasets", "list", "--registry", reg)
        assert listed.returncode == 0 and "mini" in listed.stdout and "oxford5k" in listed.stdout
        out = embedpipe("datasets", "fetch", "mini", "--root", root, "--registry", reg)
        assert out.returncode == 0, out.stderr
        assert f"--images {root / 'mini'} --protocol holidays" in out.stdout
        assert len(list((root / "mini" / "jpg").glob("*.jpg"))) == n
        ok = embedpipe("datasets", "verify", "mini", "--root", root, "--registry", reg)
        assert ok.returncode == 0 and "2 archive checksum(s) checked" in ok.stdout, ok.stderr
        again = embedpipe("datasets", "fetch", "mini", "--root", root, "--registry", reg)
        assert again.returncode == 0 and hits["/jpg1.tar.gz"] == 1  # already there: nothing downloaded
    next((root / "mini" / "jpg").glob("*.jpg")).unlink()
    bad = embedpipe("datasets", "verify", "mini", "--root", root, "--registry", reg)
    assert bad.returncode == 2 and f"jpg/*.jpg: {n - 1} files, expected {n}" in bad.stderr


def test_wrong_checksum_leaves_nothing(tmp_path, archives):
    www, sums, n = archives
    root = tmp_path / "data"
    with serve(www) as (base, _):
        reg = _registry(tmp_path / "reg.yaml", base, {**sums, "jpg2.tar.gz": "0" * 64}, n)
        out = embedpipe("datasets", "fetch", "mini", "--root", root, "--registry", reg)
    assert out.returncode == 2 and "jpg2.tar.gz: sha256" in out.stderr and "does not match" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (root / "mini").exists() and not (root / ".mini.partial").exists()
    assert not (root / ".downloads" / "jpg2.tar.gz").exists()


@pytest.mark.parametrize(
    "name, message", [("evil.tar.gz", "outside the dataset folder"), ("link.tar.gz", "points outside")]
)
def test_unsafe_archives_are_refused(tmp_path, archives, name, message):
    www, sums, n = archives
    root = tmp_path / "data"
    with serve(www) as (base, _):
        reg = _registry(
            tmp_path / "reg.yaml", base, sums, n, archives=[{"url": f"{base}/{name}", "sha256": sums[name]}]
        )
        with pytest.raises(InputError, match=message):
            benchmarks.fetch(benchmarks.lookup("mini", reg), root)
    assert not (tmp_path / "escape.txt").exists() and not (root / "escape.txt").exists()
    assert not (root / "mini").exists() and not (root / ".mini.partial").exists()


def test_download_resumes_with_a_range_request(tmp_path, archives):
    www, sums, _ = archives
    data = (www / "jpg1.tar.gz").read_bytes()
    dest = tmp_path / "jpg1.tar.gz"
    (tmp_path / "jpg1.tar.gz.part").write_bytes(data[:1000])
    with serve(www) as (base, hits):
        benchmarks.download(f"{base}/jpg1.tar.gz", dest)
    assert hits["range:/jpg1.tar.gz"] == 1000 and dest.read_bytes() == data
    assert not (tmp_path / "jpg1.tar.gz.part").exists()


def test_fetch_over_ftp(tmp_path, archives):
    """Holidays' official archives are ftp:// URLs: fetched, checked and extracted like http ones."""
    www, sums, n = archives
    root = tmp_path / "data"
    with ftp_server(www) as (base, _):
        reg = _registry(tmp_path / "reg.yaml", base, sums, n)
        out = embedpipe("datasets", "fetch", "mini", "--root", root, "--registry", reg)
        assert out.returncode == 0, out.stderr
        assert len(list((root / "mini" / "jpg").glob("*.jpg"))) == n
        missing = embedpipe(
            "datasets",
            "fetch",
            "mini",
            "--root",
            tmp_path / "other",
            "--registry",
            _registry(
                tmp_path / "bad.yaml",
                base,
                sums,
                n,
                archives=[{"url": f"{base}/nothere.tar.gz"}],
            ),
        )
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert lines[-1].startswith("embedpipe: error: cannot download") and "FTP 550" in lines[-1], lines
    assert not (tmp_path / "other" / "mini").exists()


def test_ftp_download_resumes_with_rest(tmp_path, archives):
    www, _, _ = archives
    data = (www / "jpg1.tar.gz").read_bytes()
    dest = tmp_path / "jpg1.tar.gz"
    (tmp_path / "jpg1.tar.gz.part").write_bytes(data[:1000])
    seen = []
    with ftp_server(www) as (base, rests):
        benchmarks.download(f"{base}/jpg1.tar.gz", dest, progress=lambda total, n: seen.append((total, n)))
    assert rests == [1000] and dest.read_bytes() == data
    assert seen[0] == (len(data), 1000) and sum(n for _, n in seen[1:]) == len(data) - 1000
    assert not (tmp_path / "jpg1.tar.gz.part").exists()


def test_distractor_sets_fetch_for_use_with_distractors(tmp_path, archives):
    r1m = benchmarks.lookup("revisitop1m")
    assert r1m.protocol == benchmarks.DISTRACTORS and len(r1m.archives) == 100
    assert r1m.archives[0].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.1.tar.gz"
    www, sums, n = archives
    root = tmp_path / "data"
    with serve(www) as (base, _):
        reg = _registry(tmp_path / "reg.yaml", base, sums, n, protocol="distractors")
        out = embedpipe("datasets", "fetch", "mini", "--root", root, "--registry", reg)
    assert out.returncode == 0, out.stderr
    assert f"(use --distractors {root / 'mini'})" in out.stdout
