"""A static file server on 127.0.0.1 for benchmarks: one folder over plain HTTP (stdlib
``ThreadingHTTPServer``: one thread per connection, HTTP/1.1 keep-alive) on a free port.

``serve_folder`` runs it in a child process, so that the clients being timed never share an interpreter
(and its lock) with the server; ``python -m embedpipe.flows.benchmarks.http_serve ROOT`` is that child:
it prints its port on one line, then serves until its standard input closes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("embedpipe.http")


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # many downloader threads connect at once

    def handle_error(self, request, client_address) -> None:
        """A client that closed its connection early is expected; anything else is reported."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def make_server(root: Path) -> ThreadingHTTPServer:
    """A server for ``root`` bound to 127.0.0.1 on a free port (not yet serving)."""
    return _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """Serve ``root`` from a child process while the block runs; yields the base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedpipe.flows.benchmarks.http_serve", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line.isdigit():
            raise RuntimeError(f"the benchmark's HTTP server did not start (exit {proc.poll()})")
        yield f"http://127.0.0.1:{line}"
    finally:
        if proc.stdin:
            proc.stdin.close()  # the child's signal to stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    server = make_server(Path(argv[0]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sys.stdout.write(f"{server.server_address[1]}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes our standard input (or exits)
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
