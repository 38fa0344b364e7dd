"""The listing and the shard plan are Arrow columns, not one Python object per input: the plan of a large
listing holds no per-input Python objects, its fingerprint and shards are those of the object-per-input
plan it replaces (so existing runs resume as they were), and each shard's inputs are read back alone."""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import socket
import subprocess
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from embedpipe.storage.dataset import (
    assign_shards,
    plan_listing,
    previous_shards,
    read_manifest,
    results_batch,
    write_plan_manifest,
)
from embedpipe.storage.inputs import (
    DISTRACTOR_PREFIX,
    SPILL_SCHEMA,
    InputRef,
    Listing,
    SpillFile,
    as_distractors,
    spill_to,
)

N = 100_000


def _refs(n: int, start: int = 0) -> list[InputRef]:
    """Half files read whole, half members of tar shards of 1,000 (offsets, lengths, labels, stamps)."""
    out = []
    for i in range(start, start + n):
        if i % 2:
            tar = f"/data/shards/shard-{i // 1000:05d}.tar"
            out.append(
                InputRef(f"{tar}/{i:09d}.jpg", tar, 512 * i, 900 + i % 7, str(i % 5), f"8:9:{900 + i % 7}")
            )
        else:
            path = f"/data/photos/{i:09d}.jpg"
            out.append(InputRef(path, path, stamp=f"{1000 + i}:{i}"))
    return out


def _reference_plan(refs: list[InputRef], shard_size: int, previous: dict[str, int]):
    """The plan as it was computed on one Python object per input: (refs in stream order, shards,
    fingerprint)."""
    first_new = max(previous.values(), default=-1) + 1
    shards, n_new = [], 0
    for r in refs:
        if r.key in previous:
            shards.append(previous[r.key])
        else:
            shards.append(first_new + n_new // shard_size)
            n_new += 1
    order = sorted(range(len(refs)), key=lambda i: (shards[i], i))
    listing = hashlib.sha256()
    for r in refs:
        listing.update(r.signature())
    digest = hashlib.sha256(f"{listing.hexdigest()[:16]}\0{shard_size}\0".encode())
    digest.update(",".join(str(shards[i]) for i in order).encode())
    return [refs[i] for i in order], [shards[i] for i in order], digest.hexdigest()[:16]


def test_a_large_plan_holds_columns_not_objects():
    plan_listing(Listing(_refs(100)), "/data", 10)  # the modules it imports on first use, before tracing
    gc.collect()
    tracemalloc.start()
    try:
        listing = Listing()
        for ref in _refs(N):  # as the listing functions add them, one at a time
            listing.add(ref)
        plan = plan_listing(listing, "/data", 4096)
        del listing, ref
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 100,000 InputRefs with their strings would hold ~50 MB of Python objects; the plan holds none
    assert held < 2 * 2**20, f"{held / 2**20:.1f} MB of Python objects held by the plan"
    assert len(plan) == N and plan.n_shards == -(-N // 4096)
    assert plan.table.nbytes / N < 200  # Arrow bytes per input (keys, stamps, dictionary-coded uris)
    assert isinstance(plan.table, pa.Table)


@pytest.mark.parametrize("with_previous", [False, True])
def test_plan_matches_the_object_per_input_plan(with_previous):
    refs = _refs(20_000)
    previous = {}
    if with_previous:  # an earlier plan of every third input, in shards of 500
        previous = {r.key: i // 500 for i, r in enumerate(refs[::3])}
    ordered, shards, fingerprint = _reference_plan(refs, 700, previous)
    plan = plan_listing(Listing(refs), "/data", 700, previous or None)
    assert plan.fingerprint == fingerprint
    assert plan.shards.tolist() == shards
    assert list(plan.refs) == ordered
    for shard in (shards[0], shards[len(shards) // 2], shards[-1]):
        assert plan.refs_of(shard) == tuple(r for r, s in zip(ordered, shards, strict=True) if s == shard)
    assert plan.shard_sizes() == {s: shards.count(s) for s in sorted(set(shards))}
    assert plan.refs[5] == ordered[5] and plan.refs[-1] == ordered[-1]
    assert list(plan.refs[10:20:3]) == ordered[10:20:3]


def test_assign_shards_takes_a_table_or_a_mapping():
    keys = [f"k{i}" for i in range(10)]
    previous = {"k3": 7, "k5": 2}
    table = pa.table({"key": list(previous), "shard": list(previous.values())})
    by_map = assign_shards(keys, 4, previous)
    assert by_map.tolist() == [8, 8, 8, 7, 8, 2, 9, 9, 9, 9]
    assert assign_shards(pa.array(keys), 4, table).tolist() == by_map.tolist()


def test_distractor_keys_are_prefixed_and_read_from_where_they_were():
    refs = _refs(4)
    distractors = as_distractors(Listing(refs, [("/data/bad.jpg", "unreadable")]))
    assert [r.key for r in distractors.refs] == [DISTRACTOR_PREFIX + r.key for r in refs]
    assert [(r.uri, r.offset, r.length, r.label, r.stamp) for r in distractors.refs] == [
        (r.uri, r.offset, r.length, r.label, r.stamp) for r in refs
    ]
    assert distractors.problems == [(DISTRACTOR_PREFIX + "/data/bad.jpg", "unreadable")]


@pytest.mark.parametrize("with_previous", [False, True])
def test_distractors_join_the_plan_as_they_did(tmp_path, with_previous):
    """Distractor inputs go to shards after the collection's (and after any earlier plan's), and the
    plan's fingerprint is the one computed on objects before, so existing runs keep their stages."""
    from embedpipe.storage.contracts.config import Config
    from embedpipe.workers.ingest.inputs import with_distractors
    from embedpipe.workers.ingest.sources import list_inputs

    for folder, n in (("photos", 9), ("extra", 7)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            (tmp_path / folder / f"{i:03d}.jpg").write_bytes(b"x" * (i + 1))
    cfg = Config.model_validate({"images": str(tmp_path / "photos"), "distractors": str(tmp_path / "extra")})
    collection = list_inputs(cfg.images)
    extra_refs = [
        InputRef(DISTRACTOR_PREFIX + r.key, r.uri, r.offset, r.length, r.label, r.stamp)
        for r in list_inputs(cfg.distractors).refs
    ]
    previous = {}
    if with_previous:  # an earlier plan: two collection inputs in shard 3, a distractor in shard 5
        keys = [r.key for r in collection.refs]
        previous = {keys[0]: 3, keys[1]: 3, extra_refs[2].key: 5}
    plan = with_distractors(plan_listing(collection, cfg.images, 4, previous or None), cfg, previous or None)

    base = plan_listing(collection, cfg.images, 4, previous or None)
    last = max(
        [*base.shards.tolist(), *(s for k, s in previous.items() if not k.startswith(DISTRACTOR_PREFIX))]
    )
    first_new = max(last, *(s for k, s in previous.items() if k.startswith(DISTRACTOR_PREFIX)), -1) + 1
    extra_shards, n_new = [], 0
    for r in extra_refs:
        if r.key in previous:
            extra_shards.append(previous[r.key])
        else:
            extra_shards.append(first_new + n_new // 4)
            n_new += 1
    listing = hashlib.sha256()
    for r in extra_refs:
        listing.update(r.signature())
    digest = hashlib.sha256(f"{base.fingerprint}\0{listing.hexdigest()[:16]}\0".encode())
    digest.update(",".join(map(str, extra_shards)).encode())
    refs, shards = [*base.refs, *extra_refs], [*base.shards.tolist(), *extra_shards]
    order = sorted(range(len(refs)), key=lambda i: (shards[i], i))
    assert plan.fingerprint == digest.hexdigest()[:16]
    assert list(plan.refs) == [refs[i] for i in order]
    assert plan.shards.tolist() == [shards[i] for i in order]
    new = [s for r, s in zip(extra_refs, extra_shards, strict=True) if r.key not in previous]
    assert min(new) > max(base.shards.tolist())  # no shard mixes the collection and distractors


def test_a_spilled_listing_and_its_plan_hold_a_shard_not_the_collection(tmp_path):
    """Listed as every source is (``spill=True``) and planned as it streams, a collection is held in its
    spill files: the Arrow memory still held is a small part of the plan's bytes, and the plan is the one
    planned in memory, byte for byte."""
    n, folder = 150_000, tmp_path / ".spill"
    with spill_to(folder):
        plan_listing(Listing(_refs(100), spill=True), "/data", 10)  # first-use allocations, before measuring
        gc.collect()
        before = pa.total_allocated_bytes()
        listing = Listing(spill=True)
        for ref in _refs(n):
            listing.add(ref)
        plan = plan_listing(listing, "/data", 4096)
        gc.collect()
        held = pa.total_allocated_bytes() - before
    whole = plan.table
    assert held < whole.nbytes / 20, f"{held} bytes held for a plan of {whole.nbytes}"
    in_memory = plan_listing(Listing(_refs(n)), "/data", 4096)
    assert plan.fingerprint == in_memory.fingerprint and whole.equals(in_memory.table)
    assert plan.refs_of(17) == in_memory.refs_of(17) and len(plan.refs_of(17)) == 4096
    assert len(list(folder.iterdir())) == 2  # the listing's file and the plan's
    copy = pickle.loads(pickle.dumps(plan))  # a copy reads the same file and owns none
    assert copy.refs_of(36) == plan.refs_of(36)
    del copy
    gc.collect()
    assert plan.refs_of(36) == in_memory.refs_of(36)
    del listing, plan, whole
    gc.collect()
    assert not folder.exists()  # each file removed with its object, then the emptied folder


def test_spill_files_of_processes_that_are_gone_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    folder = tmp_path / ".spill"
    folder.mkdir()
    host = socket.gethostname()
    stale = folder / f"embedpipe-{int(gone.stdout)}@{host}-plan-0123456789ab.arrow"
    mine = folder / f"embedpipe-{os.getpid()}@{host}-plan-0123456789ab.arrow"
    elsewhere = (
        folder / f"embedpipe-{int(gone.stdout)}@other-{host}-plan-0123456789ab.arrow"
    )  # not ours to judge
    other = folder / "notes.txt"
    for path in (stale, mine, elsewhere, other):
        path.write_bytes(b"x")
    with spill_to(folder):
        made = SpillFile(SPILL_SCHEMA, "plan")
    assert made.path.parent == folder and made.path.name.startswith(f"embedpipe-{os.getpid()}@{host}-plan-")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [mine.name, elsewhere.name, other.name, made.path.name]
    )
    del made
    gc.collect()
    assert sorted(p.name for p in folder.iterdir()) == sorted([mine.name, elsewhere.name, other.name])


def test_the_manifest_written_a_shard_at_a_time_marks_each_repeat_with_its_first_input(tmp_path):
    """Repeated content across shards, inputs without an id, quarantined ones and entries rejected at
    listing: every row as a plain walk over the plan in order gives it."""
    refs = _refs(20_000)
    plan = plan_listing(Listing(refs, [("/data/bad.jpg", "unreadable")]), "/data", 700)
    rng = np.random.default_rng(0)
    ids = [f"{rng.integers(0, 15_000):064x}" if i % 97 else None for i in range(len(plan))]
    reasons = ["broken" if i % 41 == 0 else None for i in range(len(plan))]
    found, start = [], 0
    for n in plan.file.rows:
        rows = range(start, start + n)
        found.append(
            results_batch(
                [{"id": ids[i], "bytes": i, "width": 4, "height": 3, "reason": reasons[i]} for i in rows]
            )
        )
        start += n
    counts = write_plan_manifest(tmp_path / "dataset.parquet", plan, found)
    rows = read_manifest(tmp_path / "dataset.parquet").to_pylist()

    seen, expected = {}, []
    for ref, shard, id_, reason in zip(plan.refs, plan.shards.tolist(), ids, reasons, strict=True):
        first = seen.setdefault(id_, ref.key) if id_ is not None else ref.key
        expected.append(
            (
                ref.key,
                shard,
                id_,
                "quarantined" if reason else "ok",
                None if reason else 4,
                first if first != ref.key else None,
            )
        )
    got = [(r["key"], r["shard"], r["id"], r["status"], r["width"], r["duplicate_of"]) for r in rows[:-1]]
    assert got == expected
    assert (
        rows[-1]["key"] == "/data/bad.jpg" and rows[-1]["shard"] == -1 and rows[-1]["reason"] == "unreadable"
    )
    n_dup = sum(e[-1] is not None for e in expected)
    assert n_dup > 1000 and counts == {
        "inputs": len(plan) + 1,
        "quarantined": reasons.count("broken") + 1,
        "duplicates": n_dup,
    }


def test_a_plan_against_an_earlier_manifest_keeps_its_shards_and_holds_digests(tmp_path):
    """A resumed or reindexed run: the earlier plan comes from its manifest as key digests, the new
    inputs sit between the old ones in the listing, and the plan is the object-per-input plan's while
    the Arrow memory held stays a small part of it."""
    n = 60_000
    refs = _refs(n)
    manifest = tmp_path / "dataset.parquet"
    with spill_to(tmp_path / ".spill"):
        earlier = plan_listing(Listing([r for i, r in enumerate(refs) if i % 3]), "/data", 1000)
        write_plan_manifest(manifest, earlier, [results_batch([None] * k) for k in earlier.file.rows])
        previous = previous_shards(manifest)
        assert (
            previous.hi.nbytes + previous.lo.nbytes + previous.shards.nbytes + previous.distractor.nbytes
        ) == 25 * len(previous)
        gc.collect()
        before = pa.total_allocated_bytes()
        listing = Listing(spill=True)
        for ref in refs:
            listing.add(ref)
        plan = plan_listing(listing, "/data", 1000, previous)
        gc.collect()
        held = pa.total_allocated_bytes() - before
    old = dict(zip((r.key for r in earlier.refs), earlier.shards.tolist(), strict=True))
    ordered, shards, fingerprint = _reference_plan(refs, 1000, old)
    assert plan.fingerprint == fingerprint and plan.shards.tolist() == shards
    assert list(plan.refs) == ordered
    whole = plan.table.nbytes
    assert held < whole / 20, f"{held} bytes held for a plan of {whole}"
