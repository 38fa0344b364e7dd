import io
import json
import os
import re
import tarfile
import time
from concurrent.futures import wait
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.storage.contracts.errors import DecodeError, InputError
from embedpipe.storage.dataset import (
    assign_shards,
    key_digests,
    known_tars,
    plan_listing,
    previous_shards,
    read_manifest,
    results_batch,
    write_plan_manifest,
    write_tar_stamps,
)
from embedpipe.workers.ingest.plan import plan_shards
from embedpipe.workers.ingest.sources import (
    expand_braces,
    known_tar_listings,
    list_inputs,
    listing_once,
    read_input,
    read_inputs,
    remote_shard_limits,
    sample_key,
)
from tests.ftp_fixture import ftp_server
from tests.helpers import write_webdataset
from tests.http_fixture import HOSTILE, serve, write_tar


def _manifest(path, plan, results: dict[int, dict]) -> pa.Table:
    """The dataset manifest of ``plan`` with ``results`` (position -> what reading the input gave),
    written to ``path`` and read back."""
    found, start = [], 0
    for n in plan.file.rows:  # each shard's rows
        found.append(results_batch([results.get(i) for i in range(start, start + n)]))
        start += n
    write_plan_manifest(path, plan, found)
    return read_manifest(path)


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
    _manifest(tmp_path / "dataset.parquet", plan, {})
    write_tar_stamps(tmp_path / "stamps.json", plan)
    known = known_tars(tmp_path / "dataset.parquet", tmp_path / "stamps.json")
    assert sorted(known) == sorted(str(p.resolve()) for p in shards)  # not the shard with a problem
    split = tmp_path / "split.parquet"  # a manifest whose shards span row groups, read a group at a time
    pq.write_table(read_manifest(tmp_path / "dataset.parquet"), split, row_group_size=3)
    across = known_tars(split, tmp_path / "stamps.json")
    assert sorted(across) == sorted(known)
    assert all(
        across[k][0] == known[k][0] and across[k][1].equals(known[k][1]) for k in reversed(sorted(known))
    )
    assert sum(len(members) for _, members in known.values()) == len(listing) - 1  # all but a.jpg's
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
        # a shard that cannot be read in place is a problem of that shard, not of the run
        norange, missing = f"{base}/norange/{shards[0].name}", f"{base}/missing.tar"
        mixed = list_inputs(f"{base}/{{norange/{shards[0].name},{shards[1].name},missing.tar}}")
        assert [r.key for r in mixed.refs] == [r.key for r in remote.refs if f"/{shards[1].name}/" in r.key]
        (n1, why1), (n2, why2) = mixed.problems
        assert (n1, n2) == (norange, missing)
        assert why1.startswith("unreadable tar shard: the server does not honour HTTP range requests")
        assert why2 == "unreadable tar shard: HTTP 404 Not Found"


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
    assert assign_shards(["a", "b", "c"], 2).tolist() == [0, 0, 1]
    assert assign_shards(["a", "new", "b", "c", "z"], 2, {"a": 0, "b": 0, "c": 1}).tolist() == [0, 2, 0, 1, 2]
    assert assign_shards(["a", "new"], 2, {"a": 0}, after=4).tolist() == [0, 5]
    root = tmp_path / "imgs"
    root.mkdir()
    files = sorted(small_holidays.glob("*.jpg"))
    for f in files[::2]:
        (root / f.name).write_bytes(f.read_bytes())
    first = plan_shards(root, 4)
    _manifest(tmp_path / "dataset.parquet", first, {})
    before = dict(zip(first.table.column("key").to_pylist(), first.shards.tolist(), strict=True))
    previous = previous_shards(tmp_path / "dataset.parquet")
    assert len(previous) == len(before)  # what it holds: a digest per key, never the keys
    assert previous.lookup(key_digests(list(before))).tolist() == list(before.values())
    assert previous.lookup(key_digests(["/not/planned.jpg"])).tolist() == [-1]
    for f in files[1::2]:  # new files sort between the old ones
        (root / f.name).write_bytes(f.read_bytes())
    second = plan_shards(root, 4, previous)
    assert plan_shards(root, 4, before).table.equals(second.table)  # a mapping plans alike
    after = dict(zip(second.table.column("key").to_pylist(), second.shards.tolist(), strict=True))
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
    rows = _manifest(tmp_path / "dataset.parquet", plan, results).to_pylist()
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


def test_a_hostile_url_holds_only_its_own_read(tmp_path, small_holidays):
    """The remote reads of a batch are in flight at once: the good rows' bytes are all in long before the
    hostile rows' deadline, the batch costs about one deadline (not one per hostile row), and decoding
    gives the same rows, in the same order, with the same errors, as reading one after the other did."""
    from embedpipe.flows.config import load_config
    from embedpipe.workers.engines.ray_stages import _columns, decode_batch, input_items

    photos = sorted(small_holidays.glob("*.jpg"))[:5]
    for p in photos:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    with serve(tmp_path) as (base, _):
        good = [f"{base}/{p.name}" for p in photos]
        hostile = [f"{base}/hostile/{kind}/{kind}.jpg" for kind in ("stall", "tarpit", "stall")]
        urls = [hostile[0], *good[:2], hostile[1], *good[2:], hostile[2]]
        rows = [(u, -1, -1) for u in urls] + [(str(photos[0]), -1, -1)]  # a local file: read in turn
        start = time.monotonic()
        reads = read_inputs(rows, timeout=1.5, retries=0, threads=16)
        done, _ = wait([reads[urls.index(u)] for u in good], timeout=1.0)
        assert len(done) == len(good) and time.monotonic() - start < 1.0
        assert not any(reads[urls.index(u)].done() for u in hostile)
        assert [r.result() for r in reads[1:3]] == [p.read_bytes() for p in photos[:2]]
        with pytest.raises(DecodeError, match="timed out after 1.5 s"):
            reads[0].result()
        assert reads[-1].result() == photos[0].read_bytes()
        assert time.monotonic() - start < 2 * 1.5  # in flight at once: under two deadlines (not three)

        cfg = load_config(preset="default", sets=["ingest.timeout_s=1.5", "ingest.retries=0"])
        start = time.monotonic()
        out = decode_batch(_columns(input_items(urls)), 64, cfg.ingest)
        took = time.monotonic() - start
    # one after the other would take three deadlines (4.5 s); at once, one deadline and the decoding,
    # bounded at two deadlines so that a busy machine's scheduling does not count as serial reads
    assert took < 2 * 1.5, took
    assert list(out["path"]) == urls
    assert [bool(e) for e in out["error"]] == [u in hostile for u in urls]
    assert all("timed out after 1.5 s" in e for e in out["error"] if e)


HOSTILE_SHARDS = {  # what listing a shard served wholly by each kind of hostile server reports
    "reset": r"unreadable tar shard: (RemoteProtocolError|ReadError): .* \(2 tries\)$",
    "truncated": r"unreadable tar shard: RemoteProtocolError: .* \(2 tries\)$",
    "html": r"unreadable tar shard: the server does not honour HTTP range requests",
    "busy": r"unreadable tar shard: HTTP 503 .*\(2 tries\)$",
    "ratelimit": r"unreadable tar shard: HTTP 429 .*\(2 tries\)$",
    "tarpit": r"unreadable tar shard: timed out after 0.5 s \(2 tries\)$",
    "loop": r"unreadable tar shard: too many redirects$",
    "stall": r"unreadable tar shard: timed out after 0.5 s \(2 tries\)$",
    "empty": r"unreadable tar shard: no bytes in the answer to a range request at byte 0$",
    "huge": r"unreadable tar shard: body larger than the range asked for \(\d+ bytes\): announces 10{10}",
    "notfound": r"unreadable tar shard: HTTP 404 Not Found$",
}
HOSTILE_MEMBERS = {  # what reading an image member whose range requests meet each kind reports
    "reset": r"unreadable URL: (RemoteProtocolError|ReadError): .* \(2 tries\)$",
    "truncated": r"unreadable URL: RemoteProtocolError: .* \(2 tries\)$",
    "html": r"container truncated",
    "busy": r"unreadable URL: HTTP 503 .*\(2 tries\)$",
    "ratelimit": r"unreadable URL: HTTP 429 .*\(2 tries\)$",
    "tarpit": r"unreadable URL: timed out after 0.5 s \(2 tries\)$",
    "loop": r"unreadable URL: too many redirects$",
    "stall": r"unreadable URL: timed out after 0.5 s \(2 tries\)$",
    "empty": r"container truncated",
    "huge": r"unreadable URL: body larger than ingest.max_bytes",
    "notfound": r"unreadable URL: HTTP 404 Not Found$",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_SHARDS))
def test_hostile_tar_shards_and_members_cost_a_bounded_time(tmp_path, small_holidays, kind):
    """A remote shard whose server misbehaves is a listing problem with a one-line reason, found within
    (retries + 1) x timeout plus back-off (the header reads have a total deadline and a cap too), beside
    the good shards listed in full; a shard whose headers come fine but whose image member's range
    requests meet a hostile server lists every sample, and only that member's read fails."""
    assert set(HOSTILE_SHARDS) == set(HOSTILE) == set(HOSTILE_MEMBERS)
    photos = sorted(small_holidays.glob("*.jpg"))[:3]
    members = [(p.name, p.read_bytes()) for p in photos]
    write_tar(tmp_path / "good.tar", members)
    write_tar(tmp_path / "hostile.tar", members)
    write_tar(
        tmp_path / "mixed.tar",
        [members[0], ("hostile.jpg", members[1][1]), ("hostile.cls", b"1"), members[2]],
    )
    with serve(tmp_path) as (base, _), remote_shard_limits(0.5, 1):
        start = time.perf_counter()
        listing = list_inputs(
            f"{base}/{{good.tar,hostile-tar/{kind}/hostile.tar,hostile-tar/{kind}/mixed.tar}}"
        )
        took = time.perf_counter() - start
        assert took < 2 * 0.5 + 1.0 + 1.0, took
        ((shard, reason),) = listing.problems
        assert shard == f"{base}/hostile-tar/{kind}/hostile.tar"
        assert re.search(HOSTILE_SHARDS[kind], reason) and "\n" not in reason, reason
        mixed = f"{base}/hostile-tar/{kind}/mixed.tar"
        assert [r.key for r in listing.refs] == [f"{base}/good.tar/{p.name}" for p in photos] + [
            f"{mixed}/{name}" for name in (photos[0].name, "hostile.jpg", photos[2].name)
        ]
        assert listing.refs[4].label == "1"
        start = time.perf_counter()
        reads = read_inputs([(r.uri, r.offset, r.length) for r in listing.refs], 0.5, 1, 1 << 20)
        for ref, read in zip(listing.refs, reads, strict=True):
            if ref.key.endswith("/hostile.jpg"):
                with pytest.raises(DecodeError, match=HOSTILE_MEMBERS[kind]):
                    read.result()
            else:
                assert read.result() == dict(members)[ref.key.rpartition("/")[2]]
        assert time.perf_counter() - start < 2 * 0.5 + 1.0 + 1.0


def test_inputs_on_an_fsspec_filesystem(tmp_path, small_holidays):
    """An fsspec URL (here fsspec's FTP filesystem against a real FTP server): a folder, a glob and a list
    file in it are listed with URLs that name the server, and the workers' reads fetch the files' bytes."""
    served = tmp_path / "served" / "photos"
    served.mkdir(parents=True)
    photos = sorted(small_holidays.glob("*.jpg"))[:4]
    for p in photos:
        (served / p.name).write_bytes(p.read_bytes())
    (served / "list.txt").write_text("".join(f"{p.name}\n" for p in photos[:2]))
    with ftp_server(tmp_path / "served") as (base, _):
        want = [f"{base}/photos/{p.name}" for p in photos]
        # a folder lists every file in it, as a local folder does (the list file is one more input)
        assert [r.uri for r in list_inputs(f"{base}/photos/").refs] == [*want, f"{base}/photos/list.txt"]
        assert [r.uri for r in list_inputs(f"{base}/photos/*.jpg").refs] == want
        assert [r.uri for r in list_inputs(f"{base}/photos/list.txt").refs] == want[:2]
        reads = read_inputs([(u, -1, -1) for u in want], timeout=10, retries=0)
        assert [r.result() for r in reads] == [p.read_bytes() for p in photos]
        with pytest.raises(DecodeError, match="missing file"):
            read_input(f"{base}/photos/nothere.jpg")
