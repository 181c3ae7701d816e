"""A real nginx serving a temporary directory: the HTTP origin that tests fetch images from.

Fixtures
--------
``origin`` (function scope)
    A fresh nginx (Debian ``nginx-light``) for each test, serving its own empty directory on a
    free ``127.0.0.1`` port. Starting one takes a few milliseconds.
``origin_factory`` (function scope)
    ``origin_factory() -> Origin`` starts one more, e.g. for a mirror. All stop at teardown.

Plain helper: ``start_origin(workdir: Path) -> Origin`` (call ``.stop()``, or use it as a
context manager) for code outside pytest fixtures.

``Origin`` API
--------------
- ``root: Path`` -- the served directory. A file at ``root / "a/b.img"`` is ``/a/b.img``.
- ``base_url: str`` -- ``"http://127.0.0.1:PORT"``.
- ``put(name, data: bytes | Path) -> str`` -- place a file (``name`` may contain ``/``) and
  return its URL. A ``Path`` is hard-linked when possible, else copied. ``put`` never writes
  into an existing inode (it renames a new file over the old one), so a hard-linked image from
  a shared cache is never modified; do not open files under ``root`` for writing yourself.
  Replacing a file always moves its mtime forward by at least one second, so nginx's ETag
  (``mtime-size``) changes even when the size does not.
- ``remove(name)`` -- delete a file (later requests answer 404).
- ``url(name) -> str`` -- the URL of ``name`` (percent-encoded).
- ``requests(name: str | None = None) -> int`` -- completed requests for ``name`` (any status,
  any method), or for all files.
- ``bytes_sent(name: str | None = None) -> int`` -- response *body* bytes nginx sent
  (``$body_bytes_sent``) for ``name`` or all files. A client that hangs up early counts only
  what nginx wrote before noticing.
- ``log(name: str | None = None) -> list[dict]`` -- parsed access-log entries, oldest first,
  each ``{"name", "uri", "method", "status", "body_bytes", "range", "connection"}``
  (``range`` is the request's ``Range`` header or ``""``).
- ``reset_counts()`` -- later ``requests``/``bytes_sent``/``log`` calls ignore what came before.
- ``in_flight() -> int`` -- requests nginx is still reading or answering (sync requests aside).
- ``wait_idle(timeout=10)`` -- poll until ``in_flight() == 0``; fail the test at the deadline.
- ``stop()`` -- stop nginx (the fixtures do this for you).

Counting is exact, not eventual: nginx writes an access-log line when it finalises a request,
which can be just after the client received the last byte. Every counting call therefore first
sends a request to a private sync location and waits (with a deadline) until that request's own
log line appears. nginx runs as one process handling events in order, so by then every request
that had finished before the call is in the log. Sync and status requests are not counted.

One case is not covered: a transfer the *client* abandoned (closed its socket, or its process
was killed) is logged only when nginx notices, on its next write. After aborting or killing a
reader, call ``wait_idle()`` before counting.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

NGINX = "/usr/sbin/nginx"
_SYNC_PREFIX = "/.origin-sync/"
_STATUS = "/.origin-status"
_START_TIMEOUT = 10.0
_SYNC_TIMEOUT = 10.0

# escape=json makes every variable safe inside a JSON string; numbers are left bare.
_LOG_FORMAT = (
    '\'{"uri":"$request_uri","method":"$request_method","status":$status,'
    '"body_bytes":$body_bytes_sent,"range":"$http_range","connection":$connection}\''
)


def _conf(workdir: Path, root: Path, port: int) -> str:
    # As root, nginx would hand requests to "nobody", who cannot read pytest's 0700 temp dirs;
    # with master_process off there is no worker and no privilege drop. One process also makes
    # the log ordering argument in the module docstring hold.
    temp = {k: workdir / f"tmp_{k}" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    temp_lines = "\n".join(f"    {k}_temp_path {p};" for k, p in temp.items())
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
events {{ worker_connections 512; }}
http {{
    log_format origin escape=json {_LOG_FORMAT};
    # No buffer= and no flush=: each line is written when its request is finalised.
    access_log {workdir / "access.log"} origin;
{temp_lines}
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ^~ {_SYNC_PREFIX} {{ return 204; }}
        location = {_STATUS} {{ stub_status; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name_of(uri: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(uri).path).lstrip("/")


class Origin:
    """One running nginx; see the module docstring for the API."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self._access_log = workdir / "access.log"
        self._error_log = workdir / "error.log"
        self._skip = 0  # number of counted entries hidden by reset_counts()
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.base_url = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Origin:
        # The port is picked before nginx binds it, so another process may win the race:
        # try a few ports before giving up.
        for _ in range(5):
            self.port = _free_port()
            if self._try_start():
                self.base_url = f"http://127.0.0.1:{self.port}"
                log.debug("origin nginx on %s serving %s", self.base_url, self.root)
                return self
        pytest.fail(f"nginx would not start; error log:\n{self._error_tail()}")

    def _try_start(self) -> bool:
        conf = self.workdir / "nginx.conf"
        conf.write_text(_conf(self.workdir, self.root, self.port))
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / f"tmp_{k}").mkdir(exist_ok=True)
        cmd = [NGINX, "-p", str(self.workdir), "-c", str(conf), "-e", str(self._error_log)]
        with open(self.workdir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in self._error_tail():
                    return False
                pytest.fail(f"nginx exited at start; error log:\n{self._error_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.005)
        self.stop()
        pytest.fail(f"nginx did not listen within {_START_TIMEOUT}s:\n{self._error_tail()}")

    def _error_tail(self) -> str:
        text = ""
        for p in (self._error_log, self.workdir / "stderr.log"):
            if p.exists():
                text += p.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"{self.base_url}/{urllib.parse.quote(name.lstrip('/'))}"

    def put(self, name: str, data: bytes | Path) -> str:
        dest = self.root / name.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        old_mtime = dest.stat().st_mtime if dest.exists() else None
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        if isinstance(data, Path):
            try:
                os.link(data, tmp)
            except OSError:
                shutil.copyfile(data, tmp)
        else:
            tmp.write_bytes(data)
        if old_mtime is not None:
            # nginx's ETag is "mtime-size" with one-second mtime: make a change visible.
            new = max(time.time(), old_mtime + 1)
            os.utime(tmp, (new, new))
        os.replace(tmp, dest)
        return self.url(name)

    def remove(self, name: str) -> None:
        (self.root / name.lstrip("/")).unlink()

    # -- counting --------------------------------------------------------------------------

    def _get(self, path: str) -> bytes:
        # http.client, not urllib: no proxy settings from the environment apply.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def _sync(self) -> None:
        if self._proc is None:
            raise RuntimeError("origin is not running")
        token = uuid.uuid4().hex
        self._get(f"{_SYNC_PREFIX}{token}")
        needle = f"{_SYNC_PREFIX}{token}".encode()
        deadline = time.monotonic() + _SYNC_TIMEOUT
        while needle not in self._access_log.read_bytes():
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not log sync request {token} within {_SYNC_TIMEOUT}s")
            time.sleep(0.002)

    def _entries(self) -> list[dict]:
        self._sync()
        out = []
        for line in self._access_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["uri"].startswith(_SYNC_PREFIX) or entry["uri"] == _STATUS:
                continue
            entry["name"] = _name_of(entry["uri"])
            out.append(entry)
        return out

    def log(self, name: str | None = None) -> list[dict]:
        entries = self._entries()[self._skip :]
        if name is None:
            return entries
        name = name.lstrip("/")
        return [e for e in entries if e["name"] == name]

    def requests(self, name: str | None = None) -> int:
        return len(self.log(name))

    def bytes_sent(self, name: str | None = None) -> int:
        return sum(e["body_bytes"] for e in self.log(name))

    def in_flight(self) -> int:
        # stub_status: "Reading: R Writing: W Waiting: K"; W includes this status request.
        fields = self._get(_STATUS).decode().split()
        reading = int(fields[fields.index("Reading:") + 1])
        writing = int(fields[fields.index("Writing:") + 1])
        return reading + writing - 1

    def wait_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (n := self.in_flight()) > 0:
            if time.monotonic() > deadline:
                pytest.fail(f"origin still has {n} request(s) in flight after {timeout}s")
            time.sleep(0.005)

    def reset_counts(self) -> None:
        self._skip = len(self._entries())


def start_origin(workdir: Path) -> Origin:
    """Start nginx serving ``workdir / "root"``; its config and logs also live in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Origin(workdir).start()


@pytest.fixture
def origin_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Origin]]:
    started: list[Origin] = []

    def make() -> Origin:
        o = start_origin(tmp_path_factory.mktemp("origin"))
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


@pytest.fixture
def origin(origin_factory: Callable[[], Origin]) -> Origin:
    return origin_factory()
