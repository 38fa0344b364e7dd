"""Input sources: every form ``--images`` accepts, listed as ``InputRef``s, and the reading of one input.

Accepted, alone or as a brace pattern (``data-{00000..00031}.tar``) or a glob (``photos/*/*.jpg``):

- a folder, walked recursively (hidden names skipped); when it holds ``.tar`` files it is a folder of
  shards (WebDataset or img2dataset output) and only their members are inputs;
- an image file, or any other file (which will be quarantined when it does not decode);
- a list: ``.txt`` (one path or URL per line), ``.csv``/``.tsv`` or ``.parquet`` with a ``path`` or
  ``url`` column and an optional ``label`` column; relative paths are taken from the list's folder;
- a ``.tar`` shard: members grouped into samples by key (the name up to the first dot of its last part,
  as WebDataset does); the sample's image is its first member with an image extension, its label the
  ``.cls`` member or the ``label`` of its ``.json`` member;
- a URL: ``file://`` is a local path, ``http(s)://`` an image or a list, and any other scheme whose
  fsspec implementation is installed (``s3://``, ``gs://``, ...) a file, folder or glob.

Listing never reads images; reading happens on the workers through ``read_input`` with timeouts and
bounded retries for remote sources. Nothing downstream knows which form an input came from.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin

from embedpipe.storage.errors import DecodeError, InputError

IMAGE_EXTS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".jfif"}
)
LIST_EXTS = frozenset({".txt", ".csv", ".tsv", ".parquet"})
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")


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
        return f"{self.key}\0{self.uri}\0{self.offset}\0{self.length}\0{self.label}\0{self.stamp}\n".encode()


@dataclass
class Listing:
    """The inputs of a source, in a stable order, and the entries found unusable while listing."""

    refs: list[InputRef] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)

    def extend(self, other: Listing) -> None:
        self.refs.extend(other.refs)
        self.problems.extend(other.problems)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for r in self.refs:
            digest.update(r.signature())
        for key, reason in self.problems:
            digest.update(f"!{key}\0{reason}\n".encode())
        return digest.hexdigest()[:16]


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


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def list_inputs(spec: str | Path) -> Listing:
    """Every input of ``spec`` (see the module doc). Raises ``InputError`` when ``spec`` names nothing."""
    spec = str(spec)
    if not spec.strip():
        raise InputError("empty images path")
    listing = Listing()
    for one in expand_braces(spec):
        listing.extend(_list_one(one))
    if not listing.refs and not listing.problems:
        raise InputError(f"no inputs found at {spec}")
    return listing


def _list_one(spec: str) -> Listing:
    scheme = _scheme(spec)
    if scheme == "file":
        spec, scheme = spec[len("file://") :], ""
    if scheme in ("http", "https"):
        if _suffix(spec) in LIST_EXTS:
            return _list_rows(spec, fetch_bytes(spec, timeout=30.0, retries=2), base=spec.rsplit("/", 1)[0])
        if _suffix(spec) == ".tar":
            raise InputError(f"{spec}: tar shards over http are not supported; download them or list members")
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


def _list_folder(root: Path) -> Listing:
    files = [p for p in root.rglob("*") if _visible(p.relative_to(root)) and p.is_file()]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    tars = [p for p in files if p.suffix.lower() == ".tar"]
    listing = Listing()
    if tars:  # a folder of shards: WebDataset / img2dataset output
        for t in tars:
            listing.extend(list_tar(t))
        listing.problems.extend(_img2dataset_failures(root))
        return listing
    listing.refs = [InputRef(str(p.resolve()), str(p.resolve()), stamp=_stamp(p)) for p in files]
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
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            groups: dict[str, list[tarfile.TarInfo]] = {}
            for m in members:
                if m.isfile():
                    groups.setdefault(sample_key(m.name)[0], []).append(m)
            extras = {
                key: {sample_key(m.name)[1]: _read_member(tar, m) for m in ms if _is_meta(m.name)}
                for key, ms in groups.items()
            }
    except (tarfile.TarError, OSError) as err:
        return Listing(problems=[(str(path), f"unreadable tar shard: {err}")])
    stamp = _stamp(path)
    listing = Listing()
    for key, ms in groups.items():
        image = next((m for m in ms if "." + sample_key(m.name)[1].rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if image is None:
            listing.problems.append((f"{path}/{key}", "sample has no image member"))
            continue
        listing.refs.append(
            InputRef(
                f"{path}/{image.name}",
                str(path),
                image.offset_data,
                image.size,
                _sample_label(extras[key]),
                f"{stamp}:{image.size}",
            )
        )
    return listing


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
    if scheme:
        return Listing([InputRef(entry, entry, label=label)])
    if _scheme(base):  # a relative entry of a remote list
        url = urljoin(base + "/", entry)
        return Listing([InputRef(url, url, label=label)])
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
    protocol = spec.split("://", 1)[0]
    if any(c in root for c in _GLOB_CHARS):
        names = sorted(fs.glob(root))
    elif fs.isdir(root):
        names = sorted(fs.find(root))
    elif fs.exists(root):
        names = [root]
    else:
        raise InputError(f"images path not found: {spec}")
    refs = []
    for name in names:
        if not _visible(PurePosixPath(name)):
            continue
        url = f"{protocol}://{name.split('://', 1)[-1]}"
        if _suffix(name) in LIST_EXTS:
            return _list_rows(url, fs.cat_file(name), base=url.rsplit("/", 1)[0])
        refs.append(InputRef(url, url))
    return Listing(refs)


# ---------------------------------------------------------------------------------------------- reading


def read_input(
    uri: str, offset: int = -1, length: int = -1, timeout: float = 30.0, retries: int = 2
) -> bytes:
    """The bytes of one input. Raises ``DecodeError`` with a one-line reason; never hangs (timeouts on
    remote reads, at most ``retries`` retries with back-off for transient failures)."""
    scheme = _scheme(uri)
    if scheme == "file":
        uri, scheme = uri[len("file://") :], ""
    if scheme in ("http", "https"):
        return fetch_bytes(uri, timeout, retries, error=DecodeError)
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


_HTTP_CLIENTS: dict[int, Any] = {}  # process id -> httpx.Client


def _http_client() -> Any:
    """This process's HTTP client: one connection pool (keep-alive) shared by its threads."""
    import httpx

    pid = os.getpid()
    if pid not in _HTTP_CLIENTS:
        _HTTP_CLIENTS[pid] = httpx.Client(
            follow_redirects=True, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32)
        )
    return _HTTP_CLIENTS[pid]


def fetch_bytes(url: str, timeout: float, retries: int, error: type[Exception] = InputError) -> bytes:
    """GET ``url``; retried on timeouts, connection errors and 5xx/429, not on other 4xx. Connections
    are kept open and reused by later reads of the same process (and its threads)."""
    import httpx

    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
        try:
            response = _http_client().get(url, timeout=timeout)
        except httpx.TimeoutException:
            last = f"timed out after {timeout:g} s"
            continue
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
            continue
        if response.status_code == 200:
            return response.content
        last = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        if response.status_code < 500 and response.status_code != 429:
            break
    tries = f" ({retries + 1} tries)" if retries and not last.startswith("HTTP 4") else ""
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
