"""A real nginx serving a temporary directory: the HTTP origin that tests fetch images from.

Fixtures
--------
``origin`` (function scope)
    A fresh nginx (Debian ``nginx-light``) for each test, serving its own empty directory on a
    free ``127.0.0.1`` port. Starting one takes a few milliseconds.
``origin_factory`` (function scope)
    ``origin_factory() -> Origin`` starts one more, e.g. for a mirror. All stop at teardown.

Plain helper: ``start_origin(workdir: Path, extra_http="") -> Origin`` (call ``.stop()``, or
use it as a context manager) for code outside pytest fixtures.

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

import logging
import os
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.nginxproc import CountedServer, conf

log = logging.getLogger(__name__)

_SYNC_PREFIX = "/.origin-sync/"
_STATUS = "/.origin-status"

# escape=json makes every variable safe inside a JSON string; numbers are left bare.
_LOG_FORMAT = (
    '\'{"uri":"$request_uri","method":"$request_method","status":$status,'
    '"body_bytes":$body_bytes_sent,"range":"$http_range","connection":$connection}\''
)


def _conf(workdir: Path, root: Path, port: int, extra_http: str = "") -> str:
    http = "\n".join(
        (
            "    default_type application/octet-stream;",
            "    sendfile on;",
            "    keepalive_timeout 60s;",
            *([f"    {extra_http}"] if extra_http else []),
        )
    )
    server = f"        root {root};\n        location = {_STATUS} {{ stub_status; }}"
    return conf(workdir, port, _LOG_FORMAT, _SYNC_PREFIX, http, server)


def _name_of(uri: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(uri).path).lstrip("/")


class Origin(CountedServer):
    """One running nginx; see the module docstring for the API."""

    sync_prefix = _SYNC_PREFIX

    def __init__(self, workdir: Path, extra_http: str = "") -> None:
        root = workdir / "root"
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, lambda port: _conf(workdir, root, port, extra_http))
        self.root = root
        self.base_url = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Origin:
        self._start()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log.debug("origin nginx on %s serving %s", self.base_url, self.root)
        return self

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

    def _name(self, entry: dict) -> str | None:
        return None if entry["uri"] == _STATUS else _name_of(entry["uri"])

    def bytes_sent(self, name: str | None = None) -> int:
        return sum(e["body_bytes"] for e in self.log(name))

    def in_flight(self) -> int:
        # stub_status: "Reading: R Writing: W Waiting: K"; W includes this status request.
        fields = self._nginx.get(_STATUS).decode().split()
        reading = int(fields[fields.index("Reading:") + 1])
        writing = int(fields[fields.index("Writing:") + 1])
        return reading + writing - 1

    def wait_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (n := self.in_flight()) > 0:
            if time.monotonic() > deadline:
                pytest.fail(f"origin still has {n} request(s) in flight after {timeout}s")
            time.sleep(0.005)


def start_origin(workdir: Path, extra_http: str = "") -> Origin:
    """Start nginx serving ``workdir / "root"``; its config and logs also live in ``workdir``.

    ``extra_http``: more directives for nginx's ``http`` block, e.g. ``"max_ranges 0;"`` for an
    origin that ignores ``Range``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    return Origin(workdir, extra_http).start()


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
