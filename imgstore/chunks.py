"""The on-disk cache: one sparse data file per blob, chunk geometry, and blob locks.

Everything here is synchronous and blocking; the daemon calls it through `trio.to_thread`.
A chunk's bytes are written with `os.pwrite` and made durable with `fdatasync` before the
caller records the chunk in the catalog, so a crash never leaves a recorded chunk unwritten
(one `fdatasync` may cover several chunks: the store batches them, see `WriteBack._wait_durable`).

Data files live at `cache_dir/blobs/<sha1>` (0600, directory 0700). A process that reads or
writes a blob's data holds a shared `flock` on its file; dropping a blob's data (eviction,
`imgstore evict`) needs the exclusive lock, so it never pulls bytes from under a reader in
another process. The kernel releases these locks when a process dies, even by `kill -9`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from imgstore.errors import BlobBusy, CacheFull

log = logging.getLogger(__name__)

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# Buffered writes go in pieces of this size. A whole 4 MiB pwrite makes ext4 allocate large
# page-cache folios, which on a VM whose freed memory goes back to the host (free page
# reporting) must be taken back from the host first; small pieces, as curl writes, do not.
# The figures are in docs/imgstore-design.md (history, third round).
_WRITE_PIECE = 16 * 1024
# O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's blocks; a page
# is enough for every device.
DIRECT_ALIGN = 4096


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_span(idx: int, size: int, chunk_size: int) -> tuple[int, int]:
    """Byte range [start, end) of chunk `idx`."""
    start = idx * chunk_size
    return start, min(start + chunk_size, size)


def chunks_touching(off: int, length: int, size: int, chunk_size: int) -> range:
    """Indexes of the chunks that bytes [off, off+length) touch, clipped to the blob."""
    end = min(off + length, size)
    if off >= end:
        return range(0)
    return range(off // chunk_size, (end - 1) // chunk_size + 1)


def blob_dir(cache_dir: Path) -> Path:
    return cache_dir / "blobs"


class ChunkAligner:
    """Cuts a body that arrives in pieces into whole chunks (when an origin ignores Range).

    The body may break and restart from 0 (a retry): what is pending then belongs to the
    broken answer and is not joined to the new one's bytes, and the new body's bytes up to
    the next chunk boundary are skipped.
    """

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self._pending = bytearray()
        self._start = 0  # the body offset of the first pending byte

    def feed(self, offset: int, piece: bytes) -> Iterator[tuple[int, bytes]]:
        """The chunks (index, bytes) that `piece`, at body `offset`, completes."""
        pending = self._pending
        if offset != self._start + len(pending):
            pending.clear()
            self._start = offset
        pending += piece
        while pending:
            idx = self._start // self.chunk_size
            start, end = chunk_span(idx, self.size, self.chunk_size)
            if self._start != start:  # a restarted body: realign on the next chunk
                skip = min(len(pending), end - self._start)
                del pending[:skip]
                self._start += skip
                continue
            if len(pending) < end - start:
                return
            chunk = bytes(pending[: end - start])
            del pending[: end - start]
            self._start = end
            yield idx, chunk


class DataFile:
    """An open cache file for one blob, holding a shared flock while open."""

    def __init__(self, cache_dir: Path, sha1: str, size: int) -> None:
        directory = blob_dir(cache_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / sha1
        self.size = size
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self.created = False
        except FileNotFoundError:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.created = True  # any chunk the catalog remembers is gone
        self.direct_fd: int | None = None  # opened at the first direct write; -1: unsupported
        try:
            # Blocking is brief: the exclusive holder only truncates the file.
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            # No kernel readahead on this file: it would cache pages of chunks not written
            # yet (holes), and an O_DIRECT write that lands there later may fail to drop
            # them, so a later read would see the hole's zeros. Reads ask for what they need
            # (readable chunks only), and `will_need` asks for more once a blob is complete.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.direct_fd is not None and self.direct_fd >= 0:
            os.close(self.direct_fd)
        os.close(self.fd)  # also releases the flock

    def pread(self, off: int, length: int) -> bytes:
        """Read cached bytes; the caller guarantees the chunks are recorded as present."""
        return os.pread(self.fd, length, off)

    def pread_cached(self, off: int, length: int, buf: bytearray) -> memoryview | None:
        """The bytes if the page cache holds all of them, else None; never waits for the disk.

        `preadv2(RWF_NOWAIT)` fails with EAGAIN instead of starting disk I/O, so this may run
        on the trio thread: a 1 MiB copy from the page cache costs far less than the thread
        hop of `pread`. Same contract as `pread`.
        The bytes land in `buf` (grown if short), and a view of them is returned.
        """
        if len(buf) < length:
            buf.extend(bytes(length - len(buf)))
        view = memoryview(buf)[:length]
        try:
            n = os.preadv(self.fd, [view], off, _RWF_NOWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None  # a filesystem or kernel without RWF_NOWAIT: the thread path
            raise
        if n != length:
            return None  # partly cached: let the thread read it all
        return view

    def will_need(self, off: int, length: int) -> None:
        """Start reading [off, off+length) into the page cache (readahead for a reader).

        Only a hint: an error (the file was closed meanwhile) is ignored.
        """
        try:
            os.posix_fadvise(self.fd, off, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            log.debug("readahead hint for %s failed: %s", self.path.name, exc)

    def write(
        self, off: int, data: bytes | bytearray | memoryview | mmap.mmap, direct: bool = False
    ) -> int:
        """pwrite `data` at `off` (not yet durable); returns the file's allocated bytes.

        `direct`: `data` will be served from memory, so if it is a pooled (page-aligned)
        buffer its aligned part goes to the disk with O_DIRECT, past the page cache: no kernel copy
        and no page-cache memory to allocate (see _WRITE_PIECE for what that costs here). A
        filesystem without O_DIRECT gets a buffered write instead.
        Raises CacheFull on ENOSPC/EDQUOT: the caller may evict and retry once.
        """
        view = memoryview(data)
        try:
            # Anonymous mappings (the pool's buffers) are page-aligned; other buffers are not,
            # and one refused O_DIRECT write would turn it off for the file.
            if direct and isinstance(data, mmap.mmap) and off % DIRECT_ALIGN == 0:
                done = self._write_direct(off, [view[: len(view) - len(view) % DIRECT_ALIGN]])
                view = view[done:]
                off += done
            while view:
                n = os.pwrite(self.fd, view[:_WRITE_PIECE], off)
                view = view[n:]
                off += n
        except OSError as exc:
            _raise_if_full(exc, self.path)
            raise
        return allocated(self.fd)

    def write_many(
        self, off: int, pieces: list[bytes | bytearray | mmap.mmap], direct: bool = False
    ) -> int:
        """`write` of consecutive pieces from `off`: one pwritev if they can all go O_DIRECT."""
        whole = sum(len(p) for p in pieces)
        if (
            direct
            and len(pieces) > 1
            and off % DIRECT_ALIGN == 0
            and all(isinstance(p, mmap.mmap) and len(p) % DIRECT_ALIGN == 0 for p in pieces)
        ):
            try:
                if self._write_direct(off, [memoryview(p) for p in pieces]) == whole:
                    return allocated(self.fd)
            except OSError as exc:
                _raise_if_full(exc, self.path)
                raise
        # Piece by piece (again, if O_DIRECT stopped part way: the same bytes).
        for piece in pieces:
            self.write(off, piece, direct)
            off += len(piece)
        return allocated(self.fd)

    def _write_direct(self, off: int, views: list[memoryview]) -> int:
        """Write what O_DIRECT can of `views`, in order from `off`; returns the bytes written."""
        if self.direct_fd is None:
            try:
                self.direct_fd = os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                log.debug("%s: no O_DIRECT here (%s); buffered writes", self.path, exc)
                self.direct_fd = -1
        done = 0
        while self.direct_fd >= 0 and views:
            try:
                n = os.pwritev(self.direct_fd, views, off + done)
                if n == 0 and any(views):
                    break  # no progress: let the buffered path write the rest
                done += n
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                if views:
                    views[0] = views[0][n:]
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.debug("%s: O_DIRECT write refused (%s); buffered writes", self.path, exc)
                os.close(self.direct_fd)
                self.direct_fd = -1
        return done

    def sync(self) -> int:
        """fdatasync: every byte written before this call is durable when it returns.

        One call covers all the chunks written so far (the store's group commit). Returns the
        file's allocated bytes afterwards. Raises CacheFull on ENOSPC/EDQUOT (delayed
        allocation may fail only now).
        """
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            _raise_if_full(exc, self.path)
            raise
        return allocated(self.fd)


def _raise_if_full(exc: OSError, path: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CacheFull(f"cache disk full writing {path.name}") from exc


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def allocated_path(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


class ExclusiveBlob:
    """Holds a blob's exclusive flock (no waiting), to drop its data: eviction, `evict`.

    Raises BlobBusy when any process (this one included) has the blob open. Order: take this
    lock, reset the catalog bitmap, then truncate, so no reader sees a recorded chunk whose
    bytes are gone.
    """

    def __init__(self, cache_dir: Path, sha1: str) -> None:
        self.path = blob_dir(cache_dir) / sha1
        self.fd = -1

    def __enter__(self) -> ExclusiveBlob:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self.fd = -1
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self.fd)
            raise BlobBusy(f"blob {self.path.name} is open by a mount or another process") from exc
        return self

    def truncate(self, size: int) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, size)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
