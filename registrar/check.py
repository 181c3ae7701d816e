"""`registrar check URL SIGNATURE`: would every site register this published image?

    result = check(url, signature, quick=False, progress=callback)
    result.ok, result.problems, result.parts   # one PartResult per image file

What a site does, done from here:

1. The URL and signature pass `metadata.check_url` / `check_signature` (InputError otherwise:
   the caller's usage mistake, not a finding).
2. The metadata is downloaded (at most MAX_METADATA_BYTES), its SHA-1 compared with SIGNATURE,
   and it is parsed with `metadata.parse`: the service's own rules.
3. For each image the metadata chose: one real ranged request (`Range: bytes=0-0`, expecting 206
   and a `Content-Range` with the size, as imgstore probes), which also tells whether it is
   reachable and its ETag; then, unless `quick`, a full download that checks the size and the
   SHA-1 and, for a filesystem or QCOW2, what the file holds (registrar/imagefile.py, with
   decompress.py's own detection): a compressed file declared FILESYSTEM, a raw one declared
   ZFILESYSTEM, a ZFILESYSTEM that does not decompress whole to a usable image. With `quick`,
   only the start of each filesystem is downloaded, to tell its type.

Findings are data, not exceptions: `problems` are what makes a site refuse the image (or, for a
server ignoring Range, what makes every site download it whole before reading any of it);
`notes` are worth knowing but refuse nothing (a loopback or private address, no ETag, an entry
the parser ignored).

Unlike the service, no address is refused here (an owner checks their own server first) and
nothing is cached: every run downloads afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import ipaddress
import logging
import re
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from registrar import imagefile
from registrar.errors import DecompressError, InputError, PublishError
from registrar.metadata import (
    FILESYSTEM,
    MAX_METADATA_BYTES,
    QCOW2,
    ZFILESYSTEM,
    ImageSet,
    Part,
    check_signature,
    check_url,
)
from registrar.metadata import parse as parse_metadata

log = logging.getLogger(__name__)

# (label, bytes done, bytes total or None) for a progress bar per download.
Progress = Callable[[str, int, int | None], None]

TIMEOUT = httpx.Timeout(30.0)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+0-0/(\d+)\s*$", re.IGNORECASE)
_INSPECTED = (FILESYSTEM, ZFILESYSTEM, QCOW2)
_ORDER = {FILESYSTEM: 0, ZFILESYSTEM: 0, "KERNEL": 1, "RAMDISK": 2, QCOW2: 3}
REACH_ADVICE = "a URL must work from every site's head node, not only from your own network"


@dataclasses.dataclass
class PartResult:
    """What was found about one image file the metadata lists."""

    type: str
    url: str
    sha1: str  # as the metadata declares it
    reachable: bool = False
    size: int | None = None
    ranges: bool | None = None
    etag: str | None = None
    sha1_ok: bool | None = None  # None: not downloaded (--quick, or it failed before)
    content: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CheckResult:
    """The metadata's findings and one PartResult per image."""

    url: str
    signature: str
    metadata_sha1: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    parts: list[PartResult] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every site would accept the image."""
        return not self.problems and not any(p.problems for p in self.parts)

    def all_problems(self) -> list[str]:
        return self.problems + [f"{p.type}: {msg}" for p in self.parts for msg in p.problems]


class _Failed(Exception):
    """A request failed; the message says how, for the report."""


def check(
    url: str, signature: str, *, quick: bool = False, progress: Progress | None = None
) -> CheckResult:
    """Check the image published at `url` with SHA-1 `signature`; InputError for bad arguments."""
    url = check_url(url, "metadata URL")
    sha1 = check_signature(signature, "metadata signature")
    result = CheckResult(url, sha1)
    result.notes.extend(_address_notes(url))
    # No address policy and no cache; Accept-Encoding identity: the SHA-1 covers the bytes as
    # stored, which a transparently gzipping server would otherwise change.
    with httpx.Client(
        timeout=TIMEOUT, follow_redirects=True, headers={"Accept-Encoding": "identity"}
    ) as client:
        images = _metadata(client, result)
        if images is None:
            return result
        for part in sorted(_parts(images), key=lambda p: _ORDER.get(p.type, 9)):
            for note in _address_notes(part.url):
                if note not in result.notes:
                    result.notes.append(note)
            result.parts.append(_check_part(client, part, quick, progress))
    return result


def _parts(images: ImageSet) -> list[Part]:
    """The parts the service registers (a QCOW2 among them)."""
    return images.parts()


def _metadata(client: httpx.Client, result: CheckResult) -> Any:
    """Download, compare and parse the metadata; None (with a problem) if that fails."""
    try:
        data = _download_small(client, result.url, MAX_METADATA_BYTES)
    except _Failed as exc:
        result.problems.append(f"metadata at {result.url}: {exc}")
        return None
    result.metadata_sha1 = hashlib.sha1(data).hexdigest()
    if result.metadata_sha1 != result.signature:
        result.problems.append(
            f"the metadata's SHA-1 is {result.metadata_sha1}, not {result.signature}: every site "
            "refuses it. Give ORCA the SHA-1 of the file as served (topology:hasGUID), or "
            "re-upload the file you hashed"
        )
    try:
        with imagefile.collect_notes() as notes:
            images = parse_metadata(data, result.url)
    except InputError as exc:
        result.problems.append(str(exc))
        return None
    finally:
        result.notes.extend(notes)
    return images


def _download_small(client: httpx.Client, url: str, limit: int) -> bytes:
    try:
        with client.stream("GET", url) as resp:
            _expect(resp, 200)
            data = bytearray()
            for chunk in resp.iter_raw():
                data += chunk
                if len(data) > limit:
                    raise _Failed(
                        f"more than {limit} bytes: not a metadata file (the registrar's limit)"
                    )
            return bytes(data)
    except httpx.HTTPError as exc:
        raise _Failed(_describe(exc)) from exc


def _check_part(
    client: httpx.Client, part: Part, quick: bool, progress: Progress | None
) -> PartResult:
    found = PartResult(part.type, part.url, part.sha1)
    try:
        _probe(client, found)
    except _Failed as exc:
        found.problems.append(str(exc))
        return found
    found.reachable = True
    if found.ranges is False:
        found.problems.append(
            "the server ignores Range requests (it answered 200 to `Range: bytes=0-0`): sites "
            "fetch images in ranges, so every site must download all of it before reading any "
            "and starts over after a broken transfer. Enable ranges (nginx: no `max_ranges 0`)"
        )
    if not found.etag:
        found.notes.append("no ETag: a site cannot tell if the file changes while it reads it")
    if found.size == 0:
        found.problems.append("the file is empty")
        return found
    inspect = part.type in _INSPECTED
    if quick and not inspect:
        return found
    try:
        with imagefile.collect_notes() as notes:
            if quick:
                _identify(client, found)
            else:
                _download(client, found, inspect, progress)
        found.notes.extend(notes)
    except _Failed as exc:
        found.problems.append(str(exc))
    return found


def _probe(client: httpx.Client, found: PartResult) -> None:
    """One ranged GET of byte 0: reachable, size, Range honoured, ETag."""
    try:
        with client.stream("GET", found.url, headers={"Range": "bytes=0-0"}) as resp:
            found.etag = resp.headers.get("ETag")
            if resp.status_code == 206:
                match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if match is None:
                    raise _Failed(
                        "answered 206 to `Range: bytes=0-0` without a usable Content-Range "
                        f"({resp.headers.get('Content-Range')!r})"
                    )
                found.size, found.ranges = int(match.group(1)), True
            elif resp.status_code == 416:
                found.size, found.ranges = 0, True  # an empty file has no byte 0
            else:
                _expect(resp, 200)
                length = resp.headers.get("Content-Length", "")
                found.size = int(length) if length.isdigit() else None
                found.ranges = False
    except httpx.HTTPError as exc:
        raise _Failed(_describe(exc)) from exc


def _download(
    client: httpx.Client, found: PartResult, inspect: bool, progress: Progress | None
) -> None:
    """The whole file: size, SHA-1 and, with `inspect`, its content."""
    report = None
    if progress is not None:
        done = [0]

        def report(n: int) -> None:
            done[0] += n
            progress(f"{found.type} {found.url.rsplit('/', 1)[-1]}", done[0], found.size)

    try:
        with client.stream("GET", found.url) as resp:
            _expect(resp, 200)
            examined = imagefile.examine(_Body(resp), inspect=inspect, progress=report)
    except httpx.HTTPError as exc:
        raise _Failed(f"download failed: {_describe(exc)}") from exc
    found.content = examined.describe()
    if found.size is not None and examined.size != found.size:
        found.problems.append(
            f"the download gave {examined.size} bytes, the server announced {found.size}"
        )
    found.size = examined.size
    found.sha1_ok = examined.sha1 == found.sha1
    if not found.sha1_ok:
        found.problems.append(
            f"the file's SHA-1 is {examined.sha1}, the metadata says {found.sha1}: every site "
            "refuses it (re-run `registrar publish`, or re-upload the file you hashed)"
        )
    if examined.problem is not None:
        found.problems.append(examined.problem)
    elif examined.content is not None:
        mistake = type_mistake(found.type, examined.content, found.content)
        if mistake:
            found.problems.append(mistake)


def _identify(client: httpx.Client, found: PartResult) -> None:
    """--quick: only the start of the file, to tell what it is."""
    try:
        with client.stream("GET", found.url) as resp:
            _expect(resp, 200)
            _head, content = imagefile.identify_head(_Body(resp))
    except httpx.HTTPError as exc:
        raise _Failed(f"download failed: {_describe(exc)}") from exc
    except (PublishError, DecompressError) as exc:
        found.problems.append(str(exc))
        return
    found.content = content.describe()
    mistake = type_mistake(found.type, content)
    if mistake:
        found.problems.append(mistake)


def type_mistake(declared: str, content: imagefile.Content, what: str = "") -> str | None:
    """Why a file holding `content` (`what`, in words) must not be declared `declared`."""
    actual = content.kind
    if declared == actual:
        return None
    what = what or content.describe()
    if actual == QCOW2:
        return f"declared {declared}, but the file is a qcow2 image: declare it QCOW2"
    if declared == QCOW2:
        return f"declared QCOW2, but the file is not a qcow2 image ({what})"
    if declared == FILESYSTEM:
        return (
            f"declared FILESYSTEM, but the file is compressed ({what}): declare it ZFILESYSTEM "
            "(sites running the original ImageProxy would register the compressed bytes as "
            "the disk)"
        )
    return (
        "declared ZFILESYSTEM, but the file is not compressed: declare it FILESYSTEM (sites "
        "running the original ImageProxy refuse an uncompressed ZFILESYSTEM)"
    )


def _expect(resp: httpx.Response, status: int) -> None:
    if resp.status_code != status:
        hint = " (is the file uploaded under this name?)" if resp.status_code == 404 else ""
        raise _Failed(f"HTTP {resp.status_code} {resp.reason_phrase}".rstrip() + hint)


def _describe(exc: httpx.HTTPError) -> str:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"unreachable from here ({reason}): {REACH_ADVICE}"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {TIMEOUT.read:.0f} s ({type(exc).__name__})"
    return f"{type(exc).__name__}: {reason}"


def _address_notes(url: str) -> list[str]:
    """A host only some networks can reach works here but not at other sites."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []  # the probe reports it unreachable
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    if not addresses:
        return []
    shown = ", ".join(sorted(str(a) for a in addresses))
    if all(a.is_loopback for a in addresses):
        return [
            f"{host} is a loopback address ({shown}): no other machine reaches it, and sites "
            "refuse loopback URLs"
        ]
    if all(a.is_private or a.is_link_local for a in addresses):
        return [f"{host} has only private addresses ({shown}): {REACH_ADVICE}"]
    return []


class _Body(io.RawIOBase):
    """An httpx response body as a file, the bytes exactly as the server sent them."""

    def __init__(self, resp: httpx.Response) -> None:
        self._chunks = resp.iter_raw(imagefile.READ_SIZE)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
