"""A forwarding proxy in front of the stand-in cloud's S3 that refuses one kind of request.

`S3Faults(upstream)` listens on a free 127.0.0.1 port (`url`) and forwards every request to
`upstream` ("http://host:port") unchanged (same path, headers and Host), except the requests
of the step named by `refuse` ("bucket create": PUT of the bucket; "part upload": PUT of a
`*.part.NN` key; "manifest upload": PUT of a `*.manifest.xml` key; "bucket list": GET of the
bucket, as a cleanup lists a folder), which get an S3
`403 AccessDenied` error document (403 so botocore does not retry). `refused` counts them.

`hold = "manifest upload"` (any step) instead parks those requests: `held` is set when one
arrives, and each is answered 503 without being forwarded once `release` is set (as a store
that never completed an upload whose client died).
"""

from __future__ import annotations

import http.client
import http.server
import threading
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


class S3Faults:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.refuse: str | None = None
        self.refused = 0
        self.hold: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if owner._kind(self.command, self.path) == owner.hold is not None:
                    owner.held.set()
                    owner.release.wait(120)
                    self._send(503, [], b"")
                    return
                step = owner._step(self.command, self.path)
                if step is not None:
                    with owner._lock:
                        owner.refused += 1
                    doc = (
                        '<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                        f"<Message>{step} refused by the fault proxy</Message></Error>"
                    ).encode()
                    self._send(403, [("Content-Type", "application/xml")], doc)
                    return
                conn = http.client.HTTPConnection(*owner.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    out = [(k, v) for k, v in out if k.lower() != "content-length"]
                    self._send(resp.status, out, data, head=self.command == "HEAD")
                finally:
                    conn.close()

            def _send(
                self, status: int, headers: list[tuple[str, str]], body: bytes, head: bool = False
            ) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _step(self, method: str, path: str) -> str | None:
        kind = self._kind(method, path)
        return kind if kind is not None and kind == self.refuse else None

    @staticmethod
    def _kind(method: str, path: str) -> str | None:
        key = urlsplit(path).path.rstrip("/")  # path-style: /services/objectstorage/bucket/...
        if method == "GET" and key.count("/") == 3:
            return "bucket list"
        if method != "PUT":
            return None
        last = key.rsplit("/", 1)[-1]
        # Objects first: without a service prefix (SeaweedFS) /<bucket>/<folder>/<file> has
        # as many slashes as /services/objectstorage/<bucket>.
        if ".part." in last:
            return "part upload"
        if last.endswith(".manifest.xml"):
            return "manifest upload"
        if key.count("/") == 3:  # /services/objectstorage/<bucket>
            return "bucket create"
        return None

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
