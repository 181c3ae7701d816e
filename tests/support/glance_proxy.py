"""A fault-injecting HTTP proxy in front of a real Glance, for what Glance will not do on demand.

`GlanceProxy(upstream_url)` forwards every request (bodies de-chunked and re-sent with a
Content-Length) and every answer, and on request:

- `flip_upload_byte = N`: flips byte N of the body of `PUT /v2/images/{id}/file`, so Glance
  stores (and hashes) other bytes than the client sent: what a bad network or a broken middlebox
  would do, and what the registrar's hash check is for;
- `report_status = "saving"`: rewrites `status` in the answers to `GET /v2/images/{id}`, the way
  a slow store keeps an image short of `active`.

`proxy.uploads` counts upload requests and `proxy.upload_chunked` whether each came chunked.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

_IMAGE_PATH = re.compile(r"/v2/images/[0-9a-f-]{36}$")
_FILE_PATH = re.compile(r"/v2/images/[0-9a-f-]{36}/file$")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> tuple[bytes, bool]:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts), True
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length), False


class GlanceProxy:
    def __init__(self, upstream_url: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream_url)
        self.flip_upload_byte: int | None = None
        self.report_status: str | None = None
        self.uploads = 0
        self.upload_chunked: list[bool] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body, chunked = _read_body(handler)
        path = urllib.parse.urlsplit(handler.path).path
        if handler.command == "PUT" and _FILE_PATH.match(path):
            self.uploads += 1
            self.upload_chunked.append(chunked)
            if self.flip_upload_byte is not None and len(body) > self.flip_upload_byte:
                flipped = bytearray(body)
                flipped[self.flip_upload_byte] ^= 0xFF
                body = bytes(flipped)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            status, reason, answer_headers = response.status, response.reason, response.getheaders()
        finally:
            conn.close()
        if (
            self.report_status
            and handler.command == "GET"
            and _IMAGE_PATH.match(path)
            and status == 200
        ):
            image = json.loads(answer)
            image["status"] = self.report_status
            answer = json.dumps(image).encode()
        handler.send_response(status, reason)
        for key, value in answer_headers:
            if key.lower() not in _HOP_HEADERS:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(answer)


@pytest.fixture
def glance_proxy(glance_noauth: Any) -> Iterator[GlanceProxy]:
    """A GlanceProxy in front of `glance_noauth`, forwarding faithfully until told otherwise."""
    proxy = GlanceProxy(glance_noauth.url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
