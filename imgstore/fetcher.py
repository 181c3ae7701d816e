"""Origin HTTP: probing a URL, fetching one byte range, or streaming a whole body.

`Origin` holds one `httpx.AsyncClient` (so a proxy setting has one place to go; `trust_env`
already honours `http_proxy`) and hands trusted URLs' chunks to the thread transport
(`rangeget.py`). Both transports only move bytes; `origin.py` decides what each answer means.
Here are the retries: OriginRetry (transport errors, 5xx, 429, short bodies) is retried with
jittered exponential backoff, resuming after the bytes that landed; other errors move on to the
next mirror, except OriginChanged and RangeNotSupported, which end the fetch. Callers bound the
total time with a trio deadline.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit

import httpcore
import httpx
import trio

from imgstore import tls
from imgstore.buffers import BufferPool, ChunkBuffer
from imgstore.catalog import Url
from imgstore.errors import BadUrl, OriginChanged, OriginError, OriginRetry, RangeNotSupported
from imgstore.netpolicy import NetPolicy, guarded_client
from imgstore.origin import (
    Probe,
    check_answer,
    check_complete,
    content_length,
    describe,
    overrun,
    parse_content_range,
    probe_answer,
    probe_head,
    range_headers,
)
from imgstore.rangeget import RangeGetter, Redirected

__all__ = ["Origin", "Probe", "RangeNotSupported", "check_url", "parse_content_range"]

log = logging.getLogger(__name__)

_READ_PIECE = 1024 * 1024
# httpcore receives bodies in 64 KiB socket reads, each a trip through the trio scheduler and
# h11: the largest cost on the trio thread during a cold read. One read may take up to 1 MiB
# (a class attribute meant as a knob; it changes nothing on the wire).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
# Attempts that brought bytes do not use up `retries`, but there are at most this many times
# `retries` attempts in all, per URL.
PROGRESS_FACTOR = 4


def check_url(url: str) -> str:
    """Return the URL trimmed, or raise BadUrl if it is not an absolute http(s) URL."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise BadUrl(f"not an http(s) URL: {url!r}")
    if not parts.hostname:
        raise BadUrl(f"URL has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        # Not sent on ranged reads, and shown to every reader in `ls` and user.imgstore.url.
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise BadUrl(f"URL must not carry credentials (user:password@): {shown}")
    return url


def backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1-based): exponential, jittered, capped."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


class _Attempts:
    """The retry budget of one request on one URL.

    `retries` attempts in a row that brought nothing end it. An attempt that brought bytes
    (a body cut after a few MiB) starts that count again: a link that breaks every few MiB
    still gets the range, since each retry resumes where the last one stopped. In all, at
    most `retries * PROGRESS_FACTOR` attempts.
    """

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.idle = 0
        self.total = 0

    def failed(self, progressed: bool) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        self.total += 1
        self.idle = 0 if progressed else self.idle + 1
        if self.idle >= self.retries or self.total >= self.retries * PROGRESS_FACTOR:
            return None
        return backoff(max(self.idle, 1))


class Origin:
    """The HTTP client for every origin; one per process."""

    def __init__(
        self,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        retries: int = 4,
        policy: NetPolicy | None = None,
        proxy: str | None = None,
        pool: BufferPool | None = None,
    ):
        self.retries = retries
        self.pool = pool
        self.client = httpx.AsyncClient(
            # The configured proxy, else http_proxy & co. from the environment (trust_env).
            proxy=proxy or None,
            verify=tls.httpx_default(),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            follow_redirects=True,
            trust_env=True,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            # Ranges of encoded bodies would be ranges of the encoding: ask for the bytes.
            headers={"Accept-Encoding": "identity", "User-Agent": "imgstore"},
        )
        # URLs from remote users connect only where the policy allows (imgstore/netpolicy.py).
        self.guarded = guarded_client(policy or NetPolicy(), self.client, proxy or None)
        self.untrusted: set[str] = set()
        # Trusted URLs' chunks take the thread path (imgstore/rangeget.py): a body lands in
        # its chunk buffer with one copy, and the trio thread stays free for FUSE requests.
        self.getter = RangeGetter(connect_timeout, read_timeout, proxy or None)
        self.getter_threads = trio.CapacityLimiter(32)

    def distrust(self, urls: Iterable[str]) -> None:
        """Fetch these URLs through the guarded client from now on (any untrusted use wins)."""
        self.untrusted.update(urls)

    def _client(self, url: str) -> httpx.AsyncClient:
        return self.guarded if url in self.untrusted else self.client

    async def aclose(self) -> None:
        self.getter.close()
        await self.client.aclose()
        await self.guarded.aclose()

    async def probe(self, url: str) -> Probe:
        """Learn a URL's exact size, its ETag and whether Range works.

        A HEAD first: an origin that says it ignores Range is known from it (see
        `_probe_head`). Else a real ranged GET of byte 0 (206 + Content-Range); else the 200's
        or HEAD's Content-Length; else (a chunked server ignoring Range) the body is counted
        once.
        """
        url = check_url(url)
        # A 5xx, a 429 or a broken connection is retried as a chunk fetch is: one busy moment
        # of the origin must not fail a whole registration.
        attempts = _Attempts(self.retries)
        while True:
            try:
                return await self._probe_once(url)
            except (OriginRetry, httpx.TransportError) as exc:
                reason = str(exc) if isinstance(exc, OriginRetry) else describe(exc)
                wait = attempts.failed(progressed=False)
                if wait is None:
                    raise OriginError(f"{url}: {reason}") from exc
                log.info("retrying the probe of %s: %s", url, reason)
                await trio.sleep(wait)

    async def _probe_once(self, url: str) -> Probe:
        """One probe (see `probe`); OriginRetry or a transport error when it may work next time."""
        try:
            client = self._client(url)
            known = await self._probe_head(client, url)
            if known is not None:
                return known
            async with client.stream("GET", url, headers={"Range": "bytes=0-0"}) as resp:
                etag = resp.headers.get("ETag")
                known = probe_answer(url, resp.status_code, resp.reason_phrase, resp.headers.get)
            if known is not None:
                return known
            # Chunked and no Range support: HEAD sometimes knows the length.
            head = await client.head(url)
            length = content_length(head.headers.get) if head.status_code == 200 else None
            if length is not None:
                return Probe(length, etag, False)
            return Probe(await self._count_body(client, url), etag, False)
        except httpx.TransportError:
            raise
        except httpx.HTTPError as exc:
            raise OriginError(f"{url}: {describe(exc)}") from exc

    async def _probe_head(self, client: httpx.AsyncClient, url: str) -> Probe | None:
        """The size from a HEAD whose answer says Range is not taken; None to ask by GET.

        Asked first because an origin that ignores Range answers the GET probe's one byte with
        the whole body until it notices we hung up (with nginx on loopback, several MiB: more
        than the 5 % of a blob such an origin may cost); see `origin.probe_head`.
        """
        try:
            head = await client.head(url)
        except httpx.HTTPError:
            return None  # the GET probe says what is wrong, in its own words
        known = probe_head(head.status_code, head.headers.get)
        if known is not None:
            log.info("%s does not take Range (its HEAD says so): it will be streamed whole", url)
        return known

    async def _count_body(self, client: httpx.AsyncClient, url: str) -> int:
        """The last resort for a size: no Range, no Content-Length, not even from HEAD.

        The original ImageProxy failed on such servers. Reading the body once is the only way
        to know its length; the bytes are discarded (the cache will fetch them when read).
        """
        log.warning("%s tells no size (no Range, no Content-Length): reading it to count", url)
        total = 0
        async with client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise OriginError(f"{url}: HTTP {resp.status_code} {resp.reason_phrase}")
            async for piece in resp.aiter_raw(_READ_PIECE):
                total += len(piece)
        return total

    async def fetch_range(
        self, urls: Sequence[Url], start: int, end: int, size: int
    ) -> ChunkBuffer:
        """Bytes [start, end) of the blob, trying each mirror with bounded retries.

        Each `Url` carries the ETag its mirror had when probed (and whether it is trusted, for
        connect-time address rules). Resumes after a broken body
        from the byte where it stopped. Raises OriginChanged, RangeNotSupported, or OriginError
        when every mirror failed.
        """
        buf = self.pool.take(end - start) if self.pool else bytearray(end - start)
        view = memoryview(buf)
        received = 0
        errors: list[str] = []
        self.distrust(u.url for u in urls if not u.trusted)
        for url, etag in ((u.url, u.etag) for u in urls):
            attempts = _Attempts(self.retries)
            while True:
                try:
                    received += await self._range_once(
                        url, etag, start + received, size, view[received:]
                    )
                    return buf
                except OriginRetry as exc:
                    received += exc.received
                    errors.append(f"{url}: {exc}")
                    log.info("retrying %s bytes %d-%d: %s", url, start, end - 1, exc)
                    wait = attempts.failed(progressed=exc.received > 0)
                    if wait is None:
                        break
                    await trio.sleep(wait)
                except OriginError as exc:
                    if isinstance(exc, RangeNotSupported | OriginChanged):
                        raise
                    errors.append(str(exc))
                    break
        raise OriginError(f"bytes {start}-{end - 1}: every URL failed; last: {errors[-1]}")

    async def _range_once(
        self, url: str, etag: str | None, start: int, size: int, view: memoryview
    ) -> int:
        """One GET of the bytes that fill `view`; returns how many landed (all, or raises)."""
        if url not in self.untrusted and url.lower().startswith(("http://", "https://")):
            try:
                # Abandoned on cancel (a read deadline): the thread owns `view`'s buffer until
                # its socket times out, and nobody else uses that buffer any more.
                await trio.to_thread.run_sync(
                    self.getter.get_into,
                    url,
                    etag,
                    start,
                    size,
                    view,
                    limiter=self.getter_threads,
                    abandon_on_cancel=True,
                )
                return len(view)
            except Redirected:
                pass  # httpx follows it
        return await self._httpx_range(url, etag, start, size, view)

    async def _httpx_range(
        self, url: str, etag: str | None, start: int, size: int, view: memoryview
    ) -> int:
        """One GET through httpx (untrusted URLs, redirects), filling `view` from the start."""
        end = start + len(view)
        received = 0
        headers = range_headers(start, end, etag)
        try:
            async with self._client(url).stream("GET", url, headers=headers) as resp:
                status, reason = resp.status_code, resp.reason_phrase
                check_answer(url, status, reason, resp.headers.get, etag, (start, end, size))
                # No chunk_size: pieces as they arrive, without httpx re-chunking (a copy).
                async for piece in resp.aiter_raw():
                    if received + len(piece) > len(view):
                        raise overrun(url)
                    view[received : received + len(piece)] = piece
                    received += len(piece)
        except httpx.HTTPError as exc:
            raise OriginRetry(describe(exc), received) from exc
        check_complete(received, len(view))
        return received

    async def stream_whole(
        self,
        urls: Sequence[Url],
        size: int,
        consume: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        """Stream the whole body once, handing `consume(offset, piece)` every piece in order.

        Used when the origin ignores Range. A broken body restarts from the beginning (the
        consumer skips what it already has), with the same retry budget as ranges.
        """
        errors: list[str] = []
        self.distrust(u.url for u in urls if not u.trusted)
        for url, etag in ((u.url, u.etag) for u in urls):
            attempts = _Attempts(self.retries)
            furthest = 0  # a restart that gets further than any before is progress
            while True:
                try:
                    await self._whole_once(url, etag, size, consume)
                    return
                except OriginRetry as exc:
                    errors.append(f"{url}: {exc}")
                    log.info("retrying whole body of %s: %s", url, exc)
                    wait = attempts.failed(progressed=exc.received > furthest)
                    furthest = max(furthest, exc.received)
                    if wait is None:
                        break
                    await trio.sleep(wait)
                except OriginError as exc:
                    if isinstance(exc, OriginChanged):
                        raise
                    errors.append(str(exc))
                    break
        raise OriginError(f"every URL failed; last: {errors[-1]}")

    async def _whole_once(
        self,
        url: str,
        etag: str | None,
        size: int,
        consume: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        """One GET of the whole body, handing it to `consume` piece by piece."""
        offset = 0
        try:
            async with self._client(url).stream("GET", url) as resp:
                check_answer(url, resp.status_code, resp.reason_phrase, resp.headers.get, etag)
                async for piece in _pieces(resp):
                    if offset + len(piece) > size:
                        raise overrun(url, size)
                    await consume(offset, piece)
                    offset += len(piece)
        except httpx.HTTPError as exc:
            raise OriginRetry(describe(exc), offset) from exc
        check_complete(offset, size)


async def _pieces(resp: httpx.Response) -> AsyncIterator[bytes]:
    async for piece in resp.aiter_raw(_READ_PIECE):
        yield piece
