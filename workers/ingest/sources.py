"""Input sources: every form ``--images`` accepts, listed as ``InputRef``s (``storage.inputs``), and the
reading of one input.

Accepted, alone or as a brace pattern (``data-{00000..00031}.tar``) or a glob (``photos/*/*.jpg``):

- a folder, walked recursively (hidden names skipped); when it holds ``.tar`` files it is a folder of
  shards (WebDataset or img2dataset output) and only their members are inputs;
- an image file, or any other file (which will be quarantined when it does not decode);
- a list: ``.txt`` (one path or URL per line), ``.csv``/``.tsv`` or ``.parquet`` with a ``path`` or
  ``url`` column and an optional ``label`` column; relative paths are taken from the list's folder;
- a ``.tar`` shard: members grouped into samples by key (the name up to the first dot of its last part,
  as WebDataset does); the sample's image is its first member with an image extension, its label the
  ``.cls`` member or the ``label`` of its ``.json`` member;
- a URL: ``file://`` is a local path, ``http(s)://`` an image, a list or a tar shard (read in place with
  range requests), and any other scheme whose
  fsspec implementation is installed (``s3://``, ``gs://``, ...) a file, folder or glob.

Listing never reads images; reading happens on the workers through ``read_input`` (``read_inputs`` for
a batch: its remote reads at once on threads) with timeouts and bounded retries for remote sources. A
remote tar shard that cannot be listed (unreachable, hostile, no ``Range`` support) is an unusable entry of
the listing, not an error: the other inputs go on. Nothing downstream knows which form an input came from.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import glob
import io
import json
import os
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin

from embedpipe.storage.contracts.errors import DecodeError, InputError
from embedpipe.storage.inputs import InputRef, KnownTars, Listing

IMAGE_EXTS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".jfif"}
)
MAX_BYTES = 64 << 20  # default cap on one remote body (ingest.max_bytes)
LIST_EXTS = frozenset({".txt", ".csv", ".tsv", ".parquet"})
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` alternatives."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    span = _RANGE.match(body)
    if span:
        lo, hi = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def _scheme(spec: str) -> str:
    return spec.split("://", 1)[0].lower() if "://" in spec else ""


def _suffix(name: str) -> str:
    return PurePosixPath(name.split("?", 1)[0]).suffix.lower()


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def _stamp(path: Path | os.DirEntry) -> str:
    """``size:mtime_ns`` of a file (through a link), from a path or a directory scan's entry."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


_shared_listings: dict[str, Listing] | None = None
_known_tars: Callable[[], KnownTars] = dict
_shard_limits: tuple[float, int] = (30.0, 2)  # (timeout, retries) of the reads listing a remote tar shard


@contextlib.contextmanager
def remote_shard_limits(timeout: float, retries: int) -> Iterator[None]:
    """Inside this scope each read listing a remote tar shard (a range request for its headers) has
    ``timeout`` seconds a try in all and ``retries`` retries, as ``ingest.timeout_s`` and ``ingest.retries``
    give image reads; outside, 30 s and 2 retries."""
    global _shard_limits
    outer = _shard_limits
    _shard_limits = (timeout, retries)
    try:
        yield
    finally:
        _shard_limits = outer


@contextlib.contextmanager
def known_tar_listings(load: Callable[[], KnownTars]) -> Iterator[None]:
    """Inside this scope a local tar shard listed before (``load()``: resolved path -> (its size:mtime
    stamp then, its samples in member order)) whose stamp has not changed is not read again: its
    samples are the known ones. Listing a collection of shards that mostly did not change then costs
    one ``stat`` per shard, not one header read per image. ``load`` runs once, when the scope first
    lists a tar shard: a scope whose inputs come from ``listing_once``'s shared listing never runs it."""
    global _known_tars
    outer = _known_tars
    _known_tars = functools.cache(lambda: collections.ChainMap(load(), outer()))  # nothing read yet
    try:
        yield
    finally:
        _known_tars = outer


@contextlib.contextmanager
def listing_once() -> Iterator[None]:
    """Inside this scope each source is listed once: a command that checks its inputs before any engine
    starts and then runs on them walks a folder (or fetches a URL list, or reads tar headers) one time.
    Only for scopes in which the inputs do not change (one ``run``, not a long-lived scheduler)."""
    global _shared_listings
    outer = _shared_listings
    _shared_listings = {} if outer is None else outer
    try:
        yield
    finally:
        _shared_listings = outer


def list_inputs(spec: str | Path) -> Listing:
    """Every input of ``spec`` (see the module doc). Raises ``InputError`` when ``spec`` names nothing."""
    spec = str(spec)
    if _shared_listings is not None and spec in _shared_listings:
        return _shared_listings[spec].copy()
    if not spec.strip():
        raise InputError("empty images path")
    listing = Listing(spill=True)
    for one in expand_braces(spec):
        listing.extend(_list_one(one))
    if not len(listing) and not listing.problems:
        raise InputError(f"no inputs found at {spec}")
    if _shared_listings is not None:
        _shared_listings[spec] = listing.copy()
    return listing


def _list_one(spec: str) -> Listing:
    scheme = _scheme(spec)
    if scheme == "file":
        spec, scheme = spec[len("file://") :], ""
    if scheme in ("http", "https"):
        if _suffix(spec) in LIST_EXTS:
            data = fetch_bytes(spec, timeout=30.0, retries=2, max_bytes=None)  # a list: no image's cap
            return _list_rows(spec, data, base=spec.rsplit("/", 1)[0])
        if _suffix(spec) == ".tar":
            return list_http_tar(spec, *_shard_limits)
        return Listing([InputRef(spec, spec)])
    if scheme:
        return _list_fsspec(spec)
    if any(c in spec for c in _GLOB_CHARS) and not Path(spec).exists():
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise InputError(f"no files match {spec}")
        listing = Listing()
        for m in matches:
            if Path(m).is_file():
                listing.extend(_list_file(Path(m)))
        return listing
    path = Path(spec)
    if not path.exists():
        raise InputError(f"images path not found: {spec}")
    if path.is_dir():
        return _list_folder(path)
    return _list_file(path)


def _folder_files(root: Path) -> list[tuple[str, os.DirEntry]]:
    """(posix path relative to ``root``, entry) of each visible file under ``root``, sorted by that path.
    Symlinks to files are listed, symlinked folders are not walked into (as ``Path.rglob`` does)."""
    out: list[tuple[str, os.DirEntry]] = []
    pending = [("", str(root))]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((f"{prefix}{entry.name}/", entry.path))
                elif entry.is_file():
                    out.append((prefix + entry.name, entry))
    out.sort(key=lambda item: item[0])
    return out


def _list_folder(root: Path) -> Listing:
    files = _folder_files(root)
    tars = [root / rel for rel, _ in files if rel.lower().endswith(".tar")]
    listing = Listing()
    if tars:  # a folder of shards: WebDataset / img2dataset output
        for t in tars:
            listing.extend(list_tar(t))
        listing.problems.extend(_img2dataset_failures(root))
        return listing
    # one realpath for the folder, a file's own only when it is a link (resolving every file dominated
    # the walk)
    base = root.resolve()
    for rel, entry in files:
        path = str(Path(entry.path).resolve() if entry.is_symlink() else base / rel)
        listing.add(InputRef(path, path, stamp=_stamp(entry)))
    return listing


def _list_file(path: Path) -> Listing:
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return list_tar(path)
    if suffix in LIST_EXTS:
        return _list_rows(str(path), path.read_bytes(), base=str(path.resolve().parent))
    resolved = str(path.resolve())
    return Listing([InputRef(resolved, resolved, stamp=_stamp(path))])


def sample_key(member: str) -> tuple[str, str]:
    """WebDataset's split of a member name into (sample key, extension): ``a/b.seg.jpg`` -> (a/b, seg.jpg)."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def list_tar(path: Path) -> Listing:
    """The samples of one tar shard, in member order; byte offsets recorded so workers read members
    directly without unpacking."""
    path = path.resolve()
    known = _known_tars().get(str(path))
    with contextlib.suppress(OSError):
        if known is not None and _stamp(path) == known[0]:
            return Listing.of_table(known[1])
    try:
        with tarfile.open(path, "r:") as tar:
            groups, extras = _tar_samples(tar)
    except (tarfile.TarError, OSError) as err:
        return Listing(problems=[(str(path), f"unreadable tar shard: {err}")])
    return _tar_listing(str(path), groups, extras, _stamp(path))


def list_http_tar(url: str, timeout: float = 30.0, retries: int = 2) -> Listing:
    """The samples of a tar shard served over http(s), listed in place: tar headers are walked with
    range requests (jumping over image data, so about one request per sample), and workers later read each
    image member with a range request of its own. The server must honour ``Range`` headers. Each read has
    ``timeout`` seconds a try in all and ``retries`` retries; a shard that cannot be listed (unreachable,
    hostile, no ``Range``, not a tar) is the listing's problem, with its one-line reason."""
    import httpx

    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        try:
            remote = HttpRangeFile(url, client, retries, timeout)
            with tarfile.open(fileobj=io.BufferedReader(remote, buffer_size=1 << 16), mode="r:") as tar:
                groups, extras = _tar_samples(tar)
        except (tarfile.TarError, InputError) as err:
            return Listing(problems=[(url, f"unreadable tar shard: {err}")])
    return _tar_listing(url, groups, extras, remote.stamp)


def _tar_samples(
    tar: tarfile.TarFile,
) -> tuple[dict[str, list[tarfile.TarInfo]], dict[str, dict[str, bytes]]]:
    """Members grouped by sample key, in member order, and each sample's metadata members' bytes."""
    groups: dict[str, list[tarfile.TarInfo]] = {}
    for m in tar.getmembers():
        if m.isfile():
            groups.setdefault(sample_key(m.name)[0], []).append(m)
    extras = {
        key: {sample_key(m.name)[1]: _read_member(tar, m) for m in ms if _is_meta(m.name)}
        for key, ms in groups.items()
    }
    return groups, extras


def _tar_listing(
    uri: str, groups: dict[str, list[tarfile.TarInfo]], extras: dict[str, dict[str, bytes]], stamp: str
) -> Listing:
    """One ``InputRef`` per sample (its image member read in place at its offset in ``uri``)."""
    listing = Listing()
    for key, ms in groups.items():
        image = next((m for m in ms if "." + sample_key(m.name)[1].rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if image is None:
            listing.problems.append((f"{uri}/{key}", "sample has no image member"))
            continue
        listing.add(
            InputRef(
                f"{uri}/{image.name}",
                uri,
                image.offset_data,
                image.size,
                _sample_label(extras[key]),
                f"{stamp}:{image.size}",
            )
        )
    return listing


class HttpRangeFile(io.RawIOBase):
    """A seekable, read-only view of a remote file through HTTP range requests. Wrapped in an
    ``io.BufferedReader``, each read fetches one buffer's worth, so small reads near each other (tar
    headers and the metadata members after them) cost one request, and seeks past data cost nothing.
    Each request has ``timeout`` seconds a try in all and a body cap of the range asked for (plus
    ``RANGE_SLACK``); a failed one raises ``InputError`` with one line (without the URL)."""

    RANGE_SLACK = 1 << 16

    def __init__(self, url: str, client, retries: int = 2, timeout: float = 30.0):  # client: httpx.Client
        super().__init__()
        self.url, self.client, self.retries, self.timeout, self.pos = url, client, retries, timeout, 0
        first = self._get(0, 0)
        total = first.headers.get("content-range", "").rpartition("/")[2]
        if first.status_code != 206 or not total.isdigit():
            raise InputError(
                "the server does not honour HTTP range requests, needed to read a tar shard in "
                "place (download the shard, or serve it from a server that supports Range)"
            )
        self.size = int(total)
        version = first.headers.get("etag") or first.headers.get("last-modified") or ""
        self.stamp = f"{self.size}:{version}"

    def _get(self, start: int, end: int) -> Fetched:
        """Bytes ``start..end`` (inclusive), retried like ``fetch_bytes``; a 200 (the server ignored the
        range) comes back without its body."""
        headers = {"Range": f"bytes={start}-{end}"}
        cap = end - start + 1 + self.RANGE_SLACK
        try:
            return _http_get(
                self.client, self.url, self.retries, headers, DecodeError, self.timeout, cap, whole_ok=False
            )
        except DecodeError as err:
            raise InputError(str(err).removeprefix("unreadable URL: ")) from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        answer = self._get(self.pos, self.pos + n - 1)
        if answer.status_code != 206:
            raise InputError(f"the server stopped honouring HTTP range requests (at byte {self.pos})")
        data = answer.content[:n]
        if not data:  # not an end of file: tarfile would take it for one and stop listing early
            raise InputError(f"no bytes in the answer to a range request at byte {self.pos}")
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _is_meta(name: str) -> bool:
    return sample_key(name)[1] in ("cls", "json")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return handle.read(1 << 20) if handle is not None else b""


def _sample_label(extra: dict[str, bytes]) -> str | None:
    if "cls" in extra:
        return extra["cls"].decode("utf-8", "replace").strip() or None
    if "json" in extra:
        try:
            value = json.loads(extra["json"]).get("label")
        except (ValueError, AttributeError):
            return None
        return None if value is None else str(value)
    return None


def _img2dataset_failures(root: Path) -> list[tuple[str, str]]:
    """img2dataset writes one Parquet per shard beside its tar with every URL's status: the failed
    downloads are reported as inputs that could not be used."""
    import pyarrow.parquet as pq

    out = []
    for meta in sorted(root.glob("*.parquet")):
        try:
            table = pq.read_table(meta)
        except Exception:  # noqa: BLE001 - a sibling file that is not img2dataset metadata
            continue
        if not {"url", "status"} <= set(table.column_names):
            continue
        errors = table.column("error_message").to_pylist() if "error_message" in table.column_names else None
        for i, (url, status) in enumerate(
            zip(table.column("url").to_pylist(), table.column("status").to_pylist(), strict=True)
        ):
            if status != "success":
                out.append((str(url), f"download failed upstream: {errors[i] if errors else status}"))
    return out


def _list_rows(origin: str, data: bytes, base: str) -> Listing:
    """A list of inputs: a ``path`` or ``url`` column (or one entry per line) and an optional ``label``."""
    suffix = _suffix(origin)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise InputError(f"{origin}: not a readable Parquet list ({err})") from None
        rows = table.to_pylist()
        columns = table.column_names
    elif suffix in (".csv", ".tsv"):
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        rows, columns = list(reader), reader.fieldnames or []
    else:
        lines = [s.strip() for s in data.decode("utf-8-sig").splitlines()]
        rows, columns = [{"path": s} for s in lines if s and not s.startswith("#")], ["path"]
    column = "path" if "path" in columns else "url" if "url" in columns else None
    if column is None:
        raise InputError(f"{origin}: a list needs a 'path' or 'url' column (found: {', '.join(columns)})")
    listing = Listing()
    for row in rows:
        entry = str(row.get(column) or "").strip()
        if not entry:
            continue
        label = row.get("label")
        label = None if label is None or str(label) == "" else str(label)
        listing.extend(_entry(entry, base, label))
    return listing


def _entry(entry: str, base: str, label: str | None) -> Listing:
    scheme = _scheme(entry)
    if scheme == "file":
        entry, scheme = entry[len("file://") :], ""
    if not scheme and _scheme(base):  # a relative entry of a remote list
        entry, scheme = urljoin(base + "/", entry), _scheme(base)
    if scheme in ("http", "https") and _suffix(entry) == ".tar":  # a shard, listed like a local one
        return list_http_tar(entry, *_shard_limits)
    if scheme:
        return Listing([InputRef(entry, entry, label=label)])
    path = Path(entry) if Path(entry).is_absolute() else Path(base) / entry
    if path.suffix.lower() == ".tar" and path.is_file():
        return list_tar(path)
    resolved = str(path.resolve())
    stamp = _stamp(path) if path.is_file() else "missing"
    return Listing([InputRef(resolved, resolved, label=label, stamp=stamp)])


def _list_fsspec(spec: str) -> Listing:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as err:
        raise InputError(f"{spec}: no filesystem for this URL ({err})") from None
    protocol, one = spec.split("://", 1)[0], False
    if any(c in root for c in _GLOB_CHARS):
        names = sorted(fs.glob(root))
    elif fs.isdir(root):
        names = sorted(fs.find(root))
    elif fs.exists(root):
        names, one = [root], True
    else:
        raise InputError(f"images path not found: {spec}")
    # what the filesystem's paths leave out of a URL (ftp's or sftp's host and port; nothing for s3's or
    # gs's, whose paths start with the bucket): the part of ``spec`` before ``root``
    rest = spec.split("://", 1)[1].rstrip("/")
    prefix = rest[: len(rest) - len(root.rstrip("/"))] if root and rest.endswith(root.rstrip("/")) else ""
    refs = []
    for name in names:
        if not _visible(PurePosixPath(name)):
            continue
        url = f"{protocol}://{prefix}{name.split('://', 1)[-1]}"
        if one and _suffix(name) in LIST_EXTS:  # a list named itself (in a folder it is one more file)
            return _list_rows(url, fs.cat_file(name), base=url.rsplit("/", 1)[0])
        refs.append(InputRef(url, url))
    return Listing(refs)


def read_rotations(path: str | Path) -> dict[str, int]:
    """An orientation-correction list: ``name degrees`` per line (spaces, tabs or a comma between; a
    ``name,degrees`` header and ``#`` comments allowed) -> {file name: clockwise degrees in 0/90/180/270}.
    Raises ``InputError`` naming the file and line of anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise InputError(f"rotations list {path}: {err.strerror or err}") from None
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = [f for f in re.split(r"[\s,]+", line.split("#", 1)[0].strip()) if f]
        if not fields or (number == 1 and fields[-1].lower() in ("degrees", "rotation", "angle")):
            continue
        if len(fields) != 2 or not re.fullmatch(r"[+-]?\d+", fields[1]) or int(fields[1]) % 90:
            raise InputError(
                f"rotations list {path}, line {number}: expected 'name degrees' (a multiple of 90)"
            )
        out[PurePosixPath(fields[0]).name] = int(fields[1]) % 360
    return out


def rotation_of(key: str, rotations: dict[str, int]) -> int:
    """The correction of the input ``key`` (a path, URL or ``shard.tar/member``), by its file name or stem."""
    name = PurePosixPath(key.split("?", 1)[0]).name
    return rotations.get(name, rotations.get(PurePosixPath(name).stem, 0))


# ---------------------------------------------------------------------------------------------- reading


def read_input(
    uri: str,
    offset: int = -1,
    length: int = -1,
    timeout: float = 30.0,
    retries: int = 2,
    max_bytes: int = MAX_BYTES,
) -> bytes:
    """The bytes of one input. Raises ``DecodeError`` with a one-line reason; never hangs: an HTTP read
    has ``timeout`` seconds a try for the whole request and a body cap of ``max_bytes``, with at most
    ``retries`` retries with back-off for transient failures."""
    scheme = _scheme(uri)
    if scheme == "file":
        uri, scheme = uri[len("file://") :], ""
    if scheme in ("http", "https"):
        if offset >= 0:  # a member of a remote container
            data = fetch_bytes(uri, timeout, retries, DecodeError, (offset, length), max_bytes)
            if len(data) != length:
                raise DecodeError(f"container truncated: {length - len(data)} bytes of the member missing")
            return data
        return fetch_bytes(uri, timeout, retries, DecodeError, max_bytes=max_bytes)
    if scheme:
        return _read_fsspec(uri, offset, length)
    try:
        with open(uri, "rb") as f:
            if offset >= 0:
                f.seek(offset)
                data = f.read(length)
                if len(data) != length:
                    raise DecodeError(
                        f"container truncated: {length - len(data)} bytes of the member missing"
                    )
                return data
            return f.read()
    except FileNotFoundError:
        raise DecodeError("missing file") from None
    except IsADirectoryError:
        raise DecodeError("not a file") from None
    except OSError as err:
        raise DecodeError(f"cannot read file: {err.strerror or err}") from None


class PendingRead:
    """A local input's read, done on the caller's thread when its ``result()`` is asked for (as a remote
    read's ``Future`` from ``read_inputs``)."""

    def __init__(self, uri: str, offset: int, length: int):
        self.uri, self.offset, self.length = uri, offset, length

    def result(self) -> bytes:
        return read_input(self.uri, self.offset, self.length)


def read_inputs(
    rows: Sequence[tuple[str, int, int]],
    timeout: float = 30.0,
    retries: int = 2,
    max_bytes: int = MAX_BYTES,
    threads: int = 16,
) -> list[Future | PendingRead]:
    """The reads of a batch of inputs ((uri, offset, length) each, as ``read_input`` takes them), in row
    order: each ``result()`` is the input's bytes or raises ``DecodeError``. The remote reads (http(s),
    fsspec) are all started at once on this process's ``threads`` reader threads, so a slow or hostile URL
    holds only its own read; the local ones are read in turn when their ``result()`` is asked for."""
    readers = None
    out: list[Future | PendingRead] = []
    for uri, offset, length in rows:
        if _scheme(uri) in ("", "file"):
            out.append(PendingRead(uri, offset, length))
            continue
        readers = readers or _readers(threads)
        out.append(readers.submit(read_input, uri, offset, length, timeout, retries, max_bytes))
    return out


_LOCK = threading.Lock()  # creating the per-process client and reader threads
_HTTP_CLIENTS: dict[int, Any] = {}  # process id -> httpx.Client
_READERS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (process id, threads) -> reader threads


def _readers(threads: int) -> ThreadPoolExecutor:
    """This process's reader threads (created on first use; Ray reuses worker processes)."""
    key = (os.getpid(), threads)
    with _LOCK:
        if key not in _READERS:
            _READERS[key] = ThreadPoolExecutor(threads, thread_name_prefix="embedpipe-read")
        return _READERS[key]


def _http_client() -> Any:
    """This process's HTTP client: one connection pool (keep-alive) shared by its threads."""
    import httpx

    pid = os.getpid()
    with _LOCK:
        if pid not in _HTTP_CLIENTS:
            _HTTP_CLIENTS[pid] = httpx.Client(
                follow_redirects=True, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32)
            )
        return _HTTP_CLIENTS[pid]


RETRY_AFTER_MAX = 60.0  # a server's Retry-After is honoured up to this many seconds


@dataclass(frozen=True)
class Fetched:
    """A successful GET: status (200 or 206), headers and the whole body."""

    status_code: int
    headers: Any
    content: bytes


class _TooLarge(Exception):
    pass


def fetch_bytes(
    url: str,
    timeout: float,
    retries: int,
    error: type[Exception] = InputError,
    byte_range: tuple[int, int] | None = None,
    max_bytes: int | None = MAX_BYTES,
) -> bytes:
    """GET ``url`` (``byte_range``: (offset, length) of it, by a range request); retried on timeouts,
    connection errors and 5xx/429, not on other 4xx. Each try has ``timeout`` seconds for the whole
    request (connection, headers and body) and a body cap of ``max_bytes``; with None (the list files that
    listing fetches, which may be large) no cap and ``timeout`` per operation. Connections are kept open
    and reused by later reads of the same process (and its threads)."""
    headers = {}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
    response = _http_get(_http_client(), url, retries, headers, error, timeout, max_bytes)
    if byte_range is not None and response.status_code == 200:  # the server sent the whole file
        return response.content[byte_range[0] : byte_range[0] + byte_range[1]]
    return response.content


def _retry_after(response) -> float | None:
    """Seconds a 429/503 asks the client to wait (``Retry-After`` in seconds), if it says."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.replace(".", "", 1).isdigit() else None


def _read_body(response, deadline: float | None, max_bytes: int | None) -> bytes:
    """The body of a streamed ``response``, by ``deadline`` (time.monotonic()) and at most ``max_bytes``
    (``_TooLarge`` beyond it, whatever Content-Length announced); a body still arriving at the deadline
    is a timeout however steadily it drips. None: no cap, no deadline."""
    import httpx

    cap = max_bytes if max_bytes is not None else float("inf")
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > cap:
        raise _TooLarge(f"announces {int(announced)} bytes")
    # the body's reads wait at most until the deadline (httpcore reads the request's read timeout when the
    # body starts)
    if deadline is not None:
        timeouts = dict(response.request.extensions.get("timeout", {}))
        timeouts["read"] = max(0.001, deadline - time.monotonic())
        response.request.extensions["timeout"] = timeouts
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > cap:
            raise _TooLarge(f"sent more than {max_bytes} bytes")
        chunks.append(chunk)
        if deadline is not None and time.monotonic() > deadline:
            raise httpx.ReadTimeout("body not complete by the deadline")
    return b"".join(chunks)


def _http_get(
    client,
    url: str,
    retries: int,
    headers: dict[str, str],
    error: type[Exception],
    timeout: float,
    max_bytes: int | None = MAX_BYTES,
    whole_ok: bool = True,
) -> Fetched:
    """One GET with ``client`` (an ``httpx.Client``): the 200/206 response with its body, or ``error``
    with one line. A try costs at most ``timeout`` seconds (with ``max_bytes`` None: ``timeout`` per
    operation, no cap); the waits between tries back off (a 429/503's ``Retry-After`` is honoured, up to
    ``RETRY_AFTER_MAX``). ``whole_ok`` False (a range request that needs a 206): a 200 comes back at once,
    without its body."""
    import httpx

    last, wait, tried = "", 0.0, 0
    for attempt in range(retries + 1):
        tried = attempt + 1
        if attempt:
            time.sleep(wait if wait else min(8.0, 0.5 * 2 ** (attempt - 1)))
        wait = 0.0
        deadline = time.monotonic() + timeout if max_bytes is not None else None
        try:
            with client.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code == 200 and not whole_ok:
                    return Fetched(200, response.headers, b"")
                if response.status_code in (200, 206):
                    body = _read_body(response, deadline, max_bytes)
                    return Fetched(response.status_code, response.headers, body)
                status = response.status_code
                last = f"HTTP {status} {response.reason_phrase}".strip()
                if status in (429, 503):
                    wait = min(RETRY_AFTER_MAX, _retry_after(response) or 0.0)
        except _TooLarge as err:
            cap = "ingest.max_bytes" if whole_ok else "the range asked for"
            last = f"body larger than {cap} ({max_bytes} bytes): {err}"
            break
        except httpx.TooManyRedirects:
            last = "too many redirects"
            break
        except httpx.TimeoutException:
            last = f"timed out after {timeout:g} s"
            continue
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
            continue
        if status < 500 and status != 429:
            break
    tries = f" ({tried} tries)" if tried > 1 else ""
    raise error(
        f"unreadable URL {url}: {last}{tries}" if error is InputError else f"unreadable URL: {last}{tries}"
    )


def _read_fsspec(uri: str, offset: int, length: int) -> bytes:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if offset >= 0:
            return fs.cat_file(path, start=offset, end=offset + length)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DecodeError("missing file") from None
    except (ImportError, ValueError, OSError) as err:
        raise DecodeError(f"cannot read {uri}: {err}") from None
