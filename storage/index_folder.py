"""Index version folders: the files of one version of an index (``index/<name>/v0001/``, …; the versions
and ``CURRENT`` are ``storage.index_versions``), written and read back.

Every layout has ``ids.parquet``, the map ``row`` -> content ``id`` -> ``path`` of the index's FAISS ids.
Layouts of a version folder (``index.layout``): ``merged``: ``index.faiss``; ``ondisk`` (IVF only):
``index.faiss`` whose inverted lists are ``lists.ivfdata`` beside it; ``sharded``: one file per shard
under ``shards/`` and ``shards.json`` (file and row range of each), searched together, with the trained
empty index ``trained.faiss`` beside them (what later shards are filled from). An inverted file's shard
file holds its lists with an empty quantiser (``write_shard``; searched inside a copy of
``trained.faiss``, ``read_shard``); other shards, and every shard of versions written before, are whole.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import faiss
import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.storage import index_versions
from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import atomic_dir, atomic_path

IDS_FILE, INDEX_FILE = "ids.parquet", "index.faiss"
IVFDATA_FILE, SHARDS_DIR, SHARDS_FILE = "lists.ivfdata", "shards", "shards.json"
TRAINED_FILE = "trained.faiss"


def write_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as err:  # FAISS reports a failed write (full disk, ...) as RuntimeError
            if "write error" not in str(err):
                raise
            raise OSError(str(err).rsplit("(", 1)[-1].rstrip(")")) from err


def read_index(path: Path, ondisk: bool = False) -> faiss.Index:
    """Read an index file; ``ondisk``: its on-disk lists are the ``.ivfdata`` file in the same folder
    (wherever the folder was moved; the file also records its absolute path for other readers). The
    index file itself is read into memory: mapping it (``IO_FLAG_MMAP``) is not used for these."""
    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0)


def _inverted_file(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def _lists_only(ivf: faiss.IndexIVF | None) -> bool:
    """An inverted file read from a shard file written by ``write_shard``: its quantiser is empty."""
    return ivf is not None and ivf.nlist > 0 and ivf.quantizer.ntotal == 0


def write_shard(index: faiss.Index, path: Path) -> None:
    """A shard file of a sharded version. An inverted file's shard holds its lists: its coarse
    quantiser is written as an empty flat index (the real one is the version's ``trained.faiss``, once,
    so shard files do not grow with ``nlist``: a flat quantiser of 32,768 centroids of 256 floats is
    32 MB). ``faiss.read_index`` opens it (``ntotal``, the lists); ``read_shard`` makes it searchable.
    Other index types are written whole."""
    ivf = _inverted_file(index)
    if ivf is None:
        write_index(index, path)
        return
    quantizer, owned = ivf.quantizer, ivf.own_fields
    placeholder = faiss.IndexFlat(int(ivf.d), int(ivf.metric_type))
    ivf.own_fields, ivf.quantizer = False, placeholder
    try:
        write_index(index, path)
    finally:
        ivf.quantizer, ivf.own_fields = quantizer, owned


def read_shard(path: Path, trained: faiss.Index | None = None) -> faiss.Index:
    """A shard file as a searchable index: the lists of an inverted file's shard moved into a copy of
    ``trained`` (default: the ``trained.faiss`` of the shard's version, read once per process); a shard
    written whole (other index types, and every shard of versions written before) as it is."""
    shard = read_index(path)
    lists = _inverted_file(shard)
    if not _lists_only(lists):
        return shard
    if trained is None:
        version = Path(path).parent.parent
        trained = _trained(str(version / TRAINED_FILE), os.stat(version / TRAINED_FILE).st_mtime_ns)
    index = faiss.clone_index(trained)
    _move_lists(index, lists)
    return index


def merge_shard(index: faiss.Index, path: Path) -> None:
    """Append the vectors of shard file ``path`` to ``index`` (a copy of the version's trained index),
    as ``merge_from`` does; a lists-only shard needs no quantiser of its own for it."""
    shard = read_index(path)
    lists = _inverted_file(shard)
    if _lists_only(lists):
        _move_lists(index, lists)
    else:
        index.merge_from(shard, 0)


def _move_lists(index: faiss.Index, source: faiss.IndexIVF) -> None:
    """The entries of ``source``'s lists appended to ``index``'s inverted file (``source`` emptied)."""
    n = int(source.ntotal)
    ivf = _inverted_file(index)
    ivf.invlists.merge_from(source.invlists, 0)
    ivf.ntotal = index.ntotal = int(index.ntotal) + n


@functools.lru_cache(maxsize=1)
def _trained(path: str, mtime_ns: int) -> faiss.Index:
    return read_index(Path(path))


def shards_of(parts: list[faiss.Index]) -> faiss.IndexShards:
    """The shard indices searched as one: queries go to every shard in turn and the top-k lists are
    merged by score; ids are the shards' own (``successive_ids`` off), and the shards stay owned by
    Python (the wrapper keeps references to them, ``own_indices`` stays off)."""
    shards = faiss.IndexShards(int(parts[0].d), False, False)  # not threaded, ids as stored
    for part in parts:
        shards.add_shard(part)
    return shards


def empty_ids() -> pa.Table:
    return pa.table(
        {"row": pa.array([], pa.int64()), "id": pa.array([], pa.string()), "path": pa.array([], pa.string())}
    )


def write_ids(version: Path, ids: pa.Table) -> None:
    """``ids.parquet`` of a version folder being written (inside its ``atomic_dir``)."""
    pq.write_table(ids, version / IDS_FILE)


def save_ids(folder: Path, ids: pa.Table) -> None:
    """``ids.parquet`` in ``folder`` on its own, through a temporary name and a rename (the BoW inverted
    file's folder, which is not versioned)."""
    with atomic_path(folder / IDS_FILE) as tmp:
        pq.write_table(ids, tmp)


def read_ids(version: Path) -> pa.Table:
    """The ids table (row, id, path) of a version folder."""
    return pq.read_table(version / IDS_FILE)


def save_version(root: Path, index: faiss.Index, ids: pa.Table) -> Path:
    """Write ``index`` and its ids as a new version under ``root`` and switch CURRENT to it."""
    version = index_versions.new_version(root)
    with atomic_dir(version):  # a version that could not be written whole is removed, never published
        write_index(index, version / INDEX_FILE)
        pq.write_table(ids, version / IDS_FILE)
    index_versions.publish(root, version)
    return version


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.faiss"


def write_shards(version: Path, trained: faiss.Index, shards: list[dict], parts: list[faiss.Index]) -> None:
    """Shard files ``parts`` under ``version/shards`` named as in ``shards`` (entries
    {"file", "rows": [lo, hi)} for every shard of the version, in search order), the trained empty
    index beside them (what later shards are filled from) and ``shards.json``."""
    folder = version / SHARDS_DIR
    folder.mkdir(exist_ok=True)
    for part, entry in zip(parts, [s for s in shards if not (folder / s["file"]).exists()], strict=True):
        write_shard(part, folder / entry["file"])
    if not (version / TRAINED_FILE).exists():
        write_index(trained, version / TRAINED_FILE)
    (version / SHARDS_FILE).write_text(json.dumps({"shards": shards}, indent=1) + "\n")


def read_shards(version: Path) -> list[dict]:
    """The entries of ``shards.json``: {"file", "rows": [lo, hi)} per shard, in search order."""
    return json.loads((version / SHARDS_FILE).read_text())["shards"]


def index_layout(version: Path) -> str:
    """The layout of a version folder: 'sharded', 'ondisk' or 'merged'."""
    if (version / SHARDS_FILE).is_file():
        return "sharded"
    return "ondisk" if (version / IVFDATA_FILE).is_file() else "merged"


def read_version(version: Path) -> faiss.Index:
    """The index of a version folder as searched: merged, with its on-disk lists, or its shards."""
    layout = index_layout(version)
    if layout == "sharded":
        trained = read_index(version / TRAINED_FILE)
        files = [version / SHARDS_DIR / s["file"] for s in read_shards(version)]
        return shards_of([read_shard(f, trained) for f in files])
    return read_index(version / INDEX_FILE, ondisk=layout == "ondisk")


def live_version(root: Path) -> Path:
    """The published version folder of the index under ``root``; ``InputError`` when there is none."""
    version = index_versions.current(root)
    if version is None or not ((version / INDEX_FILE).is_file() or (version / SHARDS_FILE).is_file()):
        raise InputError(f"no published index under {root}")
    return version


def link_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to the immutable file ``src`` (a copy where links are not possible)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
