"""A minimal HTTP origin that ignores Range (always 200 + whole body), for the fallback path.

nginx always honours Range for static files, so the "server ignores Range" case needs a server
of its own. Python's http.server does exactly that. It counts requests and body bytes sent.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        while piece := source.read(256 * 1024):
            outputfile.write(piece)
            with self.server.lock:
                self.server.bytes_sent += len(piece)

    def send_head(self):  # type: ignore[no-untyped-def]
        with self.server.lock:
            self.server.requests += 1
        return super().send_head()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes_sent = 0
        self.root = root

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@contextlib.contextmanager
def no_range_origin(root: Path) -> Iterator[_Server]:
    root.mkdir(parents=True, exist_ok=True)
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
