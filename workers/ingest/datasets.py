"""Benchmark datasets: where their archives are, how to fetch them safely, how to check what was fetched.

``fetch`` downloads each archive (http, https, ftp or file URL) to ``ROOT/.downloads`` (resuming a partial
download with an HTTP range request when the server allows it, or with FTP's REST), checks its sha256 when
the registry pins one, extracts it into a temporary folder while refusing members that would land outside
it (absolute names, ``..``, links pointing out, devices), checks the file counts, and only then renames
the folder to ``ROOT/<name>``: a failed fetch never leaves a partial dataset behind.

The built-in registry has the archives' official URLs and the file counts of each layout. Their sha256 are
not pinned (the registry was written without access to the archives): the first fetch records them in
``ROOT/<name>/.embedpipe-dataset.json`` and ``verify`` checks later copies against that record. A user
registry (YAML, same shape) can pin sha256s and point at mirrors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from embedpipe.storage.contracts.errors import InputError

log = logging.getLogger("embedpipe.datasets")
RECORD = ".embedpipe-dataset.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    url: str
    into: str = "."  # folder of the dataset the archive is extracted into
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return PurePosixPath(self.url.split("?", 1)[0]).name


@dataclass(frozen=True)
class Benchmark:
    name: str
    protocol: str
    description: str
    archives: tuple[Archive, ...]
    counts: dict[str, int]  # glob (relative to the dataset folder) -> expected number of files


_OX = "https://www.robots.ox.ac.uk/~vgg/data"
_ROP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg"
# the protocol of a set of distractors: added to another dataset's run with ``--distractors``
DISTRACTORS = "distractors"
BUILTIN: dict[str, dict[str, Any]] = {
    "holidays": {
        "protocol": "holidays",
        "description": "INRIA Holidays: 1491 photos, 500 queries (Jegou et al. 2008)",
        "archives": [
            {"url": "ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz"},
            {"url": "ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz"},
        ],
        "counts": {"jpg/*.jpg": 1491},
    },
    "oxford5k": {
        "protocol": "oxford5k",
        "description": "Oxford Buildings: 5063 photos, 55 queries with boxes (Philbin et al. 2007)",
        "archives": [
            {"url": f"{_OX}/oxbuildings/oxbuild_images.tgz", "into": "jpg"},
            {"url": f"{_OX}/oxbuildings/gt_files_170407.tgz", "into": "gt"},
        ],
        "counts": {"jpg/*.jpg": 5063, "gt/*.txt": 220},
    },
    "paris6k": {
        "protocol": "paris6k",
        "description": "Paris: 6412 photos, 55 queries with boxes (Philbin et al. 2008)",
        "archives": [
            {"url": f"{_OX}/parisbuildings/paris_1.tgz", "into": "jpg"},
            {"url": f"{_OX}/parisbuildings/paris_2.tgz", "into": "jpg"},
            {"url": f"{_OX}/parisbuildings/paris_120310.tgz", "into": "gt"},
        ],
        "counts": {"jpg/**/*.jpg": 6412, "gt/*.txt": 220},
    },
    "roxford5k": {
        "protocol": "roxford5k",
        "description": "Revisited Oxford: 4993 + 70 query photos, E/M/H (Radenovic et al. 2018)",
        "archives": [
            {"url": f"{_OX}/oxbuildings/oxbuild_images-v1.tgz", "into": "jpg"},
            {"url": f"{_ROP}/roxford5k/gnd_roxford5k.pkl"},
        ],
        "counts": {"jpg/*.jpg": 5063, "gnd_roxford5k.pkl": 1},
    },
    "rparis6k": {
        "protocol": "rparis6k",
        "description": "Revisited Paris: 6322 + 70 query photos, E/M/H (Radenovic et al. 2018)",
        "archives": [
            {"url": f"{_OX}/parisbuildings/paris_1-v1.tgz", "into": "jpg"},
            {"url": f"{_OX}/parisbuildings/paris_2-v1.tgz", "into": "jpg"},
            {"url": f"{_ROP}/rparis6k/gnd_rparis6k.pkl"},
        ],
        "counts": {"jpg/**/*.jpg": 6392, "gnd_rparis6k.pkl": 1},
    },
    "revisitop1m": {
        "protocol": DISTRACTORS,
        "description": "R1M: 1,001,001 distractor photos for ROxford/RParis (Radenovic et al. 2018)",
        "archives": [{"url": f"{_R1M}/revisitop1m.{i}.tar.gz", "into": "jpg"} for i in range(1, 101)],
        "counts": {"jpg/**/*.jpg": 1_001_001},
    },
    "ukbench": {
        "protocol": "ukbench",
        "description": "UKBench: 10200 photos in groups of 4 (Nister & Stewenius 2006)",
        "archives": [{"url": "https://archive.org/download/ukbench/ukbench.zip"}],
        "counts": {"full/*.jpg": 10200},
    },
}


def _benchmark(name: str, spec: dict[str, Any]) -> Benchmark:
    try:
        return Benchmark(
            name,
            str(spec["protocol"]),
            str(spec.get("description", "")),
            tuple(Archive(**a) for a in spec["archives"]),
            {str(k): int(v) for k, v in spec["counts"].items()},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"dataset '{name}': bad registry entry ({err})") from None


def registry(path: Path | None = None) -> dict[str, Benchmark]:
    """The built-in benchmarks, updated by the entries of a user registry YAML (``{name: {...}}``)."""
    entries = dict(BUILTIN)
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"registry file not found: {path}")
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(user, dict):
            raise InputError(f"{path}: expected a mapping of dataset names")
        entries.update(user)
    return {name: _benchmark(name, spec) for name, spec in entries.items()}


def lookup(name: str, path: Path | None = None) -> Benchmark:
    known = registry(path)
    if name not in known:
        raise InputError(f"unknown dataset '{name}' (known: {', '.join(sorted(known))})")
    return known[name]


# ------------------------------------------------------------------------------------------- download


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, timeout: float = 60.0, progress=None) -> Path:
    """Download ``url`` (http, https, ftp or file) to ``dest``, resuming ``dest.part``: with an HTTP range
    request when the server supports it (a server that answers 200 instead restarts the download), with
    FTP's REST otherwise. Returns ``dest``."""
    if url.startswith("file://"):
        shutil.copyfile(url[len("file://") :], dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if url.startswith(("http://", "https://")):
        done = _download_http(url, part, have, timeout, progress)
    elif url.startswith("ftp://"):
        done = _download_ftp(url, part, have, timeout, progress)
    else:
        raise InputError(f"{url}: only http(s), ftp and file URLs can be fetched; download it yourself")
    if not done:
        raise InputError(f"cannot download {url}: the transfer ended early (re-run to resume)")
    os.replace(part, dest)
    return dest


def _download_http(url: str, part: Path, have: int, timeout: float, progress) -> bool:
    """``url`` into ``part`` (appending from ``have`` when the server honours the range)."""
    import httpx

    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
            if response.status_code == 416:  # the part is already complete
                return True
            if response.status_code not in (200, 206):
                raise InputError(f"cannot download {url}: HTTP {response.status_code}")
            mode = "ab" if response.status_code == 206 else "wb"
            total = int(response.headers.get("content-length", 0)) + (have if mode == "ab" else 0)
            if progress is not None:
                progress(total, have if mode == "ab" else 0)
            with open(part, mode) as f:
                for block in response.iter_bytes(CHUNK):
                    f.write(block)
                    if progress is not None:
                        progress(None, len(block))
    except httpx.HTTPError as err:
        raise InputError(f"cannot download {url}: {err} (re-run to resume)") from None
    return not total or part.stat().st_size == total


def _download_ftp(url: str, part: Path, have: int, timeout: float, progress) -> bool:
    """``url`` into ``part`` over FTP (anonymous unless the URL has user:password), passive mode, binary;
    a partial ``part`` is resumed with REST. True when the size the server announces was received."""
    import ftplib
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    user, password = unquote(parts.username or "anonymous"), unquote(parts.password or "anonymous@")
    try:
        with ftplib.FTP(timeout=timeout) as ftp:
            ftp.connect(parts.hostname or "", parts.port or 21)
            ftp.login(user, password)
            ftp.voidcmd("TYPE I")
            try:
                total = ftp.size(unquote(parts.path))
            except ftplib.error_perm:  # SIZE not supported: no check of the length, no progress total
                total = None
            if total is not None and have >= total:
                return have == total
            if progress is not None:
                progress(total or 0, have)
            with open(part, "ab" if have else "wb") as f:

                def write(block: bytes) -> None:
                    f.write(block)
                    if progress is not None:
                        progress(None, len(block))

                ftp.retrbinary(f"RETR {unquote(parts.path)}", write, CHUNK, rest=have or None)
    except ftplib.error_perm as err:
        raise InputError(f"cannot download {url}: FTP {str(err).strip()}") from None
    except ftplib.all_errors as err:
        raise InputError(f"cannot download {url}: {err or type(err).__name__} (re-run to resume)") from None
    return total is None or part.stat().st_size == total


# ------------------------------------------------------------------------------------------ extraction


def _inside(root: Path, name: str | Path) -> bool:
    target = Path(os.path.normpath(root / name))
    return target == root or root in target.parents


def _check_tar(tar: tarfile.TarFile, root: Path, archive: str) -> None:
    for m in tar.getmembers():
        if m.name.startswith("/") or not _inside(root, m.name):
            raise InputError(f"{archive}: member '{m.name}' would be written outside the dataset folder")
        if m.issym() or m.islnk():
            base = root / PurePosixPath(m.name).parent if m.issym() else root
            if m.linkname.startswith("/") or not _inside(root, base / m.linkname):
                raise InputError(
                    f"{archive}: link '{m.name}' -> '{m.linkname}' points outside the dataset folder"
                )
        elif not (m.isfile() or m.isdir()):
            raise InputError(f"{archive}: member '{m.name}' is a device or pipe")


def extract(archive: Path, into: Path) -> None:
    """Extract a tar (any compression) or zip archive into ``into``, refusing unsafe members; any other
    file is copied as it is."""
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            _check_tar(tar, root, archive.name)
            tar.extractall(root, filter="data")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                if info.filename.startswith("/") or not _inside(root, info.filename) or stat.S_ISLNK(mode):
                    raise InputError(
                        f"{archive.name}: member '{info.filename}' would be written outside the folder"
                    )
            zf.extractall(root)
    else:
        shutil.copyfile(archive, root / archive.name)


def count_files(folder: Path, counts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """glob -> (found, expected)."""
    return {
        pattern: (sum(1 for p in folder.glob(pattern) if p.is_file()), n) for pattern, n in counts.items()
    }


def _count_problems(folder: Path, counts: dict[str, int]) -> list[str]:
    return [
        f"{pattern}: {found} files, expected {n}"
        for pattern, (found, n) in count_files(folder, counts).items()
        if found != n
    ]


def fetch(bench: Benchmark, root: Path, mirror: str | None = None, progress=None) -> Path:
    """Download, check and extract ``bench`` into ``root/<name>`` (see the module doc)."""
    root = Path(root)
    final = root / bench.name
    if final.exists():
        problems = _count_problems(final, bench.counts)
        if not problems:
            log.info("%s: already in %s, counts verified", bench.name, final)
            return final
        raise InputError(f"{final} exists but is incomplete ({problems[0]}); remove it and fetch again")
    downloads = root / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    staging = root / f".{bench.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    record = {"name": bench.name, "protocol": bench.protocol, "archives": {}}
    try:
        for archive in bench.archives:
            url = f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url
            path = downloads / archive.filename
            if not path.exists():
                download(url, path, progress=progress)
            digest = sha256_of(path)
            if archive.sha256 and digest != archive.sha256.lower():
                path.unlink()
                raise InputError(
                    f"{archive.filename}: sha256 {digest[:16]}... does not match the registry's "
                    f"{archive.sha256[:16]}...; the download was removed"
                )
            record["archives"][archive.filename] = {"url": url, "sha256": digest}
            extract(path, staging / archive.into)
        problems = _count_problems(staging, bench.counts)
        if problems:
            raise InputError(f"{bench.name}: extracted files do not match the layout ({'; '.join(problems)})")
        (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def verify(bench: Benchmark, root: Path) -> dict[str, Any]:
    """Check ``root/<name>``: file counts, and the archives' sha256 against the registry's or the record
    of the first fetch when the archives are still in ``root/.downloads``. Raises ``InputError``."""
    folder = Path(root) / bench.name
    if not folder.is_dir():
        raise InputError(f"{bench.name}: not found in {root} (fetch it first)")
    problems = _count_problems(folder, bench.counts)
    if problems:
        raise InputError(f"{bench.name}: {'; '.join(problems)}")
    recorded = (
        json.loads((folder / RECORD).read_text()).get("archives", {}) if (folder / RECORD).exists() else {}
    )
    checked = 0
    for archive in bench.archives:
        path = Path(root) / ".downloads" / archive.filename
        want = archive.sha256 or recorded.get(archive.filename, {}).get("sha256")
        if want and path.exists():
            if sha256_of(path) != want:
                origin = "the registry" if archive.sha256 else "the first fetch"
                raise InputError(f"{archive.filename}: sha256 differs from {origin}")
            checked += 1
    return {"name": bench.name, "counts": count_files(folder, bench.counts), "archives_checked": checked}
