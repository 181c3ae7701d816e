"""A TCP proxy of our own that breaks the first K connections after N bytes of response.

It knows no HTTP: it passes bytes both ways between each client connection and a fresh
connection to the upstream (a real nginx, say), so what the client sees is exactly what a
broken network or a crashing load balancer does to a real server's answers.

Plain helper: ``start_reset_proxy(upstream_port, after=N, first=K, how="reset") -> ResetProxy``
(call ``.close()``, or use it as a context manager).

- The first ``first`` connections (counting from start or from ``program``) to reach ``after``
  bytes of response are cut there (headers included; ``0``: as soon as the upstream starts
  answering, before the client has a byte). A connection that ends short of ``after`` bytes,
  say one that only fetched the rest of a cut range, is not cut and does not use up one of
  the ``first``: so a test that programs K cuts sees exactly K whenever the traffic allows,
  whatever order the client's connections run in.
- ``how="reset"`` cuts with an RST (``SO_LINGER`` 0, then close): the client's next read fails
  with ECONNRESET. ``how="close"`` cuts with a FIN: the client sees a body that just ends
  (a truncated response). Either way the upstream connection is closed too.
  ``how="stall"`` stops passing bytes and keeps the client's connection open, silent, until the
  client gives up (or ``close``): a peer gone without an RST reaching us. This is also what
  the naive proxy (one thread per direction, ``close()`` while the other thread is blocked in
  ``recv()``) does by accident: the kernel keeps such a socket open, so its RST is never sent.
- Every other connection passes everything.

``ResetProxy`` API
------------------
- ``url(path) -> str`` -- ``http://127.0.0.1:PORT`` + path; ``port``.
- ``program(after, first, how="reset")`` -- a new rule, for connections accepted from now
  (those already open pass everything).
- ``connections() -> int`` -- connections accepted since start (or ``program``).
- ``cuts() -> int`` -- connections cut by the rule.
- ``upstream_bytes() -> int`` -- response bytes received from the upstream (all connections,
  since start): what the origin sent through us. ``client_bytes()``: what the clients got.
- ``request_bytes() -> int`` -- request bytes passed on to the upstream (all connections, since
  start; headers included): what the clients sent, say an upload, as far as the upstream has it.
- ``on_request: Callable[[int], None] | None`` -- if set, called with ``request_bytes()`` after
  each piece of a request has been passed on, on that connection's thread and before it
  passes anything more: a test can look at the world while the upstream has had exactly that
  many bytes (and the client waits).
- ``wait_idle(timeout=10)`` -- wait until no connection is open (nothing in flight).
- ``close()`` -- stop accepting and shut every open connection.

Counts are exact once the client has its answer: a byte is counted before it is passed on,
and a connection is counted when accepted.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Literal, Self

_PIECE = 256 * 1024
How = Literal["reset", "close", "stall"]


class ResetProxy:
    """One listening proxy; see the module docstring."""

    def __init__(self, upstream_port: int, after: int, first: int, how: How = "reset") -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._up_bytes = 0
        self._client_bytes = 0
        self._request_bytes = 0
        self.on_request: Callable[[int], None] | None = None
        self._closed = False
        self._rule = 0  # which `program` call is in force: a connection keeps the one it met
        self.program(after, first, how)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def program(self, after: int, first: int, how: How = "reset") -> None:
        with self._lock:
            self._after, self._first, self._how = after, first, how
            self._rule += 1
            self._accepted = 0
            self._cuts = 0

    def connections(self) -> int:
        with self._lock:
            return self._accepted

    def cuts(self) -> int:
        with self._lock:
            return self._cuts

    def upstream_bytes(self) -> int:
        with self._lock:
            return self._up_bytes

    def client_bytes(self) -> int:
        with self._lock:
            return self._client_bytes

    def request_bytes(self) -> int:
        with self._lock:
            return self._request_bytes

    def wait_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._open:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy still has {len(self._open)} open sockets")
            time.sleep(0.01)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._open)
        _shut(self._listener)  # shutdown wakes the accept(); a bare close() would not
        for s in socks:
            _shut(s)
        self._thread.join(timeout=5)

    # -- the work --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._accepted += 1
                rule = self._rule
                limit = self._after if self._cuts < self._first else None
                how = self._how
                self._open.add(client)
            args = (client, limit, how, rule)
            threading.Thread(target=self._serve, args=args, daemon=True).start()

    def _take_cut(self, rule: int) -> bool:
        """Whether a connection that has reached its rule's `after` bytes is cut: only while that
        rule is in force and has cuts left (the decision is made here, not at accept, so that
        connections that end short do not use cuts up)."""
        with self._lock:
            if rule != self._rule or self._cuts >= self._first:
                return False
            self._cuts += 1
            return True

    def _serve(self, client: socket.socket, limit: int | None, how: How, rule: int) -> None:
        # One thread and select(), not a thread per direction: a socket closed while another
        # thread is blocked in recv() on it stays open in the kernel until that recv returns,
        # so no RST would be sent and the client would wait instead of seeing the cut.
        try:
            upstream = socket.create_connection(self._upstream, timeout=10)
        except OSError:
            self._forget(client)
            _cut(client, "reset")
            return
        with self._lock:
            self._open.add(upstream)
        passed = 0
        ends = {client: False, upstream: False}  # whether each side sent its FIN
        try:
            while not all(ends.values()):
                ready, _, _ = select.select([s for s, done in ends.items() if not done], [], [])
                if client in ready:
                    data = client.recv(_PIECE)
                    if data:
                        upstream.sendall(data)
                        self._passed_request(len(data))
                    else:
                        ends[client] = True
                        upstream.shutdown(socket.SHUT_WR)
                if upstream in ready:
                    data = upstream.recv(_PIECE)
                    if not data:
                        ends[upstream] = True
                        client.shutdown(socket.SHUT_WR)  # pass the upstream's FIN on
                        continue
                    with self._lock:
                        self._up_bytes += len(data)
                    if limit is not None and passed + len(data) >= limit and self._take_cut(rule):
                        data = data[: limit - passed]
                        client.sendall(data)
                        with self._lock:
                            self._client_bytes += len(data)
                        if how == "stall":
                            _shut(upstream)
                            _wait_gone(client)
                        else:
                            _cut(client, how)
                        return
                    client.sendall(data)
                    passed += len(data)
                    with self._lock:
                        self._client_bytes += len(data)
        except (OSError, ValueError):  # ValueError: `close` closed a socket under select
            pass
        finally:
            self._forget(client, upstream)
            _shut(upstream)
            _shut(client)

    def _passed_request(self, n: int) -> None:
        with self._lock:
            self._request_bytes += n
            total = self._request_bytes
        watcher = self.on_request
        if watcher is not None:
            watcher(total)  # outside the lock: it may ask this proxy for its counts

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)


def _wait_gone(sock: socket.socket) -> None:
    """Hold `sock` open and silent until its peer closes it (or `close` shuts it)."""
    try:
        while sock.recv(_PIECE):
            pass
    except OSError:
        pass


def _cut(sock: socket.socket, how: How) -> None:
    try:
        if how == "reset":
            # Linger on, timeout 0: close() discards what is unsent and sends an RST.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def start_reset_proxy(upstream_port: int, after: int, first: int, how: How = "reset") -> ResetProxy:
    return ResetProxy(upstream_port, after, first, how)
