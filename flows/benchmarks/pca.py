"""``embedpipe bench pca``: Dask out-of-core moments + eigh (on the pipeline's default scheduler) vs
reading the store into numpy + float32 Gram + eigh vs scikit-learn PCA on that array; the three
eigen-spectra must agree. Each way runs in a fresh subprocess
(``python -m embedpipe.flows.benchmarks.pca pca WAY STORE COMPONENTS``) that reports its own time and peak
RSS, so the memory numbers are not inflated by the other ways."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.flows.benchmarks.common import (
    add_json_argument,
    add_store_arguments,
    peak_rss_mb,
    write_result,
)
from embedpipe.flows.benchmarks.store import store_dir, synthetic_store
from embedpipe.storage.contracts.errors import InputError, RunFailed

log = logging.getLogger("embedpipe.bench")

# the ways' eigen-spectra agree this closely when they fit the same PCA (float32 Gram vs float64 sums)
SPECTRA_RTOL = 1e-3


def pca_way(way: str, directory: Path, dim: int) -> dict[str, Any]:
    """Fit PCA(-whitening) to ``dim`` components one way; time includes reading the store."""
    from embedpipe.storage.features import read_features
    from embedpipe.workers.fit.whitening import pca_whitening_from_moments

    extra: dict[str, Any] = {}
    if way == "dask":
        import contextlib

        from embedpipe.storage.contracts.config import FitConfig, RayConfig
        from embedpipe.workers.engines.dask_jobs import fit_pca_whitening
        from embedpipe.workers.engines.ray_stages import ray_session

        fit = FitConfig(dim=dim, shrinkage=0.0)  # the pipeline's default scheduler: Dask on Ray
        with contextlib.ExitStack() as stack:
            if fit.scheduler == "ray":  # started before the clock, as a run has it started for extraction
                t0 = time.perf_counter()
                stack.enter_context(ray_session(RayConfig()))
                extra["ray_start_s"] = round(time.perf_counter() - t0, 3)
            start = time.perf_counter()
            model, n = fit_pca_whitening(directory, fit)
            seconds = time.perf_counter() - start
        eigvals = model["eigvals"]
        extra["scheduler"] = fit.scheduler
    elif way == "numpy":  # float32 BLAS Gram (no float64 copy of the data), moments in float64
        start = time.perf_counter()
        _, x = read_features(directory)
        model = pca_whitening_from_moments(x.sum(0, dtype=np.float64), x.T @ x, len(x), dim, 0.0)
        eigvals, n = model["eigvals"], len(x)
        seconds = time.perf_counter() - start
    elif way == "sklearn":
        from sklearn.decomposition import PCA

        start = time.perf_counter()
        _, x = read_features(directory)
        pca = PCA(n_components=dim, whiten=True, random_state=0).fit(x)
        eigvals, n = pca.explained_variance_, len(x)
        seconds = time.perf_counter() - start
        extra = {"svd_solver": str(getattr(pca, "_fit_svd_solver", pca.svd_solver))}
    else:
        raise ValueError(f"unknown way '{way}'")
    return {
        "time_s": round(seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "n": int(n),
        "eigvals": [float(v) for v in eigvals],
        **extra,
    }


def spectrum_difference(a: list[float], b: list[float]) -> float:
    """Largest relative difference between two eigen-spectra of the same length (inf when they differ in
    length): how far apart two ways' PCAs are."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        return float("inf")
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30)))


def _run_way(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "embedpipe.flows.benchmarks.pca", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench way {args[0]} {args[1]} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pca(directory: Path, rows: int, dim: int, parts: int, components: int) -> dict[str, Any]:
    synthetic_store(directory, rows, dim, parts)
    data_mb = rows * dim * 4 / 2**20
    ways = {w: _run_way("pca", w, str(directory), str(components)) for w in ("dask", "numpy", "sklearn")}
    ours, in_memory, baseline = ways["dask"], ways["numpy"], ways["sklearn"]
    # the three ways fit the same PCA: their whole spectra must agree (float32 Gram in the numpy way)
    spectra = {
        "numpy_vs_ours": spectrum_difference(in_memory["eigvals"], ours["eigvals"]),
        "sklearn_vs_ours": spectrum_difference(baseline["eigvals"], ours["eigvals"]),
    }
    if max(spectra.values()) > SPECTRA_RTOL:
        raise RunFailed(f"bench pca: the ways' eigen-spectra differ ({spectra}): they did not fit one PCA")
    return {
        "name": "pca",
        "rows": rows,
        "dim": dim,
        "parts": parts,
        "components": components,
        "data_mb": round(data_mb, 1),
        "ours": {
            **ours,
            "way": f"Dask out-of-core sums + Gram ({ours['scheduler']} scheduler, the pipeline's default), "
            "eigh in numpy",
        },
        "in_memory": {
            **in_memory,
            "way": "read all into numpy, float32 Gram (BLAS) + float64 moments + eigh",
        },
        "baseline": {**baseline, "way": "read all into numpy, scikit-learn PCA(whiten=True)"},
        "ratio": round(baseline["time_s"] / ours["time_s"], 4),
        "ratio_in_memory": round(in_memory["time_s"] / ours["time_s"], 4),
        "ours_peak_rss_vs_data": round(ours["peak_rss_mb"] / data_mb, 3),
        "eigvals_max_rel_diff": spectra,
        "ratio_note": "ratio = scikit-learn time / ours; ratio_in_memory = numpy in-memory time / ours; "
        "reading the store counted in every way, Ray's start-up (ours) reported apart; peak RSS of each "
        "way's own process",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    add_store_arguments(parser, dim=256)
    parser.add_argument("--components", type=int, default=128, help="components kept (default 128)")


def run(args: argparse.Namespace) -> int:
    store = store_dir(args.store, "pca", args.rows, args.dim, args.parts)
    if not 0 < args.components <= args.dim:
        raise InputError(f"--components must be in [1, {args.dim}]")
    result = bench_pca(store, args.rows, args.dim, args.parts, args.components)
    write_result(result, args.json)
    log.info("bench pca: ratio %.3f", result["ratio"])
    return 0


if __name__ == "__main__":  # one way in its own process (see ``_run_way``)
    if sys.argv[1] == "pca":
        sys.stdout.write(json.dumps(pca_way(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))) + "\n")
    else:
        raise SystemExit(f"unknown bench way {sys.argv[1]}")
