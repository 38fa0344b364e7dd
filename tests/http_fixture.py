"""A real HTTP server on 127.0.0.1 serving a folder, with a few misbehaving paths for error tests."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        if self.path.startswith("/slow/"):
            time.sleep(3.0)
        if self.path.startswith("/flaky/"):
            self.send_error(503, "try again")
            return
        asked = self.headers.get("Range", "")
        if asked.startswith("bytes=") and not self.path.startswith("/norange/"):
            first, _, last = asked[len("bytes=") :].partition("-")
            self._partial(int(first), int(last) if last else None)
            return
        if self.path.startswith("/norange/"):
            self.path = self.path[len("/norange") :]
        super().do_GET()

    def _partial(self, start: int, end: int | None) -> None:
        """Range requests: ``bytes=N-`` (what resuming downloaders send) and ``bytes=N-M``."""
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if start >= len(data):
            self.send_error(416)
            return
        end = len(data) - 1 if end is None else min(end, len(data) - 1)
        # counted before answering: a client that has the bytes must find its request counted
        type(self).hits[f"range:{self.path}"] = start
        type(self).hits[f"ranges:{self.path}"] = type(self).hits.get(f"ranges:{self.path}", 0) + 1
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])

    def log_message(self, *args):  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that gave up (a timeout test, a closed stream) is expected; anything else is shown."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """Serve ``root`` on 127.0.0.1 (a free port); yields the base URL and the per-path hit counts."""
    handler = type("Handler", (_Handler,), {"hits": {}})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()
