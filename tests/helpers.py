import subprocess
import sys


def embedpipe(*args, timeout=900) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process; str() every argument."""
    return subprocess.run(
        [sys.executable, "-m", "embedpipe.flows.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
