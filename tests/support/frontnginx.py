"""A real nginx in front of an origin: a forward HTTP proxy, or a server that only redirects.

Plain helpers (the caller stops them; each is also a context manager):

- ``start_forward_proxy(workdir) -> Front`` -- a forward proxy (what ``http_proxy`` names): a
  request in absolute form (``GET http://HOST:PORT/path``) is passed to the ``Host`` header's
  host and port. The Host header is used on purpose: a client that sends a wrong one through a
  proxy reaches the wrong server (or none), and the test sees it. Bodies are streamed, not
  buffered, and nothing is cached, so each request here is exactly one request at the origin.
- ``start_redirector(workdir, target_base) -> Front`` -- answers every request with ``302`` to
  ``target_base`` + the same path and query.

``Front`` API
-------------
- ``url: str`` -- ``"http://127.0.0.1:PORT"`` (for ``http_proxy``, or as a URL base).
- ``log(name=None) -> list[dict]`` -- access-log entries, oldest first, each ``{"name",
  "request"`` (the request line, e.g. ``"GET http://127.0.0.1:8080/a.img HTTP/1.1"``),
  ``"host"`` (the Host header), ``"uri", "range", "status", "body_bytes", "connection"``
  (nginx's serial number of the client's TCP connection) ``, "connection_requests"}``.
- ``requests(name=None) -> int``; ``reset_counts()``; ``stop()``.

Counting is exact in the way tests/support/origin.py describes: every counting call first sends
a private sync request and waits until its log line appears (one nginx process, events in order).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from tests.support.nginxproc import CountedServer, conf

_SYNC_PREFIX = "/.front-sync/"

_LOG_FORMAT = (
    '\'{"request":"$request","host":"$http_host","uri":"$uri","range":"$http_range",'
    '"status":$status,"body_bytes":$body_bytes_sent,"connection":$connection,'
    '"connection_requests":$connection_requests}\''
)

# An IP literal with a port needs no resolver; a name in Host would (and fail, on purpose).
_FORWARD = """
        location / {
            proxy_pass http://$http_host$request_uri;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
"""


def _conf(workdir: Path, port: int, locations: str) -> str:
    http = "    keepalive_timeout 60s;\n    keepalive_requests 100000;"
    return conf(workdir, port, _LOG_FORMAT, _SYNC_PREFIX, http, locations)


class Front(CountedServer):
    """One running nginx; see the module docstring."""

    sync_prefix = _SYNC_PREFIX

    def __init__(self, workdir: Path, locations: str) -> None:
        super().__init__(workdir, lambda port: _conf(workdir, port, locations))
        self.url = ""

    def start(self) -> Front:
        self._start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _name(self, entry: dict) -> str | None:
        return urllib.parse.unquote(entry["uri"]).lstrip("/")


def start_forward_proxy(workdir: Path) -> Front:
    workdir.mkdir(parents=True, exist_ok=True)
    return Front(workdir, _FORWARD).start()


def start_redirector(workdir: Path, target_base: str) -> Front:
    workdir.mkdir(parents=True, exist_ok=True)
    target = target_base.rstrip("/")
    return Front(workdir, f"        location / {{ return 302 {target}$request_uri; }}\n").start()
