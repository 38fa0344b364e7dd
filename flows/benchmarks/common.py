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
    """embedpipe's folder in the user's cache (``$XDG_CACHE_HOME/embedpipe``, or ``~/.cache/embedpipe``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedpipe"


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
