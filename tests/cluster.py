"""Real engine clusters on this machine for the distribution tests: a two-node Ray cluster (head on
127.0.0.2, worker on 127.0.0.3, one CPU each) and a Dask scheduler with one worker process, each
started with the engines' own command lines and killed by process group in the finalizer."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, command line) of every live process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        out[int(entry.name)] = (int(fields[1]), int(fields[2]), cmd)
    return out


def group_processes(pgids: list[int]) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in these process groups and of their descendants (Ray
    starts its worker processes in sessions of their own, as children of the raylet)."""
    procs = _processes()
    ours = {pid for pid, (_, pgid, _) in procs.items() if pgid in pgids}
    grown = True
    while grown:
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in ours} - ours
        ours |= more
        grown = bool(more)
    return [(pid, procs[pid][2]) for pid in sorted(ours)]


def _kill_groups(procs: list[subprocess.Popen]) -> None:
    """SIGKILL what we started: each process was started in a new session, so its group holds the engine
    processes it spawned; their descendants in sessions of their own are killed by pid first."""
    for pid, _ in group_processes([p.pid for p in procs]):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]  # environment of the cluster's processes; drivers need the same auth token
    pgids: list[int]


def _ray(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _node_ports(taken: set[int]) -> list[str]:
    """Every port a Ray node opens, picked free and distinct from each other, from ``taken`` (ports this
    cluster uses already) and from the node's worker port range, so that neither concurrent test runs nor
    the node's own components collide; the picked ports are added to ``taken``."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "runtime-env-agent-port",
        "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port",
        "metrics-export-port",
    )
    span = 40
    while True:  # a worker range clear of every port taken so far
        low = free_port()
        if low + span < 65536 and not any(low <= t <= low + span for t in taken):
            break
    taken.update(range(low, low + span + 1))
    args = []
    for name in names:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        args += [f"--{name}", str(port)]
    return args + ["--min-worker-port", str(low), "--max-worker-port", str(low + span)]


@contextlib.contextmanager
def ray_two_nodes(tmp: Path) -> Iterator[RayCluster]:
    """Head on 127.0.0.2 with resource ``node_a``, a second node on 127.0.0.3 with ``node_b``; one CPU each.

    Token authentication with a fresh token in the environment (RAY_AUTH_TOKEN), so a stale
    ~/.ray/auth_token cannot break the join."""
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # allow a multi-node cluster (node IPs 127.0.0.x)
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    port = free_port("127.0.0.2")
    dashboard = free_port()
    taken = {port, dashboard}
    temp = Path(f"/tmp/ep-rc-{secrets.token_hex(3)}")  # short: Ray's socket paths have a length limit
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    common += ["--object-store-memory", str(200 * 1024 * 1024), "--temp-dir", str(temp)]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            _ray(
                ["--head", "--node-ip-address", "127.0.0.2", "--port", str(port)]
                + ["--resources", '{"node_a": 1}']
                + ["--include-dashboard", "false", "--dashboard-port", str(dashboard)]
                + _node_ports(taken)
                + common,
                env,
                tmp / "ray-head.log",
            )
        )
        _wait_nodes(f"127.0.0.2:{port}", env, 1, procs)
        procs.append(
            _ray(
                ["--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3"]
                + ["--resources", '{"node_b": 1}']
                + _node_ports(taken)
                + common,
                env,
                tmp / "ray-worker.log",
            )
        )
        _wait_nodes(f"127.0.0.2:{port}", env, 2, procs)
        yield RayCluster(f"127.0.0.2:{port}", env, [p.pid for p in procs])
    finally:
        _kill_groups(procs)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""


def _wait_nodes(address: str, env: dict[str, str], n: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a ray start process exited; see ray-*.log in the test's tmp dir")
        try:
            out = subprocess.run(
                [sys.executable, "-c", _COUNT_NODES, address],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:  # the head's GCS not up yet
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise RuntimeError(f"Ray cluster at {address} did not reach {n} node(s)")


@dataclass
class DaskCluster:
    address: str
    pgids: list[int]


@contextlib.contextmanager
def dask_cluster(tmp: Path) -> Iterator[DaskCluster]:
    """``dask scheduler`` on 127.0.0.1 and one ``dask worker`` process (one thread), no dashboards."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    cli = "distributed.cli."
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", cli + "dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
                + ["--no-dashboard"],
                stdout=(tmp / "dask-scheduler.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", cli + "dask_worker", address, "--host", "127.0.0.1"]
                + ["--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB"],
                stdout=(tmp / "dask-worker.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        yield DaskCluster(address, [p.pid for p in procs])
    finally:
        _kill_groups(procs)


def scheduler_task_counts(address: str) -> dict[str, int]:
    """Tasks the Dask scheduler at ``address`` has computed, by task prefix (the function name without
    leading underscores)."""
    from distributed import Client

    def counts(dask_scheduler) -> dict[str, int]:
        return {k: v.state_counts.get("memory", 0) for k, v in dask_scheduler.task_prefixes.items()}

    with Client(address, timeout=30) as client:
        return client.run_on_scheduler(counts)
