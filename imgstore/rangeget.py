"""A blocking ranged GET that reads the body straight into the caller's buffer.

This is the cold-read fast path, run in worker threads (`Origin.fetch_range` chooses it for
plain fetches of trusted URLs). `readinto` takes the bytes from the socket into the chunk
buffer with one copy, off the trio thread, where httpx would hand them over in pieces that h11
has copied twice and the fetcher would copy again. Connections are kept alive and reused, one
pool per (scheme, host, port) and proxy.

This module only moves bytes: what the answer means (status, ETag, Content-Range) is decided
by `origin.check_answer`, the same rules the httpx transport follows. What this path does not
handle (a redirect) is handed back to httpx with `Redirected`. No policy checks happen here:
untrusted URLs never take this path.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import socket
import threading
import urllib.request
from urllib.parse import urlsplit

from imgstore import tls
from imgstore.errors import OriginRetry
from imgstore.origin import check_answer, check_complete, describe, overrun, range_headers

USER_AGENT = "imgstore"
_REDIRECTS = (301, 302, 303, 307, 308)
_IDLE_PER_POOL = 16
# The most one readinto asks for. A buffered reader fills a large request with several socket
# reads, and a reset in the middle loses all of them (the exception carries no count): pieces
# keep what arrived before a reset, so the retry resumes after it.
_PIECE = 256 * 1024


# What a kept-alive connection that the server has closed meanwhile fails with, before any
# answer: the request never reached the origin's logic.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class Redirected(Exception):
    """Raised when the origin answered with a redirect, which this transport leaves to httpx;
    nothing of the body was received."""


@dataclasses.dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # the request target: origin-form, or absolute-form through a proxy
    proxy: tuple[str, int] | None

    @property
    def key(self) -> tuple[object, ...]:
        """Connections are pooled per origin and proxy."""
        return (self.scheme, self.host, self.port, self.proxy)


def proxy_for(url: str, configured: str | None) -> str | None:
    """The proxy URL for `url`: the configured one, else `http_proxy`/`https_proxy` (and
    `no_proxy`) from the environment, as curl and httpx read them; None for a direct fetch."""
    scheme = urlsplit(url).scheme.lower()
    if configured:
        return configured
    proxies = urllib.request.getproxies()
    host = urlsplit(url).hostname or ""
    if scheme in proxies and not urllib.request.proxy_bypass(host):
        return proxies[scheme]
    return None


class RangeGetter:
    """Ranged GETs into buffers, over kept-alive connections; safe to call from many threads."""

    def __init__(
        self, connect_timeout: float, read_timeout: float, proxy: str | None = None
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.proxy = proxy
        self._idle: dict[tuple[object, ...], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl = tls.system_default()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for pool in pools:
            for conn in pool:
                conn.close()

    def get_into(self, url: str, etag: str | None, start: int, size: int, buf: memoryview) -> None:
        """Fill `buf` with bytes [start, start+len(buf)) of the blob at `url`.

        Raises what `origin.check_answer` raises (OriginRetry's `received` says how much of
        `buf` is filled), or Redirected.
        """
        end = start + len(buf)
        target = self._target(url)
        headers = {
            "Host": _host_header(target),
            **range_headers(start, end, etag),
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        conn, resp = self._ask(target, headers)
        reusable = False
        try:
            if resp.status in _REDIRECTS:
                raise Redirected(f"{url}: redirect {resp.status}")
            span = (start, end, size)
            ended = functools.partial(_ended, resp)
            check_answer(url, resp.status, resp.reason, resp.getheader, etag, span, ended)
            _read_body(url, resp, buf)
            reusable = not resp.will_close
        finally:
            if reusable:
                self._checkin(target, conn)
            else:
                # The answer's reader holds the socket open: closing only the connection
                # would leave its descriptor to the garbage collector.
                resp.close()
                conn.close()

    def _ask(
        self, target: _Target, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the GET and read the answer's head, on a kept-alive connection if one is idle.

        Raises OriginRetry when no answer came; the connection is closed then.
        """
        conn, reused = self._checkout(target)
        while True:
            try:
                conn.request("GET", target.path, headers=headers)
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if not reused or not isinstance(exc, _STALE):
                    raise OriginRetry(describe(exc)) from exc
                # A kept-alive connection the server closed while it was idle: not a
                # failure of the origin, so ask again at once on a new one.
                conn, reused = self._checkout(target, fresh=True)

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        proxy_url = proxy_for(url, self.proxy)
        proxy = None
        if proxy_url:
            p = urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
            proxy = (p.hostname or "", p.port or 80)
            if scheme == "http":
                path = url.split("#", 1)[0]  # absolute-form, as a proxy expects
        return _Target(scheme, parts.hostname or "", port, path, proxy)

    def _checkout(self, t: _Target, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to `t` and whether it was kept alive from an earlier request."""
        with self._lock:
            pool = self._idle.get(t.key)
            if pool and not fresh:
                return pool.pop(), True
        timeout = self.connect_timeout
        host, port = t.proxy or (t.host, t.port)
        conn: http.client.HTTPConnection
        if t.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
            if t.proxy:
                conn.set_tunnel(t.host, t.port)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise OriginRetry(describe(exc)) from exc
        if conn.sock is not None:
            conn.sock.settimeout(self.read_timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def _checkin(self, t: _Target, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            pool = self._idle.setdefault(t.key, [])
            if len(pool) < _IDLE_PER_POOL:
                pool.append(conn)
                return
        conn.close()


def _read_body(url: str, resp: http.client.HTTPResponse, buf: memoryview) -> None:
    """Read the answer's body into `buf`, which it must fill exactly."""
    received = 0
    try:
        while received < len(buf):
            n = resp.readinto(buf[received : received + _PIECE])
            if not n:
                break
            received += n
        if received == len(buf) and resp.read(1):
            raise overrun(url)
    except (OSError, http.client.HTTPException) as exc:
        raise OriginRetry(describe(exc), received) from exc
    check_complete(received, len(buf))


def _ended(resp: http.client.HTTPResponse) -> bool:
    """Whether the answer has nothing after its headers (the connection ended there)."""
    try:
        return resp.fp is None or not resp.fp.peek(1)
    except (OSError, ValueError):
        return True


def _host_header(t: _Target) -> str:
    default = 443 if t.scheme == "https" else 80
    return t.host if t.port == default else f"{t.host}:{t.port}"
