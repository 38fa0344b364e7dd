"""The records of listed inputs that the dataset manifest and the shard records persist: ``InputRef`` (one
input), ``Listing`` (the inputs of a source) and ``KnownTars`` (tar shards listed before).

A listing keeps its inputs as Arrow record batches (``REF_SCHEMA``), not as one Python object per input:
``RefView`` reads them back as ``InputRef``s a chunk at a time, so a collection of millions of inputs costs
its column bytes, not an object and its strings per input (docs/scaling.md has the measurement). A listing
made with ``spill=True`` (every source's, ``workers.ingest.sources.list_inputs``) writes its batches to a
``SpillFile`` as it grows and reads them back one at a time: the process holds a chunk, not the listing.

Listing itself (every form ``--images`` accepts) and reading inputs are in ``workers.ingest.sources``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc


@dataclass(frozen=True)
class InputRef:
    """One input: ``key`` names it in every output (a path, a URL, or ``shard.tar/member``), ``uri`` is
    what is read (with ``offset``/``length`` for a member inside a container)."""

    key: str
    uri: str
    offset: int = -1
    length: int = -1
    label: str | None = None
    stamp: str = ""  # what changes when the input changes (size, mtime), for resume decisions

    def signature(self) -> bytes:
        """Everything that identifies this input and its current state, for fingerprints."""
        return signature(self.key, self.uri, self.offset, self.length, self.label, self.stamp)


def signature(key: str, uri: str, offset: int, length: int, label: str | None, stamp: str) -> bytes:
    """``InputRef.signature`` from the fields themselves (a listing's columns need no object)."""
    return f"{key}\0{uri}\0{offset}\0{length}\0{label}\0{stamp}\n".encode()


# one row per input; ``uri`` is null when it is the key itself (a file or URL read whole), so the common
# case stores the string once, and dictionary-encoded (the members of a tar shard share one)
URI_TYPE = pa.dictionary(pa.int32(), pa.string())
REF_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("uri", URI_TYPE),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("length", pa.int64(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("stamp", pa.string(), nullable=False),
    ]
)
CHUNK = 65_536  # inputs converted between Python objects and Arrow at a time
# ``REF_SCHEMA`` as a spill file stores it: ``uri`` plain (an Arrow IPC file cannot change a dictionary
# from one record batch to the next), dictionary-coded again as each batch is read back
SPILL_SCHEMA = pa.schema([pa.field("uri", pa.string()) if f.name == "uri" else f for f in REF_SCHEMA])


def as_spilled(batch: pa.RecordBatch | pa.Table, schema: pa.Schema = SPILL_SCHEMA) -> pa.RecordBatch:
    """``batch`` (``REF_SCHEMA`` columns, maybe more) as one record batch of ``schema``."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    table = table.select(schema.names).cast(schema).combine_chunks()
    batches = table.to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=schema)


def as_refs(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A spilled batch with ``uri`` dictionary-coded again (``REF_SCHEMA``, other columns kept)."""
    i = batch.schema.get_field_index("uri")
    return batch.set_column(i, pa.field("uri", URI_TYPE), batch.column(i).dictionary_encode())


_spill_dir: Path | None = None
_SPILL_PREFIX = "embedpipe-"
SPILL_FOLDER = ".spill"  # the name of a run's spill folder (``storage.contracts.layout.spill_folder``)
_SPILL_NAME = re.compile(rf"^{_SPILL_PREFIX}(?P<pid>\d+)@(?P<host>.+)-[a-z]+-[0-9a-f]{{12}}\.arrow$")


@contextlib.contextmanager
def spill_to(folder: str | Path) -> Iterator[None]:
    """Inside this scope, spill files (listings, shard plans) are made in ``folder`` (created; removed
    again when it is left empty), not in the system's temporary folder. Files there of processes that
    are gone (killed before removing theirs) are removed first."""
    global _spill_dir
    outer, folder = _spill_dir, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{_SPILL_PREFIX}*.arrow"):
        owner = _SPILL_NAME.match(stale.name)
        if owner and owner["host"] == socket.gethostname() and not _alive(int(owner["pid"])):
            stale.unlink(missing_ok=True)
    _spill_dir = folder
    try:
        yield
    finally:
        _spill_dir = outer
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: the files of plans still in use stay, and go with them


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SpillFile:
    """An Arrow IPC file written one record batch at a time, then read back one batch at a time (random
    access by batch number, through one open reader): data bigger than memory held on disk. The file is
    removed when the object that made it is gone; a pickled copy reads the same file and owns none."""

    def __init__(self, schema: pa.Schema, stem: str):
        folder = _spill_dir or Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        owner = f"{os.getpid()}@{socket.gethostname()}"  # a run folder may be shared by several hosts
        self.path = folder / f"{_SPILL_PREFIX}{owner}-{stem}-{uuid.uuid4().hex[:12]}.arrow"
        self.schema = schema
        self.rows: list[int] = []  # rows of each batch
        self._writer: Any = ipc.new_file(str(self.path), schema)
        self._reader: Any = None
        self._lock = threading.Lock()
        self._owner = weakref.finalize(self, _remove, self.path)

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            raise ValueError(f"{self.path} is complete: it is read, not written, now")
        self._writer.write_batch(batch)
        self.rows.append(batch.num_rows)

    def close(self) -> None:
        """Complete the file (no more batches); reading does it first."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, i: int) -> pa.RecordBatch:
        with self._lock:
            self.close()
            if self._reader is None:
                self._reader = ipc.open_file(pa.OSFile(str(self.path)))
            return self._reader.get_batch(i)

    __getitem__ = batch

    def batches(self) -> Iterator[pa.RecordBatch]:
        for i in range(len(self.rows)):
            yield self.batch(i)

    def __getstate__(self) -> dict[str, Any]:
        self.close()
        return {"path": self.path, "schema": self.schema, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _writer=None, _reader=None, _lock=threading.Lock(), _owner=None)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
        # a run's folder left empty (never a temporary folder, nor one a scope is using): removed too
        if path.parent.name == SPILL_FOLDER and path.parent != _spill_dir:
            path.parent.rmdir()


def refs_batch(refs: Sequence[InputRef]) -> pa.RecordBatch:
    """``refs`` as one record batch of ``REF_SCHEMA``."""
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.key for r in refs], pa.string()),
            pa.array([None if r.uri == r.key else r.uri for r in refs], pa.string()).dictionary_encode(),
            pa.array([r.offset for r in refs], pa.int64()),
            pa.array([r.length for r in refs], pa.int64()),
            pa.array([r.label for r in refs], pa.string()),
            pa.array([r.stamp for r in refs], pa.string()),
        ],
        schema=REF_SCHEMA,
    )


def _batch_refs(batch: pa.RecordBatch) -> list[InputRef]:
    cols = [batch.column(name).to_pylist() for name in REF_SCHEMA.names]
    return [
        InputRef(key, key if uri is None else uri, offset, length, label, stamp)
        for key, uri, offset, length, label, stamp in zip(*cols, strict=True)
    ]


class RefView(Sequence[InputRef]):
    """Read-only inputs over a table with the columns of ``REF_SCHEMA`` (and maybe more): indexing and
    iteration make ``InputRef``s on demand, ``CHUNK`` rows at a time."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, i: int) -> InputRef: ...
    @overload
    def __getitem__(self, i: slice) -> RefView: ...
    def __getitem__(self, i: int | slice) -> InputRef | RefView:
        if isinstance(i, slice):
            rows = range(len(self))[i]
            if rows.step == 1:
                return RefView(self.table.slice(rows.start, len(rows)))
            return self.take(np.arange(rows.start, rows.stop, rows.step))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"input {i} out of range ({n})")
        return _batch_refs(self.table.slice(i % n, 1).select(REF_SCHEMA.names).to_batches()[0])[0]

    def __iter__(self) -> Iterator[InputRef]:
        for batch in self.table.select(REF_SCHEMA.names).to_batches(max_chunksize=CHUNK):
            yield from _batch_refs(batch)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RefView):
            names = REF_SCHEMA.names
            return self.table.select(names).equals(other.table.select(names))
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RefView({len(self)} inputs)"

    def take(self, positions: Any) -> RefView:
        return RefView(self.table.take(pa.array(np.asarray(positions, np.int64))))

    def keys(self) -> pa.ChunkedArray:
        return self.table.column("key")


class Listing:
    """The inputs of a source, in a stable order (as Arrow record batches: ``add`` buffers ``CHUNK``
    inputs, then converts them), and the entries found unusable while listing. With ``spill`` the
    batches go to a ``SpillFile`` as they are made, and once read the listing takes no more inputs."""

    def __init__(
        self, refs: Iterable[InputRef] = (), problems: Iterable[tuple[str, str]] = (), spill: bool = False
    ):
        self._batches: list[pa.RecordBatch] = []
        self._spill: SpillFile | None = SpillFile(SPILL_SCHEMA, "listing") if spill else None
        self._pending: list[InputRef] = []
        self.problems: list[tuple[str, str]] = list(problems)  # (key, reason)
        for ref in refs:
            self.add(ref)

    @classmethod
    def of_table(cls, table: pa.Table, problems: Iterable[tuple[str, str]] = ()) -> Listing:
        listing = cls(problems=problems)
        listing._batches = table.select(REF_SCHEMA.names).cast(REF_SCHEMA).to_batches()
        return listing

    def add(self, ref: InputRef) -> None:
        self._pending.append(ref)
        if len(self._pending) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._append(refs_batch(self._pending))
            self._pending = []

    def _append(self, batch: pa.RecordBatch) -> None:
        if self._spill is None:
            self._batches.append(batch)
        elif batch.num_rows:
            self._spill.write(as_spilled(batch))

    def extend(self, other: Listing) -> None:
        self._flush()
        for batch in other.batches():
            self._append(batch)
        self.problems.extend(other.problems)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The inputs as ``REF_SCHEMA`` record batches, in order (a spilled listing's read one at a
        time)."""
        self._flush()
        if self._spill is None:
            yield from self._batches
        else:
            for batch in self._spill.batches():
                yield as_refs(batch)

    def batch(self, i: int) -> pa.RecordBatch:
        """The ``i``-th of ``batches``."""
        self._flush()
        return self._batches[i] if self._spill is None else as_refs(self._spill.batch(i))

    def table(self) -> pa.Table:
        """Every input in one table: the whole listing in memory (``batches`` streams it)."""
        return pa.Table.from_batches(list(self.batches()), schema=REF_SCHEMA)

    @property
    def refs(self) -> RefView:
        return RefView(self.table())

    def __len__(self) -> int:
        held = self._spill.rows if self._spill is not None else (b.num_rows for b in self._batches)
        return sum(held) + len(self._pending)

    def copy(self) -> Listing:
        """The same inputs and problems (a spilled listing's copy reads the same file)."""
        if self._spill is None:
            return Listing.of_table(self.table(), self.problems)
        self._flush()
        self._spill.close()
        listing = Listing(problems=self.problems)
        listing._spill = self._spill
        return listing

    def fingerprint(self) -> str:
        """A digest of every input's ``InputRef.signature`` (read from the columns) and every problem."""
        digest = hashlib.sha256()
        for whole in self.batches():
            for batch in pa.Table.from_batches([whole]).to_batches(max_chunksize=CHUNK):
                cols = [batch.column(name).to_pylist() for name in REF_SCHEMA.names]
                for key, uri, offset, length, label, stamp in zip(*cols, strict=True):
                    digest.update(signature(key, key if uri is None else uri, offset, length, label, stamp))
        for key, reason in self.problems:
            digest.update(f"!{key}\0{reason}\n".encode())
        return digest.hexdigest()[:16]


# the key of a distractor input (``distractors:``) is its own key under this prefix: in the dataset
# manifest and the feature store's ``path`` column it stays apart from the collection's inputs
DISTRACTOR_PREFIX = "distractor:"


def is_distractor(key: str) -> bool:
    return key.startswith(DISTRACTOR_PREFIX)


def as_distractors(listing: Listing) -> Listing:
    """``listing``'s inputs as distractors: the same inputs under prefixed keys (each read from where it
    was, so a ``uri`` that was the key is kept), a batch at a time into a spilled listing."""
    out = Listing([], [(DISTRACTOR_PREFIX + key, reason) for key, reason in listing.problems], spill=True)
    for batch in listing.batches():
        keys = batch.column("key")
        uris = pc.coalesce(pc.cast(batch.column("uri"), pa.string()), keys).dictionary_encode()
        prefixed = pc.binary_join_element_wise(pa.scalar(DISTRACTOR_PREFIX), keys, "")
        out._append(batch.set_column(0, "key", prefixed).set_column(1, "uri", uris))
    return out


# resolved path -> (stamp then, its samples as REF_SCHEMA rows); a mapping that may read them on demand
KnownTars = Mapping[str, tuple[str, pa.Table]]
