"""Ground truth and the database split over the store's Arrow path column: the same ground truth as the
protocols' list functions, row for row, on Holidays names among fillers, odd names and distractors, on
Oxford/Paris layouts, UKBench and labels; and distractor rows never become Python strings."""

from __future__ import annotations

import tracemalloc
from pathlib import PurePath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import RunLayout
from embedpipe.storage.features import FeatureWriter
from embedpipe.storage.inputs import is_distractor
from embedpipe.workers.evaluate.database import (
    FirstById,
    StorePaths,
    database_split,
    read_database,
    run_ground_truth,
)
from embedpipe.workers.evaluate.protocols import (
    BenchmarkLayout,
    GroundTruth,
    _benchmark_rows,
    benchmark_ground_truth,
    file_stems,
    ground_truth,
    holidays,
    holidays_imno,
    labels,
    named_rows,
    on_positions,
    ukbench,
)
from embedpipe.workers.evaluate.run import distractor_count
from embedpipe.workers.report.html import _grids

ODD = [
    "123456.tar.jpg",  # stem 123456.tar
    "a/1234567.jpg",
    "x/123456",  # stem 123456: a Holidays image without a suffix
    "y/100300/",  # trailing slash: name 100300
    "z/./100400.jpg/.",
    "100500.",  # a trailing dot is no suffix: stem "100500."
    ".100600",
    "12345.jpg",
    "a123456.jpg",
    "100700\n.jpg",  # Python's $ matches before a final newline
    "١٠٠٨٠٠.jpg",  # Arabic-Indic digits are \d to Python's re
    "dir.d/100900.png",
    "http://host/a/101000.jpg?size=2",
    "",
    ".",
    "./",
    "/",
]


def _holidays_reference(paths: list[str]) -> GroundTruth:
    """The Holidays ground truth as it was computed over a Python list of every path."""
    imnos = [holidays_imno(p) for p in paths]
    groups = np.array([-1 if n is None else n // 100 for n in imnos])
    queries = np.array([i for i, n in enumerate(imnos) if n is not None and n % 100 == 0], dtype=np.int64)
    if queries.size == 0:
        raise InputError("holidays protocol: no query image")
    positives, junk = [], []
    for q in queries:
        same = np.flatnonzero(groups == groups[q])
        positives.append(same[same != q])
        junk.append(np.array([q], dtype=np.int64))
    return GroundTruth(queries, positives, junk, groups)


def _benchmark_reference(layout: BenchmarkLayout, paths: list[str]) -> GroundTruth:
    """The Oxford/Paris ground truth with names mapped over a Python dict of every path's stem."""
    return _benchmark_rows(layout, {PurePath(p).stem: i for i, p in enumerate(paths)}, len(paths))


def _holidays_paths(seed: int) -> list[str]:
    """Holidays images (groups of a query and its copies), filler rows and odd names, shuffled."""
    rng = np.random.default_rng(seed)
    paths = [
        f"holidays/{g * 100 + k:06d}.jpg" for g in range(1000, 1012) for k in range(int(rng.integers(1, 5)))
    ]
    paths += [f"filler/{i:09d}.jpg" for i in range(40)] + ODD
    paths += ["holidays/100001.jpg", "copy/100001.jpg"]  # one image number on two rows
    return [paths[i] for i in rng.permutation(len(paths))]


def _with_distractors(paths: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    extra = [f"distractor:/r1m/{p}" for p in ("100000.jpg", "100100.jpg", "abc.jpg", "x/100200")]
    extra += [f"distractor:/r1m/{i:06d}.jpg" for i in range(20)]
    out = paths + extra
    return [out[i] for i in rng.permutation(len(out))]


def assert_same(got: GroundTruth | None, want: GroundTruth | None) -> None:
    assert (got is None) == (want is None)
    if want is None:
        return
    assert got.queries.dtype == want.queries.dtype and np.array_equal(got.queries, want.queries)
    for name in ("positives", "junk"):
        a, b = getattr(got, name), getattr(want, name)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert (got.groups is None) == (want.groups is None)
    if want.groups is not None:
        assert got.groups.dtype == want.groups.dtype and np.array_equal(got.groups, want.groups)
    assert got.group_names == want.group_names and got.query_keys == want.query_keys
    assert (got.setups is None) == (want.setups is None)
    for name in want.setups or {}:
        assert_same(got.setups[name], want.setups[name])


def _list_split(paths: list[str], ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The database split as computed row by row in Python."""
    flags = np.fromiter((is_distractor(p) for p in paths), bool, len(paths))
    distractors = np.flatnonzero(flags)
    if ids is not None and distractors.size:
        distractors = distractors[np.argsort(np.array([ids[i] for i in distractors]), kind="stable")]
    return np.flatnonzero(~flags), distractors


def _list_run_ground_truth(paths: list[str], gt_of) -> GroundTruth | None:
    """The collection's ground truth from the list functions, restated over every row."""
    collection, _ = _list_split(paths)
    if len(collection) == len(paths):
        return gt_of(paths)
    gt = gt_of([paths[i] for i in collection])
    return None if gt is None else on_positions(gt, collection, len(paths))


def _cfg(protocol: str, images: str | None = None) -> Config:
    return Config(protocol=protocol, images=images)


def test_file_stems_are_pathlib_stems():
    rng = np.random.default_rng(0)
    alphabet = list("ab1./\n٣")
    fuzz = ["".join(rng.choice(alphabet, int(rng.integers(0, 9)))) for _ in range(3000)]
    paths = ODD + fuzz + [f"{p}/{q}" for p, q in zip(ODD, reversed(ODD), strict=True)]
    assert file_stems(pa.array(paths)).to_pylist() == [PurePath(p).stem for p in paths]
    assert file_stems(pa.array(paths, pa.large_string())).to_pylist() == [PurePath(p).stem for p in paths]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holidays_from_the_column_is_the_list_ground_truth(seed):
    paths = _holidays_paths(seed)
    want = _holidays_reference(paths)
    assert len(want.queries) > 5 and (want.groups >= 0).sum() > len(want.queries)
    column = pa.chunked_array([pa.array(paths[:10]), pa.array(paths[10:])])  # several chunks
    assert_same(holidays(column), want)
    assert_same(ground_truth("holidays", column), want)
    assert_same(ground_truth("holidays", paths), want)  # a list is converted


def test_holidays_without_a_query_is_refused_alike():
    paths = ["filler/000000123.jpg", "100001.jpg", "a/1234567.jpg"]
    with pytest.raises(InputError, match="no query image"):
        _holidays_reference(paths)
    with pytest.raises(InputError, match="no query image"):
        holidays(pa.array(paths))


@pytest.mark.parametrize("seed", [0, 1])
def test_run_ground_truth_with_distractors_is_the_list_one(tmp_path, seed):
    paths = _with_distractors(_holidays_paths(seed), seed)
    got = run_ground_truth(RunLayout(tmp_path), _cfg("holidays"), pa.array(paths))
    want = _list_run_ground_truth(paths, _holidays_reference)
    assert_same(got, want)
    assert not np.isin(np.flatnonzero([is_distractor(p) for p in paths]), got.queries).any()
    assert all((got.groups[i] == -1) for i, p in enumerate(paths) if is_distractor(p))
    assert_same(run_ground_truth(RunLayout(tmp_path), _cfg("holidays"), paths), want)  # a list still works


def test_database_split_is_the_list_split():
    rng = np.random.default_rng(4)
    paths = _with_distractors(_holidays_paths(3), 3)
    ids = [f"{int(v):02x}" for v in rng.integers(0, 12, len(paths))]  # many ties: stored order breaks them
    for want_ids in (ids, None):
        got = database_split(
            pa.chunked_array([paths[:7], paths[7:]]), None if want_ids is None else pa.array(ids)
        )
        want = _list_split(paths, want_ids)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == np.int64 and np.array_equal(a, b)
    empty = database_split(pa.chunked_array([], pa.string()), pa.chunked_array([], pa.string()))
    assert [a.size for a in empty] == [0, 0] and all(a.dtype == np.int64 for a in empty)


def test_ukbench_and_labels_from_the_column(tmp_path):
    layout = RunLayout(tmp_path)
    bench = [f"full/ukbench{i:05d}.jpg" for i in range(16)]
    paths = _with_distractors(bench, 5)
    got = run_ground_truth(layout, _cfg("ukbench"), pa.array(paths))
    assert_same(got, _list_run_ground_truth(paths, ukbench))
    classes = [f"{c}/{i}.jpg" for c in ("cat", "dog", "eel") for i in range(3)]
    paths = _with_distractors(classes, 6)
    got = run_ground_truth(layout, _cfg("labels"), pa.array(paths))
    assert_same(got, _list_run_ground_truth(paths, lambda p: labels(p, None)))
    assert got.group_names == ("cat", "dog", "eel")
    assert run_ground_truth(layout, _cfg("none"), pa.array(paths)) is None


def _benchmark(revisited: bool) -> BenchmarkLayout:
    names = [f"land{g}_{k:06d}" for g in range(3) for k in range(6)] + ["other_1", "other_2", "absent_1"]
    where = {n: i for i, n in enumerate(names)}
    if revisited:
        gnd = [
            {
                "easy": np.array([where[f"land{g}_{k:06d}"] for k in (1, 2)]),
                "hard": np.array([where[f"land{g}_000003"], where["absent_1"]]),
                "junk": np.array([where[f"land{g}_{k:06d}"] for k in (4, 5)]),
            }
            for g in range(3)
        ]
    else:
        gnd = [
            {
                "ok": [where[f"land{g}_{k:06d}"] for k in (1, 2, 3)] + [where["absent_1"]],
                "junk": [where[f"land{g}_000004"]],
            }
            for g in range(3)
        ]
    queries = tuple(f"land{g}_000000" for g in range(3))
    boxes = tuple((0.0, 0.0, 10.0, 10.0) for _ in range(3))
    protocol = "roxford5k" if revisited else "oxford5k"
    return BenchmarkLayout(protocol, queries, queries, boxes, tuple(names), gnd, revisited)


def _benchmark_paths() -> list[str]:
    paths = [f"jpg/land{g}_{k:06d}.jpg" for g in range(3) for k in range(6)]
    paths += ["jpg/other_1.jpg", "jpg/other_2.png", "copies/land1_000002.jpg"]  # a name twice: last row
    paths += ["jpg/land1_000002.jpg.bak", "jpg/xland0_000001.jpg", "jpg/land0_000001/", "x/other_1.tar.jpg"]
    paths += [f"filler/{i:09d}.jpg" for i in range(30)]
    return _with_distractors([paths[i] for i in np.random.default_rng(7).permutation(len(paths))], 7)


@pytest.mark.parametrize("revisited", [True, False])
def test_benchmark_from_the_column_is_the_list_ground_truth(revisited):
    layout = _benchmark(revisited)
    collection = [p for p in _benchmark_paths() if not is_distractor(p)]
    want = _benchmark_reference(layout, collection)
    assert_same(benchmark_ground_truth(layout, pa.array(collection)), want)
    assert_same(ground_truth(layout.protocol, pa.array(collection), benchmark=layout), want)
    paths = _with_distractors(["jpg/land0_000001.jpg"], 1) + _benchmark_paths()  # distractors named alike
    column = pa.array(paths)
    rows, _ = database_split(column)
    got = on_positions(ground_truth(layout.protocol, column.take(rows), benchmark=layout), rows, len(paths))
    assert_same(got, _list_run_ground_truth(paths, lambda p: _benchmark_reference(layout, p)))
    assert (got.setups is not None) == revisited
    # over the rows the layout may name alone (how the store is read a part at a time), restated
    named = rows[named_rows(layout.protocol, column.take(rows), layout)]
    assert 0 < len(named) < len(rows)
    restated = ground_truth(layout.protocol, column.take(named), benchmark=layout)
    assert_same(on_positions(restated, named, len(paths)), got)


def test_distractor_rows_never_become_python_strings(tmp_path):
    """200,000 distractor rows beside a few Holidays images: the ground truth and the split keep the
    driver's traced memory to a few numpy arrays, where the rows as Python strings take many times
    more (measured the same way on the same column)."""
    n = 200_000
    numbers = pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string())
    distractors = pc.binary_join_element_wise("distractor:/r1m/", pc.utf8_lpad(numbers, 6, "0"), ".jpg", "")
    mine = pa.array(["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg", "filler/000000123.jpg"])
    column = pa.chunked_array([distractors.slice(0, n // 2), mine, distractors.slice(n // 2)])
    ids = pc.binary_join_element_wise(
        "id-", pc.utf8_reverse(pc.cast(pa.array(np.arange(n + 5)), pa.string())), ""
    )
    layout, cfg = RunLayout(tmp_path), _cfg("holidays")

    def peak(work) -> int:
        tracemalloc.start()
        try:
            work()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    as_python = peak(lambda: column.to_pylist())
    assert as_python > 15_000_000
    assert peak(lambda: run_ground_truth(layout, cfg, column)) < 5_000_000
    assert peak(lambda: database_split(column, ids)) < 5_000_000
    gt = run_ground_truth(layout, cfg, column)
    assert gt.queries.tolist() == [n // 2, n // 2 + 2]
    assert [p.tolist() for p in gt.positives] == [[n // 2 + 1], [n // 2 + 3]]
    collection, ordered = database_split(column, ids)
    assert collection.tolist() == list(range(n // 2, n // 2 + 5)) and ordered.size == n


def _store(directory, paths: list[str], ids: list[str], cuts: list[int]) -> None:
    """A feature store of ``paths`` (4-d vectors) whose parts end at ``cuts`` (empty parts allowed)."""
    bounds = [0, *cuts, len(paths)]
    writer = FeatureWriter(directory, 4, len(bounds) - 1, {"descriptor": "gem", "backbone": "test"})
    for part, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if a < b:
            sizes = np.full(b - a, 8, np.int32)
            writer.write(part, ids[a:b], paths[a:b], sizes, sizes, np.ones((b - a, 4), np.float32))
    writer.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_reading_the_store_a_part_at_a_time_is_the_whole_column_reading(tmp_path, seed):
    """``read_database`` (the evaluation's reading) against the ground truth and split of the whole path
    column: the same rows, the same distractor order for every prefix asked, ids tied across parts."""
    rng = np.random.default_rng(seed)
    collection = _holidays_paths(seed)
    distractors = [f"distractor:/r1m/{i:06d}.jpg" for i in range(60)]
    paths = collection[:30] + distractors[:25] + collection[30:] + distractors[25:]  # mixed parts too
    ids = [f"{int(v):02x}" for v in rng.integers(0, 20, len(paths))]  # ties within and across parts
    cuts = sorted([*{int(c) for c in rng.integers(1, len(paths), 9)}, 30, 30])  # an empty part too
    _store(tmp_path / "gem", paths, ids, cuts)
    layout, cfg = RunLayout(tmp_path), _cfg("holidays")
    want_gt = run_ground_truth(layout, cfg, pa.array(paths))
    want_collection, want_order = database_split(pa.array(paths), pa.array(ids))
    assert_same(want_gt, _list_run_ground_truth(paths, _holidays_reference))
    for first in (0, 1, 7, 13, 59, 60, 500):
        got = read_database(layout, cfg, tmp_path / "gem", first)
        assert got.rows == len(paths) and got.n_distractors == len(distractors)
        assert np.array_equal(got.collection, want_collection)
        assert got.distractors.dtype == np.int64 and np.array_equal(got.distractors, want_order[:first])
        assert_same(got.gt, want_gt)
    assert read_database(layout, _cfg("none"), tmp_path / "gem").gt is None
    everything = np.concatenate([rng.permutation(len(paths)), [3, 3, len(paths) - 1]])
    assert StorePaths(tmp_path / "gem").take(everything).to_pylist() == [paths[i] for i in everything]
    assert StorePaths(tmp_path / "gem").take(np.empty(0, np.int64)).to_pylist() == []


def test_first_by_id_holds_a_bounded_number_of_rows():
    """The first k rows by id (nulls last, ties by position) of rows added a part at a time, holding at
    most 2k: the full sort's first k."""
    rng = np.random.default_rng(9)
    ids = [None if v == 0 else f"id{int(v):03d}" for v in rng.integers(0, 150, 5000)]
    want = np.array(sorted(range(len(ids)), key=lambda i: (ids[i] is None, ids[i] or "", i)), np.int64)
    for k in (1, 10, 333, 4990, 6000):
        order, most = FirstById(k), 0
        for a in range(0, len(ids), 97):
            order.add(ids[a : a + 97], np.arange(len(ids[a : a + 97])), a)
            most = max(most, order.held)
        assert np.array_equal(order.first(), want[:k])
        assert most < 2 * k + 97
    assert FirstById(0).first().size == 0


def test_distractor_count_from_the_manifest(tmp_path):
    layout = RunLayout(tmp_path)
    keys = ["a.jpg", "distractor:/x/1.jpg", "distractor:/x/2.jpg", "distractor:/x/3.jpg", "b.jpg", None]
    status = ["ok", "ok", "failed", "ok", "ok", "ok"]
    layout.dataset.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": pa.array(keys, pa.string()), "status": status}), layout.dataset)
    assert distractor_count(layout) == 2
    assert distractor_count(RunLayout(tmp_path / "none")) == 0


def test_query_grids_read_only_the_rows_shown(tmp_path):
    paths = [f"db/{i:06d}.jpg" for i in range(30)]
    gt = GroundTruth(
        np.array([0, 10], np.int64),
        [np.array([1, 2], np.int64), np.array([11], np.int64)],
        [np.array([0], np.int64), np.array([10], np.int64)],
    )
    ranks = np.array([[0, 1, 5, 2, -1], [10, 29, 11, 3, 4]], np.int64)
    page = _grids(
        ranks,
        gt,
        np.array([0.5, 0.25]),
        pa.chunked_array([paths]),
        pa.array([paths[0], paths[10]]),
        tmp_path / "none.parquet",
    )
    captions = [
        f"#{r + 1} {PurePath(paths[int(i)]).name}" for row in ranks[[1, 0]] for r, i in enumerate(row)
    ]
    positions = [page.index(c) for c in captions]
    assert positions == sorted(positions)  # the hardest query (AP 0.25) first, a -1 pad as the last row
    assert page.index("query · AP 0.2500") < page.index("query · AP 0.5000")
    assert page.count("class='pos'") == 3 and page.count("class='junk'") == 2


def test_thumbnail_locations_are_read_for_the_keys_asked_only(tmp_path):
    from embedpipe.storage.dataset import locations

    keys = [f"k{i}" for i in range(5)]
    table = pa.table({"key": keys, "uri": ["u"] * 5, "offset": list(range(5)), "length": [9] * 5})
    pq.write_table(table, tmp_path / "dataset.parquet")
    assert locations(tmp_path / "dataset.parquet", ["k3", "k1", "k3", "nope"]) == {
        "k1": ("u", 1, 9),
        "k3": ("u", 3, 9),
    }
    assert len(locations(tmp_path / "dataset.parquet")) == 5
    assert locations(tmp_path / "missing.parquet", ["k1"]) == {}
