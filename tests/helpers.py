import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

_SERVER: dict[str, str] = {}


# the smallest pipeline run that still does every stage: one descriptor, small images, no whitening or
# re-ranking, a local Ray of two CPUs
SMALL_RUN = [
    "extract.max_side=256",
    "extract.descriptors=[gem]",
    "extract.shard_size=8",
    "fit.whiten=false",
    "rerank.methods=[]",
    "ray.num_cpus=2",
]


def prefect_api() -> str:
    """The URL of one Prefect server on 127.0.0.1 shared by the CLI runs of this test session (started at
    the first call, stopped at exit), so each run skips starting a temporary server of its own."""
    if "url" in _SERVER:
        return _SERVER["url"]
    home = tempfile.mkdtemp(prefix="ep-prefect-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(os.path.join(home, "server.log"), "w")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(home, ignore_errors=True)

    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start: {open(log.name).read()[-2000:]}")
        time.sleep(0.5)
    _SERVER.update(url=url, home=home)
    return url


def cli_env(ephemeral: bool = False) -> dict[str, str]:
    """Environment for a CLI run: the session's shared Prefect server, or (``ephemeral``) none, as a
    user who never configured Prefect has."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if not ephemeral:
        env["PREFECT_API_URL"] = prefect_api()
    return env


def embedpipe(*args, timeout=900, ephemeral=False) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process; str() every argument."""
    return subprocess.run(
        [sys.executable, "-m", "embedpipe.flows.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(ephemeral),
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (Prefect's server, Ray's GCS, raylet and workers)."""
    import psutil

    root = psutil.Process(proc.pid)
    while True:
        procs = [root, *root.children(recursive=True)] if root.is_running() else []
        procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not procs:
            break
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
    proc.wait(timeout=30)


def kill_cli_when(args: list, condition, log, timeout: float = 600) -> None:
    """Start ``embedpipe ARGS`` and ``kill -9`` its whole tree the moment ``condition()`` holds."""
    with open(log, "w") as fh:
        command = [sys.executable, "-m", "embedpipe.flows.cli", *map(str, args)]
        proc = subprocess.Popen(command, stdout=fh, stderr=fh, env=cli_env())
        deadline = time.monotonic() + timeout
        while not condition():
            assert proc.poll() is None, f"the command ended before the kill point: {open(log).read()[-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.005)
        kill_tree(proc)


def write_webdataset(files, pattern: str, per_shard: int, labels=None) -> list:
    """Pack ``files`` into WebDataset tar shards named ``pattern.format(shard)``: each sample is the image
    (``<stem>.jpg``) plus, with ``labels``, a ``.cls`` member. Returns the shard paths."""
    import io
    import tarfile
    from pathlib import Path

    shards = []
    for start in range(0, len(files), per_shard):
        path = Path(pattern.format(len(shards)))
        with tarfile.open(path, "w") as tar:
            for f in files[start : start + per_shard]:
                f = Path(f)
                members = [(f"{f.stem}{f.suffix}", f.read_bytes())]
                if labels is not None:
                    members.append((f"{f.stem}.cls", str(labels[f.name]).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def demo_subset(demo_images, root, groups, extras):
    """A Holidays-layout folder ``root`` with the demo groups ``groups`` (query number // 100) and the
    single images ``extras`` (image numbers) of ``demo_images``."""
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True)
    for p in sorted(demo_images.glob("*.jpg")):
        imno = int(p.stem)
        if imno // 100 in groups or imno in extras:
            shutil.copy(p, root / p.name)
    return root


def decoded_batch(images, names):
    """A batch of decoded images as the decode stage hands it to a model actor (``EmbedActor``)."""
    import numpy as np

    n = len(images)
    return {
        "pos": np.arange(n),
        "path": np.array([f"{name}.jpg" for name in names], dtype=object),
        "id": np.array(list(names), dtype=object),
        "bytes": np.ones(n, dtype=np.int64),
        "width": np.array([im.shape[1] for im in images]),
        "height": np.array([im.shape[0] for im in images]),
        "h": np.array([im.shape[0] for im in images]),
        "w": np.array([im.shape[1] for im in images]),
        "pixels": np.array([np.ascontiguousarray(im).tobytes() for im in images], dtype=object),
        "error": np.array([""] * n, dtype=object),
    }
