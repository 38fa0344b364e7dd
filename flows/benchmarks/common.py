"""What every bench shares: the flags several benches take, its result JSON, stamped with the date and
the machine it ran on, the default images (the demo dataset) when none are given, the peak RSS its
process reached, and the virtual environment of a baseline tool installed apart from ours. Cheap to
import: ``embedpipe --help`` builds every bench's sub-command."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.contracts.layout import user_cache_dir

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import Config

log = logging.getLogger("embedpipe.bench")

PACKAGES = ("torch", "ray", "faiss-cpu", "numpy", "pyarrow", "dask", "prefect")


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, help="write the result here (also printed)")


def add_images_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="images to use, any input form (default: the demo dataset)")


def add_n_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=2000, help="number of images, cycling the inputs (default 2000)")


def add_store_arguments(p: argparse.ArgumentParser, dim: int) -> None:
    """The synthetic feature store of the pca and index benches (``dim``: the default dimension)."""
    p.add_argument(
        "--rows", type=int, default=1_000_000, help="vectors in the synthetic store (default 1000000)"
    )
    p.add_argument("--dim", type=int, default=dim, help=f"vector dimension (default {dim})")
    p.add_argument("--parts", type=int, default=16, help="part files of the store (default 16)")
    p.add_argument("--store", type=Path, help="where the synthetic store is written (reused)")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict[str, Any]:
    """The machine a bench ran on: CPU, cores, memory, OS, Python and the engines' versions."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_json(result: dict[str, Any], path: Path | None, echo: bool = True) -> None:
    """Write ``result`` as JSON to ``path`` (when given) and, with ``echo``, to stdout."""
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if echo:
        sys.stdout.write(text + "\n")


def write_result(result: dict[str, Any], path: Path | None, echo: bool = True) -> dict[str, Any]:
    """``result`` with ``date`` (UTC) and ``machine`` added, written to ``path`` (when given) and stdout."""
    stamped = {
        **result,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    write_json(stamped, path, echo)
    return stamped


def with_demo_images(cfg: Config) -> Config:
    """``cfg`` itself when it names images, else the demo dataset (generated once in the temp folder)."""
    if cfg.images is not None:
        return cfg
    from embedpipe.workers.ingest.demo_data import generate_demo

    root = Path(tempfile.gettempdir()) / "embedpipe-bench-demo"
    return cfg.model_copy(update={"images": str(generate_demo(root, seed=cfg.seed).root)})


def cache_dir() -> Path:
    """embedpipe's folder in the user's cache (``user_cache_dir``)."""
    return user_cache_dir()


def side_python(
    requirement: str,
    module: str,
    venv: Path,
    system_site_packages: bool = False,
    pins: tuple[str, ...] = (),
) -> Path:
    """The Python of a virtual environment at ``venv`` with ``requirement`` (a pip requirement, e.g.
    ``tool==1.0``) installed from the package index, with ``pins`` (more requirements, e.g. an older
    version of one of its dependencies) installed alongside; created on first use and reused after (a
    marker file names what was installed); ``module`` is imported to check it. ``system_site_packages``
    lets it reuse this environment's packages where they satisfy the tool's requirements (faster to
    create). Never installs into ours. Raises ``InputError`` with one line when it cannot be installed."""
    wanted = " ".join((requirement, *pins))
    python, ready = venv / "bin" / "python", venv / ".embedpipe-ready"
    if ready.exists() and ready.read_text().strip() == wanted and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    log.info("installing %s into %s (once)", wanted, venv)
    make = [sys.executable, "-m", "venv", *(["--system-site-packages"] if system_site_packages else []), venv]
    steps = [
        make,
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement, *pins],
        [python, "-c", f"import {module}"],
    ]
    for step in steps:
        try:
            done = subprocess.run(list(map(str, step)), capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise InputError(f"cannot install {requirement} for the baseline: {err}") from None
        if done.returncode != 0:
            lines = [s for s in (done.stderr + done.stdout).splitlines() if s.strip()]
            raise InputError(
                f"cannot install {requirement} for the baseline into {venv}: "
                f"{lines[-1].strip() if lines else f'exit {done.returncode}'}"
            )
    ready.write_text(wanted + "\n")
    return python


def check_side_python(python: Path, module: str) -> Path:
    """``python`` (a ``--baseline-python``) must exist and import ``module`` (``InputError`` otherwise)."""
    try:
        done = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, text=True, timeout=300
        )
    except OSError as err:
        raise InputError(f"--baseline-python {python}: {err.strerror or err}") from None
    if done.returncode != 0:
        raise InputError(f"--baseline-python {python} cannot import {module}")
    return python


# Real photographs at their stored resolution that ship in a Debian package: the nature photographs of the
# MATE desktop's backgrounds (1.8 to 4.9 megapixels; the one below PHOTO_MIN_PIXELS is left out)
PHOTO_PACKAGE = "mate-backgrounds"
PHOTO_FOLDER = "usr/share/backgrounds/mate/nature"
PHOTO_MIN_PIXELS = 1_500_000
# aspect ratios of the crops (cameras' and screens' own, landscape and portrait): images of one ratio
# decode to one shape, as a camera's photos do
PHOTO_ASPECTS = ((4, 3), (3, 2), (16, 10), (16, 9), (3, 4), (2, 3))


def debian_package(package: str, root: Path, hint: str) -> str:
    """``package`` unpacked into ``root`` (``apt-get download`` + ``dpkg -x``), once: the name of its
    ``.deb`` (its version), kept in a marker file. ``InputError`` with one line, ending in ``hint``,
    where apt cannot fetch it."""
    marker = root / ".embedpipe-deb"
    if marker.is_file():
        return marker.read_text().strip()
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise InputError(f"the Debian package {package} is needed, but apt-get is missing: {hint}")
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the Debian package %s (once) into %s", package, root)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        try:
            subprocess.run(
                ["apt-get", "download", "-qq", package], cwd=tmp, check=True, capture_output=True, timeout=600
            )
            (deb,) = Path(tmp).glob(f"{package}_*.deb")
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, timeout=600)
        except (subprocess.SubprocessError, OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(
                f"cannot fetch the Debian package {package} with apt-get ({reason}): {hint}"
            ) from None
        (Path(tmp) / "x" / ".embedpipe-deb").write_text(deb.name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(Path(tmp) / "x", root)
    return marker.read_text().strip()


def package_photos_source() -> tuple[Path, str]:
    """The folder of ``PHOTO_PACKAGE``'s photographs, fetched once under ``cache_dir()``, and the
    package's file name (its version). ``InputError`` with one line where apt cannot fetch it."""
    root = cache_dir() / "packages" / PHOTO_PACKAGE
    deb = debian_package(PHOTO_PACKAGE, root, "pass --images with your own photos")
    if not (root / PHOTO_FOLDER).is_dir():
        raise InputError(f"the Debian package {PHOTO_PACKAGE} has no {PHOTO_FOLDER}: pass --images")
    return root / PHOTO_FOLDER, deb


def package_photos(n: int, seed: int = 0, min_pixels: int = PHOTO_MIN_PIXELS) -> tuple[Path, dict[str, Any]]:
    """A folder of ``n`` distinct JPEG photos (quality 92) of at least ``min_pixels`` pixels each, made
    deterministically (``seed``) from the real photographs of ``PHOTO_PACKAGE`` by cropping to one of
    ``PHOTO_ASPECTS`` and mirroring only: nothing is upscaled. Made once under ``cache_dir()`` and reused.
    Returns the folder and what it holds (package, sources, megapixels)."""
    import numpy as np
    from PIL import Image

    source_dir, deb = package_photos_source()
    folder = cache_dir() / "bench-photos" / f"{PHOTO_PACKAGE}-n{n}-seed{seed}-min{min_pixels}"
    info_path = folder / "photos.json"
    if info_path.is_file():
        return folder, json.loads(info_path.read_text())
    sources = []
    for path in sorted(source_dir.glob("*.jpg")):
        with Image.open(path) as img:
            if img.width * img.height >= min_pixels:
                sources.append((path, img.size))
    if not sources:
        raise InputError(f"no photo of {min_pixels} pixels or more in {source_dir}: pass --images")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".photos-", dir=folder.parent))
    seen: set[tuple] = set()
    megapixels = []
    for i in range(n):
        path, (width, height) = sources[i % len(sources)]
        rng = np.random.default_rng([seed, i])
        while True:
            a, b = PHOTO_ASPECTS[int(rng.integers(len(PHOTO_ASPECTS)))]
            k_max = min(width // a, height // b)
            k_min = int(np.ceil(np.sqrt(min_pixels / (a * b))))
            if k_min > k_max:
                continue  # this ratio cannot give min_pixels from this photo
            k = int(rng.integers(max(k_min, (3 * k_max) // 4), k_max + 1))  # 56 % of the largest crop or more
            w, h = a * k, b * k
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = (path.name, x, y, w, h, bool(rng.integers(2)))
            if crop not in seen:
                break
        seen.add(crop)
        with Image.open(path) as img:
            out = img.convert("RGB").crop((x, y, x + w, y + h))
        if crop[-1]:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.save(tmp / f"{i:05d}.jpg", quality=92)
        megapixels.append(w * h / 1e6)
    info = {
        "package": deb,
        "sources": [p.name for p, _ in sources],
        "n": n,
        "seed": seed,
        "megapixels_min": round(min(megapixels), 2),
        "megapixels_median": round(float(np.median(megapixels)), 2),
        "megapixels_max": round(max(megapixels), 2),
    }
    (tmp / "photos.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder, info


def side_python_over_ours(requirement: str, module: str, venv: Path) -> Path:
    """``side_python`` for a tool that needs other versions of a few of our packages (Daft: pyarrow) but
    runs our code and models: the tool and its own dependencies in its own environment at ``venv``, which
    also sees this environment's packages, after its own (a ``.pth`` file), so that its versions win where
    both have one and torch and embedpipe come from ours. ``InputError`` with one line when it fails."""
    import sysconfig

    python = side_python(requirement, module, venv)
    try:
        done = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise InputError(f"cannot run the Python of {venv}: {err}") from None
    line = f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    pth = Path(done.stdout.strip()) / "zz-embedpipe-shared.pth"  # read last: the tool's own packages first
    if not pth.is_file() or pth.read_text() != line:
        pth.write_text(line)
    return check_side_python(python, f"{module}, embedpipe.workers.extract.eager")
