"""What an origin's answer means: the HTTP rules both transports follow.

Two transports fetch from origins: httpx on the trio thread (`fetcher.py`: probes, untrusted
URLs, redirects, whole bodies) and blocking sockets in worker threads (`rangeget.py`: trusted
URLs' chunks). Both only move bytes; every decision about an answer is made here, once:

- a 5xx or a 429 is worth another attempt (OriginRetry), any other status but 200/206 is not;
- an ETag other than the one the blob was declared with means other content (OriginChanged);
  `If-Range` makes such an origin answer 200 instead of mixing old and new bytes;
- a 200 to a ranged request means the origin ignores Range (RangeNotSupported): the blob is
  streamed whole once instead;
- a 206 must name exactly the bytes asked for and the blob's size in its Content-Range;
- a body that stops short is worth another attempt from where it stopped, one that runs long
  is not.

Nothing here does I/O; headers are read through a `header(name)` callable so each transport
passes its own response's lookup.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from imgstore.errors import OriginChanged, OriginError, OriginRetry, RangeNotSupported

__all__ = [
    "Header",
    "Probe",
    "check_answer",
    "check_complete",
    "check_status",
    "describe",
    "overrun",
    "parse_content_range",
    "probe_answer",
    "probe_head",
    "range_headers",
    "strong_etag",
]

Header = Callable[[str], str | None]

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a probe learned: the exact size, the ETag, whether Range works."""

    size: int
    etag: str | None
    ranges: bool


def _never() -> bool:
    return False


def range_headers(start: int, end: int, etag: str | None) -> dict[str, str]:
    """The headers that ask for bytes [start, end) of the content that had `etag`."""
    headers = {"Range": f"bytes={start}-{end - 1}"}
    validator = strong_etag(etag)
    if validator:
        headers["If-Range"] = validator
    return headers


def check_answer(
    url: str,
    status: int,
    reason: str,
    header: Header,
    etag: str | None,
    span: tuple[int, int, int] | None = None,
    cut_in_headers: Callable[[], bool] = _never,
) -> None:
    """Return if the body of this answer to a GET of `url` may be used; else raise.

    `etag` is the one the blob was declared with (None: not known). `span` is (start, end,
    size) for a ranged GET of bytes [start, end) of a `size`-byte blob; None for the whole
    body, where a 200 or a 206 is taken as it comes. `cut_in_headers` tells whether the
    answer ended right after what was parsed as its headers: a parser that takes the end of
    the stream for the end of the headers (http.client) hands over an answer cut inside them,
    which lacks its Content-Range through no fault of the origin.

    Raises as `check_status`, then OriginChanged, RangeNotSupported, OriginRetry (headers cut
    short) or OriginError (a Content-Range that is not the one asked for).
    """
    check_status(url, status, reason)
    got = header("ETag")
    if etag and got and got != etag:
        raise OriginChanged(f"{url}: ETag changed from {etag} to {got}")
    if span is None:
        return
    if status == 200:
        raise RangeNotSupported(f"{url}: answered 200 to a Range request")
    start, end, size = span
    content_range = header("Content-Range")
    if parse_content_range(content_range) in ((start, end, size), (start, end, None)):
        return
    if cut_in_headers():
        raise OriginRetry(f"answer ended in its headers (Content-Range {content_range!r})")
    raise OriginError(
        f"{url}: asked bytes {start}-{end - 1}/{size}, got Content-Range {content_range!r}"
    )


def check_status(url: str, status: int, reason: str) -> None:
    """Raise unless `status` is 200 or 206: OriginRetry for a 5xx or a 429 (the origin is busy
    or failing for a moment), OriginError for the rest (the URL is wrong, or refused)."""
    if status >= 500 or status == 429:
        raise OriginRetry(f"HTTP {status}")
    if status not in (200, 206):
        raise OriginError(f"{url}: HTTP {status} {reason}")


def overrun(url: str, size: int | None = None) -> OriginError:
    """The error for a body longer than asked: than the range, or than a `size`-byte blob."""
    limit = "the range asked for" if size is None else f"{size} bytes"
    return OriginError(f"{url}: body longer than {limit}")


def check_complete(received: int, need: int) -> None:
    """Raise OriginRetry if a body ended after `received` of the `need` bytes it owed.

    The retry asks only for what is missing, so a link that breaks every few MiB still
    delivers.
    """
    if received < need:
        raise OriginRetry(f"body ended after {received} of {need} bytes", received)


def probe_answer(url: str, status: int, reason: str, header: Header) -> Probe | None:
    """What the answer to a `Range: bytes=0-0` GET says about the blob at `url`.

    None for a 200 without a Content-Length (chunked, and Range ignored): the size must be
    asked by HEAD, or counted. Raises as `check_status` for a status it cannot use, or
    OriginError for a 206 whose Content-Range names no total.
    """
    etag = header("ETag")
    if status == 416:
        return Probe(0, etag, True)  # an empty file has no byte 0
    check_status(url, status, reason)
    if status == 206:
        cr = parse_content_range(header("Content-Range"))
        if cr and cr[0] == 0 and cr[2] is not None:
            return Probe(cr[2], etag, True)
        raise OriginError(f"{url}: 206 without a usable Content-Range")
    length = content_length(header)
    return None if length is None else Probe(length, etag, False)


def probe_head(status: int, header: Header) -> Probe | None:
    """The blob's size from a HEAD that says the origin does not take Range; else None.

    An origin that ignores Range answers a GET of one byte with the whole body, and keeps
    sending until it notices the client hung up; its HEAD tells the same for nothing: a
    Content-Length and no `Accept-Ranges: bytes`. Any other answer (ranges advertised, HEAD
    refused, no length) is left to a ranged GET, which checks ranges for real.
    """
    length = content_length(header)
    if status != 200 or length is None:
        return None
    if "bytes" in (header("Accept-Ranges") or "").lower():
        return None
    return Probe(length, header("ETag"), False)


def content_length(header: Header) -> int | None:
    """The Content-Length, if the answer has a usable one."""
    length = header("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


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


def describe(exc: BaseException) -> str:
    """A transport failure in one line: the exception's type, then its text."""
    if isinstance(exc, TimeoutError):
        # A socket timeout's own text ("timed out") does not say which side went quiet.
        return "ReadTimeout: the origin sent nothing for too long"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
