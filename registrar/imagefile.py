"""What an image file holds, read the way the registrar reads it: for `publish` and `check`.

    found = examine(stream, inspect=True, progress=callback)
    found.sha1, found.size          # of the bytes exactly as read (what a signature covers)
    found.content.kind              # FILESYSTEM, ZFILESYSTEM or QCOW2
    found.problem                   # why the registrar would refuse it, or None

`examine` reads its source once, from its current position to the end; the source need not be
seekable (an HTTP body works). With `inspect` it also tells what the file is from its first bytes
(`identify`), with registrar/decompress.py's own `probe`, so the detection is the registrar's,
and for a compressed image it decompresses all of it (`unpack`, through decompress.py's
`measure` / `open_image`), so a corrupt or truncated file, or a tar without a usable member,
is found before any site tries it.

A raw file is FILESYSTEM; a file with the qcow2 magic is QCOW2; one the registrar can decompress
(gzip, bzip2, xz, lzma, compress, or such a compressed tar holding `filesystem`) is ZFILESYSTEM.
Refused, with the reason in `problem`: an empty file, a compression the registrar cannot read
(zstd, zip, …), an uncompressed tar (the original ImageProxy unpacked a tar only inside a
compressed ZFILESYSTEM), and whatever decompress.py refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import BinaryIO

from registrar import decompress as zfs
from registrar.errors import DecompressError, PublishError
from registrar.metadata import FILESYSTEM, QCOW2, ZFILESYSTEM

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
READ_SIZE = 1024 * 1024
# How much of the start `identify` may need: a bzip2 block is up to 900 kB compressed, and a
# tar may hold small members before `filesystem`. Doubled from the first size up to the last.
HEAD_SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)

# Compressions decompress.py does not read (it would take them for raw images): a site would
# register the compressed bytes as the disk.
_UNREADABLE = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
    (b"7z\xbc\xaf\x27\x1c", "7-zip"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"LZIP", "lzip"),
    (b"\x89LZO", "lzop"),
    (b"Rar!\x1a\x07", "rar"),
)


@dataclasses.dataclass(frozen=True)
class Content:
    """What a filesystem file is: its type keyword and, unless QCOW2, decompress.py's Probe."""

    kind: str
    probe: zfs.Probe | None = None

    def describe(self, raw_size: int | None = None) -> str:
        """A few words for a table: "gzip tar (member 'filesystem', sparse), 2.0 GiB raw"."""
        if self.probe is None:
            return "qcow2"
        fmt = self.probe.format.value
        if self.probe.tar_member is not None:
            sparse = ", sparse" if self.probe.sparse else ""
            text = f"{fmt} tar (member {self.probe.tar_member!r}{sparse})"
        else:
            text = fmt
        size = raw_size if raw_size is not None else self.probe.size
        if self.kind == ZFILESYSTEM and size is not None:
            text += f", {human_size(size)} raw"
        return text


@dataclasses.dataclass(frozen=True)
class Examined:
    """One pass over a file: SHA-1 and size as read; with inspection, what it holds."""

    sha1: str
    size: int
    content: Content | None = None
    raw_size: int | None = None  # a ZFILESYSTEM's decompressed size
    problem: str | None = None  # why the registrar would refuse the file

    def describe(self) -> str:
        return self.content.describe(self.raw_size) if self.content else "as is"


def human_size(n: int) -> str:
    """Bytes in binary units: "512 B", "16.0 MiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class HashingReader(io.RawIOBase):
    """Reads through `source` (anything with `readinto`), hashing and counting every byte (and
    telling `progress`); bytes land in the caller's buffer directly, copied once."""

    def __init__(self, source: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        self._source = source
        self._progress = progress
        self._sha1 = hashlib.sha1()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._source.readinto(buffer) or 0  # type: ignore[attr-defined]
        if n:
            self._sha1.update(memoryview(buffer)[:n])
            self.count += n
            if self._progress is not None:
                self._progress(n)
        return n

    def drain(self) -> None:
        """Read (and hash) what is left."""
        while self.read(READ_SIZE):
            pass

    def hexdigest(self) -> str:
        return self._sha1.hexdigest()


def identify(source: BinaryIO) -> Content:
    """What the seekable `source` is, from its start; PublishError or DecompressError if the
    registrar would refuse it. `source` is left where it was."""
    start = source.tell()
    head = source.read(16)
    source.seek(start)
    if not head:
        raise PublishError("the file is empty")
    if head.startswith(QCOW2_MAGIC):
        return Content(QCOW2)
    for magic, name in _UNREADABLE:
        if head.startswith(magic):
            raise PublishError(
                f"the file is {name}-compressed, which the registrar cannot decompress: use "
                "gzip, bzip2, xz, lzma or compress"
            )
    found = zfs.probe(source)
    if found.format is zfs.Format.RAW and found.tar_member is not None:
        raise PublishError(
            "the file is an uncompressed tar: a site unpacks a tar only inside a compressed "
            "ZFILESYSTEM; gzip it (or use `registrar publish --tar`)"
        )
    return Content(FILESYSTEM if found.format is zfs.Format.RAW else ZFILESYSTEM, found)


def identify_head(source: BinaryIO) -> tuple[bytes, Content]:
    """Read the start of a (non-seekable) stream until `identify` can tell what it is.

    Returns the bytes read (the caller chains them before the rest) and the Content. Raises
    PublishError or DecompressError as `identify` does, once the head cannot grow.
    """
    head = b""
    for size in HEAD_SIZES:
        while len(head) < size and (data := source.read(size - len(head))):
            head += data
        try:
            return head, identify(io.BytesIO(head))
        except DecompressError:
            # The start of a compressed stream reads as truncated: try with more of it.
            if len(head) < size or size == HEAD_SIZES[-1]:
                raise
    raise AssertionError("unreachable")


def unpack(source: BinaryIO, content: Content) -> int:
    """Decompress a whole ZFILESYSTEM from `source` (at its start; need not be seekable) and
    return the raw image's size. DecompressError if it is corrupt, truncated or empty."""
    found = content.probe
    assert found is not None and content.kind == ZFILESYSTEM
    if found.tar_member is None:
        size = zfs.measure(source, found.format)
    else:
        image = zfs.open_image(source, found)
        try:
            while image.read(READ_SIZE):
                pass
        finally:
            image.close()
        size = found.size or 0
    if size == 0:
        raise DecompressError(f"the {found.format.value} file decompresses to an empty image")
    return size


def examine(
    source: BinaryIO, *, inspect: bool, progress: Callable[[int], None] | None = None
) -> Examined:
    """Read all of `source` once: its SHA-1 and size; with `inspect`, what it holds.

    Errors of the source itself (OSError, an HTTP error) propagate; a file the registrar
    would refuse is not an error here but `Examined.problem`.
    """
    hashed = HashingReader(source, progress)
    content: Content | None = None
    raw_size: int | None = None
    problem: str | None = None
    if inspect:
        head = b""
        try:
            head, content = identify_head(hashed)  # type: ignore[arg-type]
            if content.kind == ZFILESYSTEM:
                raw_size = unpack(zfs.Chain(head, hashed), content)  # type: ignore[arg-type]
        except (PublishError, DecompressError) as exc:
            problem = str(exc)
    hashed.drain()
    if hashed.count == 0:
        problem = "the file is empty"
    return Examined(hashed.hexdigest(), hashed.count, content, raw_size, problem)


@contextlib.contextmanager
def collect_notes(level: int = logging.INFO) -> Iterator[list[str]]:
    """Collect what the registrar's modules log meanwhile (metadata and decompress explain
    their choices there: an ignored entry, a tar member used by position) as lines."""
    notes: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    handler = _Collect(level)
    loggers = [logging.getLogger(name) for name in ("registrar.metadata", "registrar.decompress")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(min(level, lg.getEffectiveLevel()))
        lg.propagate = False  # shown once, by the caller, not again by the root handler
    try:
        yield notes
    finally:
        for lg, (old_level, old_propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old_level)
            lg.propagate = old_propagate
