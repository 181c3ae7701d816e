"""A blocking ranged GET that reads the body straight into the caller's buffer.

This is the cold-read fast path, run in worker threads (`Origin.fetch_range` chooses it for
plain fetches of trusted URLs). httpx on the trio thread received each body in pieces that
h11 copied twice and that the fetcher copied again; here `readinto` takes the bytes from the
socket into the chunk buffer with one copy, off the trio thread. Connections are kept alive
and reused, one pool per (scheme, host, port) and proxy.

Everything the origin may answer is checked as in `fetcher.py` (same status rules, ETag and
Content-Range checks); what this path does not handle (a redirect) is handed back to httpx
with `Unhandled`. No policy checks happen here: untrusted URLs never take this path.
"""

from __future__ import annotations

import dataclasses
import http.client
import re
import socket
import ssl
import threading
import urllib.request
from urllib.parse import urlsplit

from imgstore.errors import OriginChanged, OriginError

USER_AGENT = "imgstore"
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_IDLE_PER_POOL = 16
# The most one readinto asks for. A buffered reader fills a large request with several socket
# reads, and a reset in the middle loses all of them (the exception carries no count): pieces
# keep what arrived before a reset, so the retry resumes after it.
_PIECE = 256 * 1024


# What a kept-alive connection that the server has closed meanwhile fails with, before any
# answer: the request never reached the origin's logic.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class Retry(Exception):
    """This attempt failed in a way worth retrying; `received` bytes landed before it did."""

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class Unhandled(Exception):
    """The answer needs the general client (a redirect): nothing was received."""


class NoRange(OriginError):
    """The origin answered the ranged request with the whole body (a 200)."""


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
        self._ssl = ssl.create_default_context()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for pool in pools:
            for conn in pool:
                conn.close()

    def get_into(self, url: str, etag: str | None, start: int, size: int, buf: memoryview) -> None:
        """Fill `buf` with bytes [start, start+len(buf)) of the blob at `url`.

        Raises Retry (transport errors, 5xx, 429, short bodies: `received` says how much of
        `buf` is filled), OriginChanged, NoRange, OriginError, or Unhandled.
        """
        end = start + len(buf)
        target = self._target(url)
        conn, reused = self._checkout(target)
        resp: http.client.HTTPResponse | None = None
        reusable = False
        received = 0
        try:
            headers = {
                "Host": _host_header(target),
                "Range": f"bytes={start}-{end - 1}",
                "Accept-Encoding": "identity",
                "User-Agent": USER_AGENT,
            }
            if strong_etag(etag):
                headers["If-Range"] = etag  # type: ignore[assignment]
            while True:
                try:
                    conn.request("GET", target.path, headers=headers)
                    resp = conn.getresponse()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    if not reused or not isinstance(exc, _STALE):
                        raise Retry(_describe(exc)) from exc
                    # A kept-alive connection the server closed while it was idle: not a
                    # failure of the origin, so ask again at once on a new one.
                    conn.close()
                    conn, reused = self._checkout(target, fresh=True)
            status = resp.status
            if status in (301, 302, 303, 307, 308):
                raise Unhandled(f"{url}: redirect {status}")
            if status >= 500 or status == 429:
                raise Retry(f"HTTP {status}")
            got = resp.getheader("ETag")
            if status not in (200, 206):
                raise OriginError(f"{url}: HTTP {status} {resp.reason}")
            if etag and got and got != etag:
                raise OriginChanged(f"{url}: ETag changed from {etag} to {got}")
            if status == 200:
                raise NoRange(f"{url}: answered 200 to a Range request")
            content_range = resp.getheader("Content-Range")
            if parse_content_range(content_range) not in ((start, end, size), (start, end, None)):
                if _ended(resp):
                    # http.client takes the end of the stream for the end of the headers: an
                    # answer cut inside them lacks what came after the cut.
                    raise Retry(f"answer ended in its headers (Content-Range {content_range!r})")
                raise OriginError(
                    f"{url}: asked bytes {start}-{end - 1}/{size}, got "
                    f"Content-Range {content_range!r}"
                )
            try:
                while received < len(buf):
                    n = resp.readinto(buf[received : received + _PIECE])
                    if not n:
                        break
                    received += n
                if received == len(buf) and resp.read(1):
                    raise OriginError(f"{url}: body longer than the range asked for")
            except (OSError, http.client.HTTPException) as exc:
                raise Retry(_describe(exc), received) from exc
            if received < len(buf):
                raise Retry(f"body ended after {received} of {len(buf)} bytes", received)
            reusable = not resp.will_close
        finally:
            if reusable:
                self._checkin(target, conn)
            else:
                if resp is not None:
                    # The answer's reader holds the socket open: closing only the connection
                    # would leave its descriptor to the garbage collector.
                    resp.close()
                conn.close()

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
            raise Retry(_describe(exc)) from exc
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


def _ended(resp: http.client.HTTPResponse) -> bool:
    """Whether the answer has nothing after its headers (the connection ended there)."""
    try:
        return resp.fp is None or not resp.fp.peek(1)
    except (OSError, ValueError):
        return True


def _host_header(t: _Target) -> str:
    default = 443 if t.scheme == "https" else 80
    return t.host if t.port == default else f"{t.host}:{t.port}"


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes a-b/total` -> (a, b+1, total or None); None if absent or malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)) + 1, total


def strong_etag(etag: str | None) -> str | None:
    """If-Range needs a strong validator; weak ETags (W/"…") are not used."""
    if etag and not etag.startswith("W/"):
        return etag
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "ReadTimeout: the origin sent nothing for too long"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
