"""The run directory's lease (``storage/lease.py``): one writer at a time, refused in one line or waited
for, taken over at once from a killed holder on this machine and after ``stale_s`` from another node,
race-safe between two would-be successors; and, with the real CLI, a second ``run`` refused, ``report``
refused, then a ``run --wait`` that takes over from a holder killed with ``kill -9``."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from embedpipe.storage.contracts.config import OrchestrationConfig
from embedpipe.storage.contracts.errors import EmbedpipeError, LeaseLost, RunBusy
from embedpipe.storage.lease import LEASE_DIR, OWNER_FILE, _acquire, holder, run_lease

from .helpers import SMALL_RUN, cli_env, embedpipe

# Holds the lease on argv[1] as command argv[2] until a line on stdin, then prints when it let go.
HOLDER = """
import sys, time
from embedpipe.storage.lease import run_lease
with run_lease(sys.argv[1], sys.argv[2], heartbeat_s=0.2, stale_s=60):
    print("held", flush=True)
    sys.stdin.readline()
    released = time.time()
print(released, flush=True)
"""

# Waits until time argv[2], then tries the lease once (no wait); holds it until stdin closes.
RACER = """
import sys, time
from embedpipe.storage.contracts.errors import RunBusy
from embedpipe.storage.lease import run_lease
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with run_lease(sys.argv[1], "racer", heartbeat_s=0.2, stale_s=60):
        print("won", flush=True)
        sys.stdin.readline()
except RunBusy:
    print("busy", flush=True)
"""


def _start_holder(root: Path, command: str = "run") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _write_owner(root: Path, host: str, heartbeat_age: float) -> str:
    """A lease as if written by a writer on ``host`` whose last heartbeat is ``heartbeat_age`` s old."""
    (root / LEASE_DIR).mkdir(parents=True)
    token = uuid.uuid4().hex
    beat = time.time() - heartbeat_age  # epoch seconds (ISO UTC is read too)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(beat))
    owner = {"host": host, "pid": 4242, "command": "run", "started": started, "heartbeat": beat}
    owner["token"] = token
    (root / LEASE_DIR / OWNER_FILE).write_text(json.dumps(owner))
    return token


def test_acquire_writes_owner_and_release_leaves_nothing(tmp_path):
    root = tmp_path / "new" / "run"  # made with its parents
    with run_lease(root, "run", heartbeat_s=0.05, stale_s=1) as lease:
        owner = json.loads((root / LEASE_DIR / OWNER_FILE).read_text())
        assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
        assert owner["command"] == "run" and owner["token"] == lease.token
        assert owner["started"].endswith("Z") and owner["heartbeat"].endswith("Z")
        first = holder(root).heartbeat
        time.sleep(0.3)
        assert holder(root).heartbeat > first  # the heartbeat advances
        assert [p.name for p in root.iterdir()] == [LEASE_DIR]
    assert list(root.iterdir()) == []


def test_reentrant_within_a_process(tmp_path):
    with run_lease(tmp_path, "demo") as outer:
        with run_lease(tmp_path / ".", "run") as inner:  # demo calling the flow, which asks again
            assert inner is outer
        assert holder(tmp_path).token == outer.token  # the inner release kept it
    assert not (tmp_path / LEASE_DIR).exists()


def test_live_holder_refuses_in_one_line_and_wait_takes_it_after_release(tmp_path):
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(RunBusy) as err, run_lease(tmp_path, "run"):
            pass
        line = str(err.value)
        assert "\n" not in line and err.value.exit_code == 2 and isinstance(err.value, EmbedpipeError)
        who = f"'run' (pid {proc.pid} on host {socket.gethostname()}, since "
        assert line.startswith(f"{tmp_path} is in use by {who}")
        assert "heartbeat 0 s ago" in line and line.endswith("wait for it, or pass --wait")

        proc.stdin.write("\n")  # released in a moment, while we wait
        proc.stdin.flush()
        with run_lease(tmp_path, "run", wait=True, heartbeat_s=0.2, stale_s=60):
            acquired = time.time()
        released = float(proc.stdout.readline())
        assert released <= acquired < released + 1.0
    finally:
        proc.kill()
        proc.wait()


def test_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    proc = _start_holder(tmp_path)
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped yet: a zombie
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, "embedpipe.lease"), run_lease(tmp_path, "run", stale_s=60):
            assert time.monotonic() - start < 1.0
        assert f"pid {proc.pid}" in caplog.text and "no longer running on this machine" in caplog.text
    finally:
        proc.wait()
    proc = _start_holder(tmp_path)  # and once reaped
    proc.kill()
    proc.wait()
    with run_lease(tmp_path, "run", stale_s=60):
        pass


def test_other_host_is_taken_over_only_after_stale_s(tmp_path, caplog):
    _write_owner(tmp_path, "node-b", heartbeat_age=5)
    with pytest.raises(RunBusy, match="pid 4242 on host node-b.*heartbeat 5 s ago"):
        with run_lease(tmp_path, "run", stale_s=60):
            pass
    (tmp_path / LEASE_DIR / OWNER_FILE).unlink()
    (tmp_path / LEASE_DIR).rmdir()
    _write_owner(tmp_path, "node-b", heartbeat_age=90)
    with caplog.at_level(logging.WARNING, "embedpipe.lease"), run_lease(tmp_path, "run", stale_s=60):
        assert holder(tmp_path).host == socket.gethostname()
    assert "node-b" in caplog.text and "no heartbeat for 90 s" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # old lease and breaker removed


def test_lease_without_owner_is_busy_while_fresh_and_stale_when_old(tmp_path):
    (tmp_path / LEASE_DIR).mkdir()  # a writer between its mkdir and its first write
    with pytest.raises(RunBusy, match="a writer that is starting"), run_lease(tmp_path, "run", stale_s=60):
        pass
    old = time.time() - 120
    os.utime(tmp_path / LEASE_DIR, (old, old))  # ... killed right there
    with run_lease(tmp_path, "run", stale_s=60) as lease:
        assert holder(tmp_path).token == lease.token


def test_racing_successors_of_a_stale_lease_exactly_one_wins(tmp_path):
    _write_owner(tmp_path, "node-b", heartbeat_age=600)
    at = time.time() + 1.5  # every racer started by then, on this shared machine
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), str(at)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        answers = [p.stdout.readline().strip() for p in procs]  # the winner holds until stdin closes
        assert sorted(answers) == ["busy", "busy", "busy", "won"], answers
        winner = procs[answers.index("won")]
        assert holder(tmp_path).pid == winner.pid
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
    logs = "".join(p.stderr.read() for p in procs)
    assert logs.count("taking over the lease") == 1, logs
    assert list(tmp_path.iterdir()) == []


def test_stalled_writer_taken_over_loses_and_raises_on_release(tmp_path, caplog):
    with pytest.raises(LeaseLost) as err, caplog.at_level(logging.ERROR, "embedpipe.lease"):
        with run_lease(tmp_path, "run", heartbeat_s=0.05, stale_s=0.2) as stalled:
            stalled._stop.set()  # the heartbeat stalls...
            stalled._thread.join()
            time.sleep(0.3)
            successor = _acquire(tmp_path, "reindex", False, 0.05, 0.2)  # ... and is taken over
            stalled._stop.clear()
            stalled.beat()  # ... then wakes up
            assert stalled.lost and "lease lost" in caplog.text and "'reindex'" in caplog.text
    assert "\n" not in str(err.value) and err.value.exit_code == 1
    assert "another writer took the run directory over" in str(err.value)
    assert holder(tmp_path).token == successor.token  # the successor's lease is untouched
    successor.release()
    assert list(tmp_path.iterdir()) == []


def test_config_bounds():
    assert OrchestrationConfig().lease_stale_s > 2 * OrchestrationConfig().lease_heartbeat_s
    with pytest.raises(ValidationError, match="more than twice"):
        OrchestrationConfig(lease_heartbeat_s=40)


SETS = SMALL_RUN


def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("embedpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_cli_refuses_a_held_run_then_waits_and_takes_over_a_killed_holder(tmp_path, small_holidays):
    run = tmp_path / "run"
    args = ["run", "--images", small_holidays, "--protocol", "holidays", "--out", run]
    for s in SETS:
        args += ["--set", s]
    holder_proc = _start_holder(run)
    try:
        for command in (args, ["report", run]):
            start = time.monotonic()
            refused = embedpipe(*command, timeout=120)
            assert refused.returncode == 2, refused.stderr[-3000:]
            line = _one_error(refused)
            assert f"in use by 'run' (pid {holder_proc.pid} on host" in line and "--wait" in line, line
            assert time.monotonic() - start < 60
        assert sorted(p.name for p in run.iterdir()) == [LEASE_DIR]  # nothing else written

        log = tmp_path / "wait.log"
        with log.open("w") as fh:
            waiter = subprocess.Popen(
                [sys.executable, "-m", "embedpipe.flows.cli", *map(str, args), "--wait"],
                stdout=fh,
                stderr=fh,
                env=cli_env(),
            )
        deadline = time.monotonic() + 120
        while "waiting for it" not in log.read_text():
            assert waiter.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        holder_proc.kill()  # kill -9: the waiter takes over at its next look
        holder_proc.wait()
        assert waiter.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        holder_proc.kill()
        holder_proc.wait()
    text = log.read_text()
    assert "taking over the lease" in text and f"its process {holder_proc.pid} is no longer running" in text
    assert (run / "report" / "metrics.json").is_file() and not (run / LEASE_DIR).exists()
