import io
import json
import os
import tarfile
import time
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.storage.contracts.errors import DecodeError, InputError
from embedpipe.storage.dataset import (
    assign_shards,
    known_tars,
    manifest_rows,
    plan_listing,
    previous_shards,
    write_manifest,
    write_tar_stamps,
)
from embedpipe.workers.ingest.plan import plan_shards
from embedpipe.workers.ingest.sources import (
    expand_braces,
    known_tar_listings,
    list_inputs,
    listing_once,
    read_input,
    sample_key,
)
from tests.helpers import write_webdataset
from tests.http_fixture import serve


def test_brace_expansion():
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert sample_key("dir/x.seg.jpg") == ("dir/x", "seg.jpg") and sample_key("y") == ("y", "")


def test_folder_glob_and_lists(tmp_path, small_holidays):
    files = sorted(small_holidays.glob("*.jpg"))
    folder = list_inputs(small_holidays)
    assert [r.key for r in folder.refs] == [str(f.resolve()) for f in files]
    assert [r.key for r in list_inputs(f"{small_holidays}/1000*.jpg").refs] == [
        str(f.resolve()) for f in files if f.name.startswith("1000")
    ]
    # the same inputs as .txt, .csv (relative paths, labels) and .parquet lists
    (tmp_path / "l.txt").write_text("# photos\n" + "\n".join(str(f) for f in files) + "\n")
    rel = [f"../{small_holidays.name}/{f.name}" for f in files]
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "l.csv").write_text("path,label\n" + "".join(f"{p},{i % 3}\n" for i, p in enumerate(rel)))
    pq.write_table(pa.table({"url": [f"file://{f}" for f in files]}), tmp_path / "l.parquet")
    for spec in (tmp_path / "l.txt", sub / "l.csv"):
        assert [r.key for r in list_inputs(spec).refs] == [r.key for r in folder.refs]
    assert [r.uri for r in list_inputs(tmp_path / "l.parquet").refs] == [str(f) for f in files]
    assert [r.label for r in list_inputs(sub / "l.csv").refs][:4] == ["0", "1", "2", "0"]
    (tmp_path / "bad.csv").write_text("file,x\na,b\n")
    with pytest.raises(InputError, match="needs a 'path' or 'url' column"):
        list_inputs(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="images path not found"):
        list_inputs(tmp_path / "nothing")


def test_folder_walk_hidden_names_links_and_order(tmp_path):
    """Nested folders in path order, hidden files and folders skipped, a link to a file listed under its
    target's path, a linked folder not walked into, a dangling link left out; stamps are size:mtime."""
    root, outside = tmp_path / "photos", tmp_path / "elsewhere"
    for rel in ("b.jpg", "a/z.jpg", "a/b/c.jpg", "a-b.jpg", ".hidden.jpg", ".cache/x.jpg", "a/.d/y.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    outside.mkdir()
    (outside / "t.jpg").write_bytes(b"target")
    (root / "link.jpg").symlink_to(outside / "t.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    refs = list_inputs(root).refs
    base = root.resolve()
    assert [r.key for r in refs] == [
        str(base / "a-b.jpg"),
        str(base / "a/b/c.jpg"),
        str(base / "a/z.jpg"),
        str(base / "b.jpg"),
        str((outside / "t.jpg").resolve()),
    ]
    assert all(r.uri == r.key for r in refs)
    st = (outside / "t.jpg").stat()
    assert refs[-1].stamp == f"{st.st_size}:{st.st_mtime_ns}"
    assert refs[0].stamp.startswith(f"{len(b'a-b.jpg')}:")


def test_webdataset_shards_members_and_labels(tmp_path, small_holidays):
    files = sorted(small_holidays.glob("*.jpg"))
    labels = {f.name: int(f.stem) // 100 for f in files}
    shards = write_webdataset(files, str(tmp_path / "data-{:05d}.tar"), 7, labels)
    listing = list_inputs(f"{tmp_path}/data-{{00000..{len(shards) - 1:05d}}}.tar")
    assert len(listing.refs) == len(files) and not listing.problems
    for ref, f in zip(listing.refs, files, strict=True):
        assert ref.key.endswith(f"/{f.name}") and ref.label == str(labels[f.name])
        assert read_input(ref.uri, ref.offset, ref.length) == f.read_bytes()
    # a folder of shards is the same input; samples without an image, and img2dataset's failures, are reported
    with tarfile.open(tmp_path / "data-99999.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.json")
        data = json.dumps({"label": 1}).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    pq.write_table(
        pa.table(
            {
                "url": ["http://x/a.jpg", "http://x/b.jpg"],
                "status": ["success", "failed_to_download"],
                "error_message": [None, "404"],
            }
        ),
        tmp_path / "data-99999.parquet",
    )
    folder = list_inputs(tmp_path)
    assert [r.key for r in folder.refs] == [r.key for r in listing.refs]
    assert sorted(reason for _, reason in folder.problems) == [
        "download failed upstream: 404",
        "sample has no image member",
    ]


def test_unchanged_tar_shards_are_listed_from_the_last_plan(tmp_path, small_holidays):
    """A shard whose size and mtime did not change is not read again: its samples come from the
    dataset manifest; a changed shard, or one with a sample rejected at listing, is read."""
    files = sorted(small_holidays.glob("*.jpg"))
    labels = {f.name: int(f.stem) // 100 for f in files}
    root = tmp_path / "shards"
    root.mkdir()
    shards = [Path(p) for p in write_webdataset(files, str(root / "data-{:05d}.tar"), 7, labels)]
    with tarfile.open(root / "data-99999.tar", "w") as tar:  # a sample without an image
        for name, data in (("a.jpg", files[0].read_bytes()), ("lonely.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    listing = list_inputs(root)
    plan = plan_listing(listing, str(root), 4)
    write_manifest(tmp_path / "dataset.parquet", manifest_rows(plan, {}))
    write_tar_stamps(tmp_path / "stamps.json", plan)
    known = known_tars(tmp_path / "dataset.parquet", tmp_path / "stamps.json")
    assert sorted(known) == sorted(str(p.resolve()) for p in shards)  # not the shard with a problem
    with known_tar_listings(lambda: known):
        again = list_inputs(root)
    assert again.refs == listing.refs and again.fingerprint() == listing.fingerprint()
    # same size and mtime, other bytes: not read (the known samples stand); another mtime: read again
    st = shards[0].stat()
    shards[0].write_bytes(b"\0" * st.st_size)
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    with known_tar_listings(lambda: known):
        assert list_inputs(root).refs == listing.refs
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with known_tar_listings(lambda: known):
        changed = list_inputs(root)
    first = str(shards[0].resolve())
    assert [r.key for r in changed.refs] == [r.key for r in listing.refs if not r.key.startswith(first)]
    # the known shards are loaded once per scope, and not at all when the listing is a shared one
    loads = []
    with listing_once():
        shared = list_inputs(root)
        with known_tar_listings(lambda: loads.append(1) or known):
            assert list_inputs(root).refs == shared.refs == changed.refs
        assert loads == []
    with known_tar_listings(lambda: loads.append(1) or known):
        list_inputs(root)
    assert loads == [1]
    write_tar_stamps(tmp_path / "stamps.json", plan, whole=False)  # a benchmark's image list: nothing kept
    assert known_tars(tmp_path / "dataset.parquet", tmp_path / "stamps.json") == {}


def test_webdataset_shards_over_http_are_read_in_place(tmp_path, small_holidays):
    files = sorted(small_holidays.glob("*.jpg"))
    labels = {f.name: int(f.stem) // 100 for f in files}
    shards = write_webdataset(files, str(tmp_path / "data-{:05d}.tar"), 7, labels)
    pattern = f"data-{{00000..{len(shards) - 1:05d}}}.tar"
    local = list_inputs(f"{tmp_path}/{pattern}")
    with serve(tmp_path) as (base, hits):
        remote = list_inputs(f"{base}/{pattern}")
        assert not remote.problems and len(remote.refs) == len(files)
        for ref, near, f in zip(remote.refs, local.refs, files, strict=True):
            assert ref.key == f"{base}/{PurePosixPath(near.key).parent.name}/{PurePosixPath(near.key).name}"
            assert (ref.offset, ref.length, ref.label) == (near.offset, near.length, near.label)
            assert read_input(ref.uri, ref.offset, ref.length) == f.read_bytes()
        # listing jumps over image data: a few range requests per shard, no whole-shard GET
        assert all(hits.get(f"/{s.name}", 0) == hits.get(f"ranges:/{s.name}") for s in shards)
        assert sum(hits[f"ranges:/{s.name}"] for s in shards) <= 3 * len(files) + 2 * len(shards)
        with pytest.raises(InputError, match="does not honour HTTP range requests"):
            list_inputs(f"{base}/norange/{shards[0].name}")
        with pytest.raises(InputError, match="HTTP 404"):
            list_inputs(f"{base}/missing.tar")


def test_read_errors_are_one_line(tmp_path):
    with pytest.raises(DecodeError, match="^missing file$"):
        read_input(str(tmp_path / "gone.jpg"))
    (tmp_path / "t.tar").write_bytes(b"x" * 10)
    with pytest.raises(DecodeError, match="container truncated"):
        read_input(str(tmp_path / "t.tar"), 5, 100)


def test_http_reads_retry_and_time_out(tmp_path, small_holidays):
    f = sorted(small_holidays.glob("*.jpg"))[0]
    (tmp_path / "a.jpg").write_bytes(f.read_bytes())
    (tmp_path / "list.txt").write_text("a.jpg\nmissing.jpg\n")
    with serve(tmp_path) as (base, hits):
        listing = list_inputs(f"{base}/list.txt")
        assert [r.key for r in listing.refs] == [f"{base}/a.jpg", f"{base}/missing.jpg"]
        assert read_input(listing.refs[0].uri) == f.read_bytes()
        with pytest.raises(DecodeError, match="HTTP 404"):
            read_input(listing.refs[1].uri, retries=3)
        assert hits["/missing.jpg"] == 1  # a 404 is not retried
        with pytest.raises(DecodeError, match=r"HTTP 503.*\(3 tries\)"):
            read_input(f"{base}/flaky/a.jpg", retries=2)
        assert hits["/flaky/a.jpg"] == 3
        start = time.perf_counter()
        with pytest.raises(DecodeError, match="timed out after 0.5 s"):
            read_input(f"{base}/slow/a.jpg", timeout=0.5, retries=1)
        assert time.perf_counter() - start < 3.0  # bounded: never waits for the slow server


def test_shard_plan_is_stable_when_files_are_added(tmp_path, small_holidays):
    assert assign_shards(["a", "b", "c"], 2) == [0, 0, 1]
    assert assign_shards(["a", "new", "b", "c", "z"], 2, {"a": 0, "b": 0, "c": 1}) == [0, 2, 0, 1, 2]
    root = tmp_path / "imgs"
    root.mkdir()
    files = sorted(small_holidays.glob("*.jpg"))
    for f in files[::2]:
        (root / f.name).write_bytes(f.read_bytes())
    first = plan_shards(root, 4)
    write_manifest(tmp_path / "dataset.parquet", manifest_rows(first, {}))
    before = dict(zip(first.paths, first.shards, strict=True))
    assert previous_shards(tmp_path / "dataset.parquet") == before
    for f in files[1::2]:  # new files sort between the old ones
        (root / f.name).write_bytes(f.read_bytes())
    second = plan_shards(root, 4, before)
    after = dict(zip(second.paths, second.shards, strict=True))
    assert all(after[k] == s for k, s in before.items())
    assert min(after[k] for k in after if k not in before) == max(before.values()) + 1
    assert list(second.shards) == sorted(second.shards)  # stream order is shard order
    assert second.fingerprint != first.fingerprint


def test_manifest_marks_duplicates_and_quarantine(tmp_path, small_holidays):
    f = sorted(small_holidays.glob("*.jpg"))[0]
    root = tmp_path / "dups"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(f.read_bytes())
    (root / "c.jpg").write_bytes(b"")
    plan = plan_shards(root, 10)
    results = {
        0: {"id": "h1", "bytes": 9, "width": 4, "height": 3},
        1: {"id": "h1", "bytes": 9, "width": 4, "height": 3},
        2: {"id": "h0", "bytes": 0, "reason": "empty file"},
    }
    rows = manifest_rows(plan, results)
    assert [r["status"] for r in rows] == ["ok", "ok", "quarantined"]
    assert rows[1]["duplicate_of"] == rows[0]["key"] and rows[0]["duplicate_of"] is None
    assert rows[2]["reason"] == "empty file" and rows[2]["width"] is None


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("reset", r"unreadable URL: (RemoteProtocolError|ReadError).* \(2 tries\)"),
        ("truncated", r"unreadable URL: RemoteProtocolError.* \(2 tries\)"),
        ("busy", r"unreadable URL: HTTP 503 .* \(2 tries\)"),
        ("ratelimit", r"unreadable URL: HTTP 429 .* \(2 tries\)"),
        ("tarpit", r"unreadable URL: body larger than ingest.max_bytes \(65536 bytes\): announces 10000000"),
        ("loop", r"unreadable URL: too many redirects$"),
        ("stall", r"unreadable URL: timed out after 1 s \(2 tries\)"),
        ("huge", r"unreadable URL: body larger than ingest.max_bytes \(65536 bytes\): announces 10000000000"),
    ],
)
def test_hostile_servers_cost_a_bounded_time(kind, reason):
    """Each try of a remote read has ``timeout`` seconds for the whole request and a body cap: a hostile
    server costs at most (retries + 1) x timeout plus the back-off (or its Retry-After), then one line."""
    with serve(Path("/nonexistent")) as (base, hits):
        start = time.perf_counter()
        with pytest.raises(DecodeError, match=reason):
            read_input(f"{base}/hostile/{kind}/a.jpg", timeout=1.0, retries=1, max_bytes=65536)
        took = time.perf_counter() - start
        assert took < 2 * 1.0 + 1.0 + 1.0, took  # two tries, the 1 s pause between them, slack
        if kind in ("busy", "ratelimit"):
            assert hits[f"/hostile/{kind}/a.jpg"] == 2 and took >= 1.0  # Retry-After honoured
        if kind in ("loop", "huge", "tarpit"):
            assert hits.get(f"/hostile/{kind}/a.jpg", 0) <= 21  # not retried (a loop: one chain)


def test_a_body_dripping_past_the_deadline_times_out(tmp_path):
    """A body below the cap that keeps dripping is cut at the deadline, not at the gap between bytes."""
    with serve(tmp_path) as (base, _):
        start = time.perf_counter()
        with pytest.raises(DecodeError, match=r"timed out after 1 s \(2 tries\)"):
            read_input(f"{base}/hostile/tarpit/a.jpg", timeout=1.0, retries=1, max_bytes=64 << 20)
        assert time.perf_counter() - start < 2 * 1.0 + 0.5 + 1.0


def test_hostile_bodies_that_arrive_are_returned_for_decoding():
    """An HTML page or an empty body is read as it is; the decode step quarantines it."""
    with serve(Path("/nonexistent")) as (base, _):
        assert read_input(f"{base}/hostile/html/a.jpg", timeout=1.0, retries=0).startswith(b"<html>")
        assert read_input(f"{base}/hostile/empty/a.jpg", timeout=1.0, retries=0) == b""
