"""The records of listed inputs that the dataset manifest and the shard records persist: ``InputRef`` (one
input), ``Listing`` (the inputs of a source) and ``KnownTars`` (tar shards listed before).

A listing keeps its inputs as Arrow record batches (``REF_SCHEMA``), not as one Python object per input:
``RefView`` reads them back as ``InputRef``s a chunk at a time, so a collection of millions of inputs costs
its column bytes, not an object and its strings per input (docs/scaling.md has the measurement).

Listing itself (every form ``--images`` accepts) and reading inputs are in ``workers.ingest.sources``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
    inputs, then converts them), and the entries found unusable while listing."""

    def __init__(self, refs: Iterable[InputRef] = (), problems: Iterable[tuple[str, str]] = ()):
        self._batches: list[pa.RecordBatch] = []
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
            self._batches.append(refs_batch(self._pending))
            self._pending = []

    def extend(self, other: Listing) -> None:
        self._flush()
        other._flush()
        self._batches.extend(other._batches)
        self.problems.extend(other.problems)

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self._batches, schema=REF_SCHEMA)

    @property
    def refs(self) -> RefView:
        return RefView(self.table())

    def __len__(self) -> int:
        return sum(b.num_rows for b in self._batches) + len(self._pending)

    def copy(self) -> Listing:
        return Listing.of_table(self.table(), self.problems)

    def fingerprint(self) -> str:
        """A digest of every input's ``InputRef.signature`` (read from the columns) and every problem."""
        digest = hashlib.sha256()
        for batch in self.table().to_batches(max_chunksize=CHUNK):
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
    was, so a ``uri`` that was the key is kept)."""
    table = listing.table()
    keys = table.column("key")
    uris = pc.coalesce(pc.cast(table.column("uri"), pa.string()), keys).dictionary_encode()
    prefixed = pc.binary_join_element_wise(pa.scalar(DISTRACTOR_PREFIX), keys, "")
    table = table.set_column(0, "key", prefixed).set_column(1, "uri", uris)
    return Listing.of_table(table, [(DISTRACTOR_PREFIX + key, reason) for key, reason in listing.problems])


KnownTars = dict[str, tuple[str, pa.Table]]  # resolved path -> (stamp then, its samples as REF_SCHEMA rows)
