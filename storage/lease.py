"""One writer per run directory: the lease every writing command takes on ``RUN`` (see docs/runs.md).

The lease is the folder ``RUN/.lease``, made with ``os.mkdir`` (atomic and exclusive, NFS included, with
no ``fcntl``/``flock``), holding ``owner.json``: host, pid, command, start time, heartbeat, a random token
and what tells this machine's processes apart (boot id, pid namespace, the pid's start time). A daemon
thread renews the heartbeat every ``heartbeat_s`` while the token there is still ours.

A lease is stale, and taken over, when its heartbeat is older than ``stale_s`` (a holder on another node
that died or lost the file system), or at once when its holder ran on this same machine (host, boot id and
pid namespace) and its process is gone (``kill -9``). A ``.lease`` with no readable ``owner.json`` is stale
once its mtime is older than ``stale_s`` (a writer killed between the mkdir and its first write).

A takeover happens under the breaker folder ``RUN/.lease-break`` (also ``os.mkdir``): inside it the
breaker reads ``owner.json`` again, and only if it still holds the same stale token it renames the old
lease aside and removes it, then competes for ``.lease`` like anyone else; so of two would-be writers
racing for a stale lease exactly one gets it. A breaker folder older than ``stale_s`` is removed (its
maker died).

Writes into the lease go through a descriptor of the folder this writer created, so a stalled writer
that wakes up after a takeover never touches its successor's ``owner.json``: its next heartbeat sees a
foreign token, logs it, and the lease raises ``LeaseLost`` when it is released. Readers take no lease.
Within one process a second acquisition of a root already held is a no-op (``demo`` holding the lease
while the pipeline flow asks for it again).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe.storage.contracts.errors import LeaseLost, RunBusy
from embedpipe.storage.contracts.layout import write_error

log = logging.getLogger("embedpipe.lease")

LEASE_DIR = ".lease"
BREAKER_DIR = ".lease-break"
OWNER_FILE = "owner.json"

_HELD: dict[str, list[Any]] = {}  # realpath of a root -> [Lease, depth]: the roots this process holds
_HELD_LOCK = threading.Lock()


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from ``/proc/PID/stat``."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _iso(t: float, digits: bool = False) -> str:
    stamp = dt.datetime.fromtimestamp(t, dt.UTC)
    return stamp.isoformat(timespec="milliseconds" if digits else "seconds").replace("+00:00", "Z")


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


@dataclass(frozen=True)
class Holder:
    """What ``RUN/.lease/owner.json`` says of the writer holding the lease."""

    host: str
    pid: int
    command: str
    started: str
    heartbeat: float  # epoch seconds
    token: str
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: int | None = None
    stale_s: float | None = None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Holder | None:
        heartbeat = _epoch(data.get("heartbeat"))
        if heartbeat is None or not data.get("token"):
            return None
        try:
            return cls(
                host=str(data.get("host", "?")),
                pid=int(data.get("pid", 0)),
                command=str(data.get("command", "?")),
                started=str(data.get("started", "?")),
                heartbeat=heartbeat,
                token=str(data["token"]),
                boot_id=data.get("boot_id"),
                pid_ns=data.get("pid_ns"),
                pid_start=data.get("pid_start"),
                stale_s=data.get("stale_s"),
            )
        except (TypeError, ValueError):
            return None

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (time.time() if now is None else now) - self.heartbeat)
        return (
            f"'{self.command}' (pid {self.pid} on host {self.host}, since {self.started}, "
            f"heartbeat {age:.0f} s ago)"
        )

    def on_this_machine(self) -> bool:
        """Same host, same boot and same pid namespace: its pid means the same process here."""
        return (
            self.host == socket.gethostname()
            and self.boot_id == _read_text("/proc/sys/kernel/random/boot_id")
            and self.pid_ns == _pid_ns()
        )

    def process_gone(self) -> bool:
        """Its process no longer runs (call only when ``on_this_machine``): no such pid, a zombie, or the
        pid reused by a process started at another time."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        stat = _pid_stat(self.pid)
        if stat is None:
            return False
        state, start = stat
        return state in ("Z", "X") or (self.pid_start is not None and start != self.pid_start)


def holder(root: Path | str) -> Holder | None:
    """The writer holding ``root``'s lease now, or None (no lease, or one whose owner.json is not yet
    written or unreadable)."""
    try:
        data = json.loads((Path(root) / LEASE_DIR / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return Holder.parse(data) if isinstance(data, dict) else None


@dataclass(frozen=True)
class _Seen:
    """One look at an existing ``.lease``: its holder (None: no owner.json yet) and the folder's mtime."""

    holder: Holder | None
    mtime: float

    def stale_reason(self, stale_s: float, now: float) -> str | None:
        h = self.holder
        if h is None:
            age = now - self.mtime
            return f"no owner written for {age:.0f} s" if age > stale_s else None
        if h.on_this_machine() and h.process_gone():
            return f"its process {h.pid} is no longer running on this machine"
        limit = max(stale_s, h.stale_s or 0.0)  # never sooner than the holder itself allows
        age = now - h.heartbeat
        return f"no heartbeat for {age:.0f} s" if age > limit else None

    def same_as(self, other: _Seen) -> bool:
        if self.holder is None or other.holder is None:
            return self.holder is None and other.holder is None
        return self.holder.token == other.holder.token

    def who(self, now: float) -> str:
        if self.holder is None:
            return f"a writer that is starting (lease made {max(0.0, now - self.mtime):.0f} s ago)"
        return self.holder.describe(now)


def _look(root: Path) -> _Seen | None:
    lease = root / LEASE_DIR
    try:
        mtime = lease.stat().st_mtime
    except FileNotFoundError:
        return None
    return _Seen(holder(root), mtime)


class Lease:
    """A held lease on ``root`` (see the module doc); made by ``run_lease``."""

    def __init__(self, root: Path, command: str, heartbeat_s: float, stale_s: float, fd: int):
        self.root, self.command = root, command
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._fd = fd  # the lease folder this writer made: every write goes there, whatever its name now
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_warned = False
        stat = _pid_stat("self")
        self._owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "started": _iso(self._started),
            "token": self.token,
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_ns(),
            "pid_start": stat[1] if stat else None,
            "heartbeat_s": heartbeat_s,
            "stale_s": stale_s,
        }

    @property
    def path(self) -> Path:
        return self.root / LEASE_DIR

    def write_owner(self) -> None:
        """owner.json with a new heartbeat, through a temporary file in the lease folder and a rename."""
        data = json.dumps({**self._owner, "heartbeat": _iso(time.time(), digits=True)}, indent=1) + "\n"
        tmp = f".{OWNER_FILE}.{self.token}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=self._fd)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(data)
            os.replace(tmp, OWNER_FILE, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._fd)
            raise

    def _ours(self) -> bool:
        """The lease at ``root`` is still the folder this writer made, with its token."""
        try:
            same_dir = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            return False
        current = holder(self.root)
        return same_dir and current is not None and current.token == self.token

    def beat(self) -> None:
        """One heartbeat: renew owner.json if the lease is still ours, else record it lost."""
        if self.lost:
            return
        if not self._ours():
            self.lost = True
            now = holder(self.root)
            who = now.describe() if now else "another writer"
            log.error("%s: lease lost, the run directory was taken over by %s", self.root, who)
            return
        try:
            self.write_owner()
        except OSError as err:  # a transient file-system error: the next beat tries again
            if not self._write_warned:
                log.warning("%s: cannot renew the lease heartbeat: %s", self.root, err)
                self._write_warned = True

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"lease-heartbeat {self.root}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours. Raises ``LeaseLost`` when another
        writer took the run over meanwhile."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if not self.lost and not self._ours():
                self.lost = True
            if not self.lost:
                for name in os.listdir(self._fd):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=self._fd)
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)
        finally:
            os.close(self._fd)
        if self.lost:
            raise LeaseLost(
                f"{self.root}: another writer took the run directory over while this '{self.command}' "
                f"stalled (no heartbeat for over {self.stale_s:g} s); re-run the command once it is done"
            )


def _create(root: Path, command: str, heartbeat_s: float, stale_s: float) -> Lease | None:
    """The lease, if ``.lease`` could be made now; None when it exists."""
    path = root / LEASE_DIR
    try:
        os.mkdir(path)
    except FileExistsError:
        return None
    except OSError as err:
        raise write_error(path, err) from err
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    lease = Lease(root, command, heartbeat_s, stale_s, fd)
    try:
        lease.write_owner()
    except OSError as err:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        raise write_error(path / OWNER_FILE, err) from err
    return lease


def _remove_aside(path: Path, name: str) -> None:
    """Rename ``path`` to ``name`` beside it, then remove it (a folder gone from ``.lease`` at once)."""
    aside = path.with_name(name)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _break(root: Path, seen: _Seen, reason: str, stale_s: float) -> bool:
    """Remove the stale lease ``seen`` under the breaker lock, if it is still that lease and still stale.
    True when it was removed (the caller then competes for ``.lease``)."""
    breaker = root / BREAKER_DIR
    try:
        os.mkdir(breaker)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - breaker.stat().st_mtime > stale_s:  # its maker died inside
                _remove_aside(breaker, f"{BREAKER_DIR}-stale-{uuid.uuid4().hex}")
        return False
    try:
        now = _look(root)
        if now is None:
            return True  # released meanwhile
        reason = now.stale_reason(stale_s, time.time()) if now.same_as(seen) else None
        if reason is None:
            return False
        token = now.holder.token if now.holder else uuid.uuid4().hex
        _remove_aside(root / LEASE_DIR, f"{LEASE_DIR}-stale-{token}")
        who = now.holder.describe() if now.holder else "a writer that never wrote its owner"
        log.warning("%s: taking over the lease of %s: %s", root, who, reason)
        return True
    except FileNotFoundError:
        return True  # removed by its holder meanwhile
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(breaker)


def _acquire(root: Path, command: str, wait: bool, heartbeat_s: float, stale_s: float) -> Lease:
    poll = min(1.0, heartbeat_s)
    waiting = False
    while True:
        lease = _create(root, command, heartbeat_s, stale_s)
        if lease is not None:
            lease.start()
            return lease
        seen = _look(root)
        if seen is None:
            continue  # released between the mkdir and the look
        now = time.time()
        reason = seen.stale_reason(stale_s, now)
        if reason is not None:
            if not _break(root, seen, reason, stale_s):
                time.sleep(min(poll, 0.05))  # another process is breaking it
            continue
        if not wait:
            raise RunBusy(f"{root} is in use by {seen.who(now)}; wait for it, or pass --wait")
        if not waiting:
            log.info("%s is in use by %s: waiting for it", root, seen.who(now))
            waiting = True
        time.sleep(poll)


@contextlib.contextmanager
def run_lease(
    root: Path | str,
    command: str,
    wait: bool = False,
    heartbeat_s: float = 10.0,
    stale_s: float = 60.0,
) -> Iterator[Lease]:
    """Hold the lease of the run directory ``root`` (made if missing) for the block. ``command`` names
    the holder to others ("run", "reindex", "report", ...). Held by a live writer: ``RunBusy`` (one line
    naming it), or with ``wait`` poll until it is released or stale. Reentrant within a process."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(root)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield held[0]
        finally:
            with _HELD_LOCK:
                held[1] -= 1
        return
    lease = _acquire(root, command, wait, heartbeat_s, stale_s)
    with _HELD_LOCK:
        _HELD[key] = [lease, 1]
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()
