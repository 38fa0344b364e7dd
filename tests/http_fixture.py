"""A real HTTP server on 127.0.0.1 serving a folder, with misbehaving paths for error tests.

``/hostile/<kind>/<name>`` answers as a hostile server does (``HOSTILE``: what each kind does);
``/hostile-tar/<kind>/<name>.tar`` serves the tar ``<name>.tar`` of the folder with range requests but
answers as ``kind`` does to every request when the name starts with ``hostile``, and otherwise to the range
requests that start inside the data of an image member whose name starts with ``hostile`` (a member's read:
the listing's reads start at headers). The others serve the folder (``/slow/``, ``/flaky/`` and ``/norange/``
prefixes: delayed, 503, no ranges)."""

from __future__ import annotations

import contextlib
import functools
import io
import socket
import struct
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        if self.path.startswith("/hostile/"):
            self._hostile(self.path.split("/")[2])
            return
        if self.path.startswith("/hostile-tar/"):
            self._hostile_tar(self.path.split("/")[2])
            return
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

    def _headers(self, status: int, length: int, content_type: str = "image/jpeg", **extra: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in extra.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()

    def _hostile(self, kind: str, part: tuple[int, int, int] | None = None) -> None:
        """Answer as the hostile server ``kind`` of ``HOSTILE`` does; ``part``: (first, last, size) of a
        range request, answered with a 206 by the kinds that send a body they mean as the file's."""
        status, extra = 200, {}
        if part is not None:
            status, extra = 206, {"Content_Range": f"bytes {part[0]}-{part[1]}/{part[2]}"}
        if kind == "reset":  # half the announced body, then a TCP reset
            n = 20_000 if part is None else part[1] - part[0] + 1
            self._headers(status, n, **extra)
            self.wfile.write((b"\xff\xd8" + b"x" * n)[: n // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif kind == "truncated":  # fewer bytes than Content-Length, then a clean close
            n = 20_000 if part is None else part[1] - part[0] + 1
            self._headers(status, n, **extra)
            self.wfile.write((b"\xff\xd8" + b"x" * 998)[: n // 2])
            self.close_connection = True
        elif kind == "html":  # 200 with an error page
            page = b"<html><body>Sorry, this image is not available</body></html>"
            self._headers(200, len(page), "text/html")
            self.wfile.write(page)
        elif kind in ("busy", "ratelimit"):  # 503 / 429 forever, asking for a 1 s pause
            self._headers(503 if kind == "busy" else 429, 0, Retry_After="1")
        elif kind == "tarpit":  # announces 10 MB (a range: its length), then drips one byte every 0.1 s
            n = 10_000_000 if part is None else part[1] - part[0] + 1
            self._headers(status, n, **extra)
            with contextlib.suppress(OSError):
                for _ in range(min(n, 10_000)):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
        elif kind == "loop":  # a redirect to itself
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "stall":  # no answer at all
            time.sleep(30)
        elif kind == "empty":  # 200 (a range: 206) and no body
            self._headers(status, 0, **extra)
        elif kind == "huge":  # announces 10 GB
            self._headers(status, 10_000_000_000, **extra)
            with contextlib.suppress(OSError):
                self.wfile.write(b"\xff\xd8" + b"x" * 1000)
        elif kind == "notfound":
            self.send_error(404)
        else:
            raise ValueError(f"no hostile kind {kind!r}")

    def _hostile_tar(self, kind: str) -> None:
        """``/hostile-tar/<kind>/<name>.tar`` (see the module doc; a hostile member is an image member,
        ``.jpg``, whose name starts with ``hostile``)."""
        name = self.path.split("/", 3)[3]
        path = Path(self.translate_path("/" + name))
        asked = self.headers.get("Range", "")
        if not asked.startswith("bytes=") or not path.is_file():
            self._hostile(kind)
            return
        first, _, last = asked[len("bytes=") :].partition("-")
        start, size = int(first), path.stat().st_size
        end = min(int(last) if last else size - 1, size - 1)
        if not name.startswith("hostile"):
            with tarfile.open(path) as tar:
                members = [
                    m
                    for m in tar.getmembers()
                    if m.name.rpartition("/")[2].startswith("hostile") and m.name.endswith(".jpg")
                ]
            if not any(m.offset_data <= start < m.offset_data + m.size for m in members):
                self.path = "/" + name
                self._partial(start, end)
                return
        self._hostile(kind, (start, end, size))

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


# what each hostile kind does, and the reason a read of it fails with
HOSTILE = {
    "reset": "connection reset mid-body",
    "truncated": "body shorter than Content-Length",
    "html": "200 with an HTML page (read, then not an image)",
    "busy": "503 forever, Retry-After 1",
    "ratelimit": "429 forever, Retry-After 1",
    "tarpit": "10 MB announced, one byte every 0.1 s",
    "loop": "redirect to itself",
    "stall": "no answer",
    "empty": "200 with an empty body (read, then an empty file)",
    "huge": "10 GB announced",
    "notfound": "404",
}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of ``members`` ((name, bytes) each, in order) at ``path``, for the ``/hostile-tar/`` paths."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


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
