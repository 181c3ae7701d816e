"""ZFILESYSTEM images: detect the compression by magic bytes and stream the raw image out.

Supported: gzip (ISA-L), bzip2, xz and legacy lzma, Unix `compress` (.Z, via the `ncompress`
library), each either around the raw image or around a tar holding the image. In a tar, the
image is the member named `filesystem` (or `./filesystem`) wherever it stands, as the original's
`tar -OSxf IMAGE filesystem` chose it; a tar without one is used only if it holds exactly one
regular file (with a warning). A sparse tar member comes out with its holes restored as zeros,
and its size is the full sparse size.

The bundler needs the raw size before the first byte (it goes into the tar header of the
bundle), so:

- `probe(source)` looks at the start of a seekable source and says what it is. For a tar the
  member's header gives the size at once; for a plain compressed image the size is unknown
  (`Probe.size is None`) and `measure()` finds it with one decompressing pass.
- `open_image(raw, probe)` then returns a stream of exactly `probe.size` image bytes read from
  `raw`, a reader positioned at the start of the same bytes (the bundler passes its hashing
  reader here, so the SHA-1 covers the compressed file as downloaded).

Corrupt or truncated input raises DecompressError; errors of the source itself pass through.
"""

from __future__ import annotations

import bz2
import dataclasses
import enum
import io
import logging
import lzma
import posixpath
import queue
import tarfile
import threading
import zlib
from typing import BinaryIO

import ncompress
from isal import igzip

from registrar.errors import BundleError, DecompressError

log = logging.getLogger(__name__)

READ_SIZE = 4 * 1024 * 1024
TAR_MEMBER = "filesystem"


class Format(enum.Enum):
    """How the image file is compressed."""

    RAW = "raw"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    LZMA = "lzma"
    COMPRESS = "compress"


def detect(head: bytes) -> Format:
    """Tell the compression from the first bytes of a file (13 are enough)."""
    if head.startswith(b"\x1f\x8b"):
        return Format.GZIP
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[3:4] != b"0":
        return Format.BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return Format.XZ
    if head.startswith(b"\x1f\x9d"):
        return Format.COMPRESS
    if _looks_like_lzma_alone(head):
        return Format.LZMA
    return Format.RAW


def _looks_like_lzma_alone(head: bytes) -> bool:
    """The .lzma "alone" header, which has no magic: check what every tool writes.

    Byte 0 is lc/lp/pb, 0x5d for the default 3/0/2; bytes 1–4 the dictionary size, 2^n or
    2^n + 2^(n-1) from 4 KiB up; bytes 5–12 the raw size or all ones (unknown).
    """
    if len(head) < 13 or head[0] != 0x5D:
        return False
    dict_size = int.from_bytes(head[1:5], "little")
    n = dict_size.bit_length() - 1
    if dict_size < 4096 or dict_size not in (1 << n, (1 << n) | (1 << (n - 1))):
        return False
    raw_size = int.from_bytes(head[5:13], "little")
    return raw_size == 2**64 - 1 or raw_size < 2**50


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a source holds: its compression, whether a tar wraps the image, and the raw size.

    `size` is None for a plain compressed image until `measure()` has run.
    `data_regions` lists (offset, length) of a sparse member's data; None when not sparse.
    """

    format: Format
    size: int | None
    tar_member: str | None = None
    data_regions: tuple[tuple[int, int], ...] | None = None

    @property
    def sparse(self) -> bool:
        """Whether the image came from a sparse tar member."""
        return self.data_regions is not None

    def with_size(self, size: int) -> Probe:
        """A copy with the measured size filled in."""
        return dataclasses.replace(self, size=size)


def probe(source: BinaryIO) -> Probe:
    """Look at the start of seekable `source`, then seek it back to where it was."""
    start = source.tell()
    raw_size = source.seek(0, io.SEEK_END) - start
    source.seek(start)
    try:
        head = source.read(13)
        fmt = detect(head)
        source.seek(start)
        stream = _decompressor(source, fmt)
        try:
            member = _read_tar_header(stream)
        finally:
            stream.close()
    finally:
        source.seek(start)
    if member is not None:
        regions = None
        if member.issparse():
            regions = tuple((off, n) for off, n in member.sparse if n)  # type: ignore[union-attr]
        return Probe(fmt, member.size, tar_member=member.name, data_regions=regions)
    return Probe(fmt, raw_size if fmt is Format.RAW else None)


def measure(source: BinaryIO, fmt: Format) -> int:
    """Decompress all of `source` and return the raw size (the pass a plain .gz needs)."""
    stream = _decompressor(source, fmt)
    total = 0
    try:
        while chunk := _translate(stream.read, READ_SIZE, fmt):
            total += len(chunk)
    finally:
        stream.close()
    return total


def open_image(raw: BinaryIO, found: Probe) -> BinaryIO:
    """Return a stream of the image bytes inside `raw` (positioned at the file's start).

    The stream raises DecompressError if the data is corrupt or ends before `found.size`. A
    plain compressed image probed without measuring (size None) runs to the end of its
    compressed data, which the decompressor checks is complete.
    """
    stream = _decompressor(raw, found.format)
    if found.tar_member is None:
        return _ImageStream(stream, found.format, found.size, closers=[stream])
    assert found.size is not None  # a tar header gives the member's size
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=1024 * 1024)
        member = next((m for m in tar if m.isfile() and m.name == found.tar_member), None)
    except (tarfile.TarError, *_CORRUPT) as exc:
        stream.close()
        raise DecompressError(f"{found.format.value} tar is corrupt: {exc}") from exc
    if member is None:
        stream.close()
        raise DecompressError(f"tar member {found.tar_member!r} vanished between two reads")
    data = tar.extractfile(member)
    assert data is not None  # a regular file always has data
    return _ImageStream(data, found.format, found.size, closers=[data, tar, stream])


def _read_tar_header(stream: BinaryIO) -> tarfile.TarInfo | None:
    head = _translate(stream.read, 512, None)
    if not _looks_like_tar(head):
        return None
    rest = io.BufferedReader(Chain(head, stream))  # type: ignore[arg-type]
    try:
        tar = tarfile.open(fileobj=rest, mode="r|")
        return _image_member(tar)
    except (tarfile.TarError, *_CORRUPT) as exc:
        raise DecompressError(f"the tar inside the image is corrupt: {exc}") from exc


def _is_image_name(name: str) -> bool:
    return posixpath.normpath(name) == TAR_MEMBER


def _image_member(tar: tarfile.TarFile) -> tarfile.TarInfo:
    """The member named `filesystem`, or the only regular file; DecompressError otherwise.

    Reads on past other members (a README before the image is common), so a tar without a
    `filesystem` member is read to its end before it is judged.
    """
    files: list[tarfile.TarInfo] = []
    names: list[str] = []
    for member in tar:
        names.append(member.name)
        if member.isfile():
            if _is_image_name(member.name):
                return member
            files.append(member)
    if len(files) == 1:
        log.warning(
            "the tar holds no member named %r; using its only file %r",
            TAR_MEMBER,
            files[0].name,
        )
        return files[0]
    found = ", ".join(repr(n) for n in names[:20]) + (", …" if len(names) > 20 else "")
    raise DecompressError(
        f"the tar inside the image has no member named {TAR_MEMBER!r}"
        + (f" and {len(files)} regular files; members found: {found}" if names else " (empty)")
    )


def _looks_like_tar(block: bytes) -> bool:
    """A POSIX or GNU tar header with a valid checksum."""
    if len(block) < 512 or block[257:262] != b"ustar":
        return False
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:512])


class Chain(io.RawIOBase):
    """Bytes already read, then the rest of a stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# What decompressors raise on corrupt input: gzip/isal raise OSError subclasses (BadGzipFile),
# EOFError on truncation; bz2 OSError; lzma LZMAError; ncompress ValueError/RuntimeError.
_CORRUPT = (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, RuntimeError)


def _translate(read: object, n: int, fmt: Format | None) -> bytes:
    try:
        return read(n)  # type: ignore[operator,no-any-return]
    except BundleError:
        raise
    except _CORRUPT as exc:
        what = fmt.value if fmt else "image"
        raise DecompressError(f"{what} data is corrupt or truncated: {exc}") from exc


def _decompressor(source: BinaryIO, fmt: Format) -> BinaryIO:
    if fmt is Format.RAW:
        return _Unclosable(source)  # type: ignore[return-value]
    if fmt is Format.GZIP:
        return igzip.IGzipFile(fileobj=source, mode="rb")  # type: ignore[return-value]
    if fmt is Format.BZIP2:
        return bz2.BZ2File(source, mode="rb")  # type: ignore[return-value]
    if fmt in (Format.XZ, Format.LZMA):
        return lzma.LZMAFile(source, mode="rb")  # type: ignore[return-value]
    if fmt is Format.COMPRESS:
        return _LzwReader(source)  # type: ignore[return-value]
    raise AssertionError(fmt)


class _Unclosable(io.RawIOBase):
    """Passes reads through; closing it leaves the caller's file open."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        return self._source.read(n)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ImageStream(io.RawIOBase):
    """The raw image: translates decompression errors and checks the length promised."""

    def __init__(
        self, inner: BinaryIO, fmt: Format, size: int | None, closers: list[object]
    ) -> None:
        self._inner = inner
        self._fmt = fmt
        self._left = size
        self._closers = closers

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if self._left is None:  # no size announced: to the end of the compressed data
            return _translate(self._inner.read, n, self._fmt)
        want = self._left if n < 0 else min(n, self._left)
        if want == 0:
            return b""
        data = _translate(self._inner.read, want, self._fmt)
        if not data:
            raise DecompressError(
                f"{self._fmt.value} image ended {self._left} bytes before its announced size"
            )
        self._left -= len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            for item in self._closers:
                item.close()  # type: ignore[attr-defined]
        super().close()


class _LzwReader(io.RawIOBase):
    """Unix `compress` data, decompressed by ncompress in a thread into a bounded queue.

    ncompress only offers "read all of this, write all of that"; the thread turns that into a
    stream with at most `_DEPTH` buffers of `_CHUNK` bytes waiting.
    """

    _CHUNK = 1024 * 1024
    _DEPTH = 4

    def __init__(self, source: BinaryIO) -> None:
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self._DEPTH)
        self._stop = threading.Event()
        self._pending = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(_Unclosable(source),), daemon=True, name="lzw"
        )
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self, source: io.RawIOBase) -> None:
        sink = _ChunkSink(self._CHUNK, self._put)
        try:
            ncompress.decompress(source, sink)
            sink.flush()
            self._put(None)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the reader thread, which re-raises it
            try:
                self._put(exc)
            except _Stopped:
                return

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            item = self._queue.get()
            if item is None:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item
            else:
                self._pending = memoryview(item)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


class _Stopped(Exception):
    """The reader closed the stream; the LZW thread ends quietly."""


class _ChunkSink:
    """Collects ncompress's small writes into big chunks for the queue."""

    def __init__(self, size: int, put: object) -> None:
        self._size = size
        self._put = put
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= self._size:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))  # type: ignore[operator]
            self._buffer.clear()
