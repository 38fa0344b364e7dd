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
