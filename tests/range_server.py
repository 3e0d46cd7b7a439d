"""A tiny HTTP server with byte ranges (what GDAL's /vsicurl/ needs), serving one folder on 127.0.0.1.

Python's ``http.server`` ignores ``Range``; GDAL then reads whole files or gives up. This handler
answers ``HEAD`` and single ``bytes=a-b`` ranges with 206, which is all /vsicurl/ asks for.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        type(self).requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}")
        if not path.is_file():
            self.send_error(404, "File not found")
            return None
        size = path.stat().st_size
        m = _RANGE.match(self.headers.get("Range", ""))
        fh = open(path, "rb")  # noqa: SIM115 - closed by the base class after copyfile
        if m is None:
            self.send_response(200)
            start, end = 0, size - 1
        else:
            start = int(m.group(1)) if m.group(1) else max(0, size - int(m.group(2)))
            end = min(int(m.group(2)), size - 1) if m.group(1) and m.group(2) else size - 1
            if start >= size:
                fh.close()
                self.send_error(416, "Range not satisfiable")
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        fh.seek(start)
        return _Limited(fh, end - start + 1)


class _Limited:
    """A file object that ends after ``n`` bytes (what copyfile sends for a range)."""

    def __init__(self, fh, n: int) -> None:  # type: ignore[no-untyped-def]
        self.fh, self.left = fh, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.fh.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) while the block runs; yields ``http://127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=os.fspath(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
