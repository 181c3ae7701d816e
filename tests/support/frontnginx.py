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

import http.client
import json
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

NGINX = "/usr/sbin/nginx"
_SYNC_PREFIX = "/.front-sync/"
_TIMEOUT = 10.0
_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

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
    # As in origin.py: no master process, so no privilege drop and one process to reason about.
    temps = "\n".join(f"    {k}_temp_path {workdir / ('tmp_' + k)};" for k in _TEMPS)
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
events {{ worker_connections 512; }}
http {{
    log_format front escape=json {_LOG_FORMAT};
    access_log {workdir / "access.log"} front;
{temps}
    keepalive_timeout 60s;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location ^~ {_SYNC_PREFIX} {{ return 204; }}
{locations}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Front:
    """One running nginx; see the module docstring."""

    def __init__(self, workdir: Path, locations: str) -> None:
        self.workdir = workdir
        self._locations = locations
        self._access_log = workdir / "access.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._skip = 0
        self.port = 0
        self.url = ""

    def start(self) -> Front:
        for k in _TEMPS:
            (self.workdir / f"tmp_{k}").mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another process may take the free port first
            self.port = _free_port()
            if self._try_start():
                self.url = f"http://127.0.0.1:{self.port}"
                return self
        pytest.fail(f"nginx would not start:\n{self._error_tail()}")

    def _try_start(self) -> bool:
        conf = self.workdir / "nginx.conf"
        conf.write_text(_conf(self.workdir, self.port, self._locations))
        err_log = self.workdir / "error.log"
        cmd = [NGINX, "-p", str(self.workdir), "-c", str(conf), "-e", str(err_log)]
        with open(self.workdir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in self._error_tail():
                    return False
                pytest.fail(f"nginx exited at start:\n{self._error_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.005)
        self.stop()
        pytest.fail(f"nginx did not listen within {_TIMEOUT}s:\n{self._error_tail()}")

    def _error_tail(self) -> str:
        text = ""
        for name in ("error.log", "stderr.log"):
            p = self.workdir / name
            if p.exists():
                text += p.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Front:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sync(self) -> None:
        token = uuid.uuid4().hex
        # http.client: no proxy settings from the environment apply to this request.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=_TIMEOUT)
        try:
            conn.request("GET", f"{_SYNC_PREFIX}{token}")
            conn.getresponse().read()
        finally:
            conn.close()
        needle = f"{_SYNC_PREFIX}{token}".encode()
        deadline = time.monotonic() + _TIMEOUT
        while needle not in self._access_log.read_bytes():
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not log sync request {token} within {_TIMEOUT}s")
            time.sleep(0.002)

    def _entries(self) -> list[dict]:
        self._sync()
        out = []
        for line in self._access_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["uri"].startswith(_SYNC_PREFIX):
                continue
            entry["name"] = urllib.parse.unquote(entry["uri"]).lstrip("/")
            out.append(entry)
        return out

    def log(self, name: str | None = None) -> list[dict]:
        entries = self._entries()[self._skip :]
        if name is None:
            return entries
        return [e for e in entries if e["name"] == name.lstrip("/")]

    def requests(self, name: str | None = None) -> int:
        return len(self.log(name))

    def reset_counts(self) -> None:
        self._skip = len(self._entries())


def start_forward_proxy(workdir: Path) -> Front:
    workdir.mkdir(parents=True, exist_ok=True)
    return Front(workdir, _FORWARD).start()


def start_redirector(workdir: Path, target_base: str) -> Front:
    workdir.mkdir(parents=True, exist_ok=True)
    target = target_base.rstrip("/")
    return Front(workdir, f"        location / {{ return 302 {target}$request_uri; }}\n").start()
