"""An HTTP/1.1 origin of our own whose misbehaviour each test programs, file by file.

Fixture
-------
``faulty_origin`` (function scope) -> ``FaultyOrigin``: a threaded server in the test process on
a free ``127.0.0.1`` port, serving named in-memory blobs. Stopped at teardown; stalls are woken
and open connections are shut, so teardown never waits for a sleeping handler or an idle
keep-alive client. Plain helper: ``start_faulty_origin() -> FaultyOrigin`` (``close()`` it, or
use it as a context manager).

When well behaved it answers ``GET``/``HEAD /<name>`` with ``200``, ``Content-Length``, a strong
``ETag`` and ``Accept-Ranges: bytes``; a single ``Range: bytes=a-b | a- | -n`` gets ``206`` with
``Content-Range`` (unsatisfiable: ``416``; several ranges or bad syntax: ignored, ``200``);
``If-Range`` with a different ETag gets ``200`` and the whole body. Unknown names get ``404``.

``FaultyOrigin`` API
--------------------
- ``base_url: str``; ``url(name) -> str``.
- ``add(name, data: bytes) -> str`` -- serve ``data`` at ``/<name>``; returns its URL.
- ``set_content(name, data) -> str`` -- replace the bytes now; the ETag changes; returns it.
- ``etag(name) -> str`` -- the current ETag (with its quotes).
- ``program(name, *script: Faults, then: Faults | None = None, **always)`` -- request *n* for
  ``name`` (counting from this call) is answered per ``script[n-1]``; once the script is used
  up, per ``then`` (default: behave). ``program(name, **kw)`` is short for
  ``program(name, then=Faults(**kw))``: misbehave on every request. Examples::

      program("a", Faults(status=503), Faults(status=429, retry_after="1"))  # then fine
      program("a", reset_after=4096)                                       # always reset
      program("a", Faults(), Faults(new_content=b"v2"))  # content changes on request 2

- ``requests(name=None) -> int`` -- requests received for ``name`` (or all), any outcome.
- ``bytes_sent(name=None) -> int`` -- bytes of file content written (or being written) to the
  socket for ``name`` (or all): no headers, no chunk framing, no error pages. Each piece is
  counted just before it is written, so the count is exact as soon as a client has the bytes;
  if the client hangs up mid-write, that piece still counts.
- ``log(name=None) -> list[dict]`` -- one dict per request, oldest first: ``seq``, ``name``,
  ``method``, ``range``, ``if_range`` (header values or ``None``), ``status``, ``body_bytes``,
  ``faults`` (the ``Faults`` applied) and ``state``: ``"started"``, ``"sending"``, ``"paused"``
  (in a stall or throttle pause), ``"done"``, ``"reset"`` or ``"client gone"``.
  ``body_bytes`` grows while a response is being sent.
- ``wait_state(name, state, timeout=10) -> dict`` -- poll until the latest request for
  ``name`` is in ``state`` (e.g. ``"paused"``: the server is provably stalling now); return its
  log entry. Fails the test at the deadline.
- ``close()`` -- stop the server (the fixture does it).
- ``random_faults(rate, seed, mix=RANDOM_MIX)`` -- from now on, each request that no script
  entry covers is, with probability ``rate``, answered per one ``Faults`` drawn from ``mix``
  instead of per ``then`` (one ``random.Random(seed)``, drawn under the server's lock, so a
  serial client sees the same faults in every run). ``rate=0`` turns it off. Such requests'
  log entries have ``"random": True`` (others ``False``); ``random_faulted(name=None) -> int``
  counts them. ``RANDOM_MIX`` is a few resets mid-body, 503s and short stalls.

``Faults`` (a frozen dataclass; all fields default to "behave"):

- ``status: int | None`` -- answer this status (e.g. 500, 503, 429) with a short text body.
- ``retry_after: str | None`` -- its ``Retry-After`` header.
- ``reset_after: int | None`` -- send this many body bytes, then reset the connection (RST via
  ``SO_LINGER`` 0). ``0``: headers only, then RST.
- ``stall: float``, ``stall_at: int`` -- pause ``stall`` seconds once ``stall_at`` body bytes are
  sent (``0``: right after the headers).
- ``stall_headers: float`` -- pause before sending anything at all.
- ``throttle: float``, ``piece: int`` -- send the body ``piece`` bytes at a time (default 1024),
  pausing ``throttle`` seconds between pieces.
- ``ignore_range: bool`` -- answer ``200`` with the whole body even to ``Range``.
- ``chunked: bool`` -- ``Transfer-Encoding: chunked``, no ``Content-Length``.
- ``flip: tuple[int, ...]`` -- file offsets whose byte is served inverted (``^ 0xFF``); length
  and ETag stay as they were, as with silent corruption.
- ``new_content: bytes | None`` -- replace the file (new ETag) just before answering.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Faults:
    """How to answer one request; the defaults behave. See the module docstring."""

    status: int | None = None
    retry_after: str | None = None
    reset_after: int | None = None
    stall: float = 0.0
    stall_at: int = 0
    stall_headers: float = 0.0
    throttle: float = 0.0
    piece: int = 1024
    ignore_range: bool = False
    chunked: bool = False
    flip: tuple[int, ...] = ()
    new_content: bytes | None = None


# The default mix of `random_faults`: resets at the start and mid-body, 503s (with and without
# Retry-After), short stalls before and inside the body. Each long enough to be seen, none longer
# than a client's usual read timeout.
RANDOM_MIX: tuple[Faults, ...] = (
    Faults(reset_after=0),
    Faults(reset_after=100_000),
    Faults(reset_after=1_000_000),
    Faults(status=503),
    Faults(status=503, retry_after="1"),
    Faults(stall_headers=2.0),
    Faults(stall=2.0, stall_at=200_000),
)


@dataclass
class _File:
    data: bytes = b""
    version: int = 0
    exists: bool = False
    script: deque[Faults] = field(default_factory=deque)
    then: Faults = field(default_factory=Faults)
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return f'"{hashlib.sha1(self.data).hexdigest()[:16]}-{self.version}"'

    def replace(self, data: bytes) -> None:
        self.data = data
        self.version += 1
        self.exists = True


class _Aborted(Exception):
    """Raised inside a handler when the response must stop (reset, shutdown, client gone)."""


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One ``(first, last)`` range, ``None`` to ignore the header, or ``"416"``."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    try:
        if not dash:
            return None
        if first_s == "":
            n = int(last_s)
            if n <= 0:
                return "416"
            return (max(0, size - n), size - 1)
        first = int(first_s)
        last = int(last_s) if last_s else max(first, size - 1)
    except ValueError:
        return None
    if first > last:
        return None  # syntactically invalid: ignore the header
    if first >= size:
        return "416"
    return (first, min(last, size - 1))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("faulty_origin: " + format, *args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        try:
            self._answer(head)
            self._set_state("done")
        except _Aborted:
            self.close_connection = True
        except OSError as exc:  # the client went away: normal in fault tests
            log.debug("faulty_origin: client gone: %s", exc)
            self._set_state("client gone")
            self.close_connection = True

    def _set_state(self, state: str) -> None:
        with self.server.lock:
            self._entry["state"] = state

    def _answer(self, head: bool) -> None:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        entry: dict[str, Any] = {
            "name": name,
            "method": self.command,
            "range": self.headers.get("Range"),
            "if_range": self.headers.get("If-Range"),
            "status": None,
            "body_bytes": 0,
            "state": "started",
            "random": False,
        }
        with self.server.lock:
            self.server.seq += 1
            entry["seq"] = self.server.seq
            f = self.server.files.setdefault(name, _File())
            drawn = None if f.script else self.server.draw()
            entry["random"] = drawn is not None
            faults = f.script.popleft() if f.script else drawn or f.then
            if faults.new_content is not None:
                f.replace(faults.new_content)
            entry["faults"] = faults
            f.log.append(entry)
            exists, data, etag = f.exists, f.data, f.etag
        self._entry = entry
        if faults.stall_headers:
            self._pause(faults.stall_headers)
        if not exists:
            return self._short(404, b"not found\n", {})
        if faults.status is not None:
            extra = {"Retry-After": faults.retry_after} if faults.retry_after else {}
            return self._short(faults.status, f"{faults.status} (programmed)\n".encode(), extra)
        rng = None if faults.ignore_range else _parse_range(self.headers.get("Range"), len(data))
        if_range = self.headers.get("If-Range")
        if rng is not None and if_range is not None and if_range.strip() != etag:
            rng = None
        if rng == "416":
            return self._short(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        first, last = rng if isinstance(rng, tuple) else (0, len(data) - 1)
        body = bytearray(data[first : last + 1])
        for off in faults.flip:
            if first <= off <= last:
                body[off - first] ^= 0xFF
        self._status(206 if isinstance(rng, tuple) else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if isinstance(rng, tuple):
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        if faults.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self._send_body(bytes(body), faults)

    def _status(self, code: int) -> None:
        self._entry["status"] = code
        self.send_response(code)

    def _short(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self._status(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_body(self, body: bytes, faults: Faults) -> None:
        piece = faults.piece if faults.throttle else _CHUNK
        stops = [b for b in (faults.reset_after, faults.stall_at if faults.stall else None) if b]
        sent = 0
        stalled = False
        while True:
            if faults.reset_after is not None and sent >= faults.reset_after:
                self._reset()
            if faults.stall and not stalled and sent >= faults.stall_at:
                stalled = True
                self._pause(faults.stall)
            if sent >= len(body):
                break
            n = min([piece, len(body) - sent] + [s - sent for s in stops if s > sent])
            chunk = body[sent : sent + n]
            # Counted before writing: a client that has the bytes must already see the count.
            with self.server.lock:
                self._entry["body_bytes"] += n
            if faults.chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (n, chunk))
            else:
                self.wfile.write(chunk)
            sent += n
            if faults.throttle and sent < len(body):
                self._pause(faults.throttle)
        if faults.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _pause(self, seconds: float) -> None:
        # Waiting on the server's stop event, not sleeping: shutdown wakes every stalled handler.
        self._set_state("paused")
        if self.server.stopping.wait(seconds):
            self._reset()
        self._set_state("sending")

    def _reset(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0, then really close (rfile holds a reference)."""
        self._set_state("reset")
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.rfile.close()
        raise _Aborted


class _Server(http.server.ThreadingHTTPServer):
    # Join handler threads on close: none may outlive the test that started it.
    daemon_threads = False
    block_on_close = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()  # guards files and their logs
        self.files: dict[str, _File] = {}
        self.stopping = threading.Event()
        self.active: set[socket.socket] = set()
        self.seq = 0  # orders log entries across files
        self.rate = 0.0  # random_faults: the share of requests answered per a drawn fault
        self.mix: tuple[Faults, ...] = RANDOM_MIX
        self.rng = random.Random(0)

    def draw(self) -> Faults | None:
        """A fault drawn for the next unscripted request, or None (call with the lock held)."""
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        return self.rng.choice(self.mix)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Recorded here, in the serving thread, so close() sees every accepted connection.
        with self.lock:
            self.active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.active.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("faulty_origin: error serving %s", client_address, exc_info=True)


class FaultyOrigin:
    """A running fault-injecting server; see the module docstring."""

    def __init__(self) -> None:
        self._server = _Server()
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faulty"
        )
        self._thread.start()
        self._closed = False

    def url(self, name: str) -> str:
        return f"{self.base_url}/{urllib.parse.quote(name.lstrip('/'))}"

    def _file(self, name: str) -> _File:
        return self._server.files.setdefault(name.lstrip("/"), _File())

    def add(self, name: str, data: bytes) -> str:
        with self._server.lock:
            self._file(name).replace(bytes(data))
        return self.url(name)

    def set_content(self, name: str, data: bytes) -> str:
        with self._server.lock:
            f = self._file(name)
            f.replace(bytes(data))
            return f.etag

    def etag(self, name: str) -> str:
        with self._server.lock:
            return self._file(name).etag

    def program(
        self, name: str, *script: Faults, then: Faults | None = None, **always: Any
    ) -> None:
        if always and then is not None:
            raise TypeError("give either then= or fault keywords, not both")
        with self._server.lock:
            f = self._file(name)
            f.script = deque(script)
            f.then = Faults(**always) if always else (then or Faults())

    def random_faults(self, rate: float, seed: int, mix: tuple[Faults, ...] = RANDOM_MIX) -> None:
        """Answer a share `rate` of unscripted requests per faults drawn from `mix`."""
        if not 0 <= rate <= 1 or not mix:
            raise ValueError("rate must be within [0, 1] and mix must not be empty")
        with self._server.lock:
            self._server.rate = rate
            self._server.mix = tuple(mix)
            self._server.rng = random.Random(seed)

    def random_faulted(self, name: str | None = None) -> int:
        """How many requests (for `name`, or all) were answered per a randomly drawn fault."""
        return sum(1 for e in self.log(name) if e["random"])

    def log(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._server.lock:
            if name is not None:
                return [dict(e) for e in self._file(name).log]
            entries = [e for f in self._server.files.values() for e in f.log]
            return [dict(e) for e in sorted(entries, key=lambda e: e["seq"])]

    def wait_state(self, name: str, state: str, timeout: float = 10) -> dict[str, Any]:
        """Poll until the latest request for ``name`` is in ``state``; return its entry."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.log(name)
            if entries and entries[-1]["state"] == state:
                return entries[-1]
            if time.monotonic() > deadline:
                last = entries[-1]["state"] if entries else "no request yet"
                pytest.fail(f"faulty_origin: {name!r} not {state!r} within {timeout}s ({last})")
            time.sleep(0.005)

    def requests(self, name: str | None = None) -> int:
        return len(self.log(name))

    def bytes_sent(self, name: str | None = None) -> int:
        return sum(e["body_bytes"] for e in self.log(name))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        server = self._server
        server.stopping.set()
        server.shutdown()  # the accept loop has stopped when this returns
        with server.lock:
            conns = list(server.active)
        for conn in conns:
            # Wakes handlers blocked reading the next request of an idle keep-alive connection.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> FaultyOrigin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_faulty_origin() -> FaultyOrigin:
    """Start a server; the caller must ``close()`` it."""
    return FaultyOrigin()


@pytest.fixture
def faulty_origin() -> Iterator[FaultyOrigin]:
    with FaultyOrigin() as server:
        yield server
