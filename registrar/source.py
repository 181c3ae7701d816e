"""The source of an image as published, read once: hashed as it is read, unpacked if asked.

    found = probe_source(source, decompress, expected_sha1)   # format and raw size
    hashed = HashingReader(source, progress)                  # SHA-1 of what is read
    image = decompress.open_image(hashed, found)              # the raw image bytes
    ... read `image` to its end ...
    verify_source(hashed, found, expected_sha1)               # before the last byte goes out

The SHA-1 covers the file exactly as downloaded (for a ZFILESYSTEM, the compressed file), so
`verify_source` drains what the image stream left unread (a gzip trailer, a tar's end blocks)
before comparing. Callers (the bundler, the Glance upload) call it before they emit their last
output, so a wrong file is never registered. A bundle needs a plain compressed image's raw size
first: `probe_source` finds it by one decompressing pass, which checks the SHA-1 too. A Glance
upload needs no size, so it skips that pass (`measure=False`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import BinaryIO

from registrar import decompress as zfs
from registrar.errors import BundleError, ImageChecksumMismatch

Progress = Callable[[int], None]  # called with each count of source bytes read


def probe_source(
    source: BinaryIO, decompress: bool, expected: str | None, *, measure: bool = True
) -> zfs.Probe:
    """The source's format and raw size. Without `measure`, a plain compressed image's size
    stays None (no extra pass; `open_image` then streams to the end of its data)."""
    try:
        if not decompress:
            size = source.seek(0, os.SEEK_END)
            source.seek(0)
            return zfs.Probe(zfs.Format.RAW, size)
        found = zfs.probe(source)
        if found.size is None and measure:
            # A plain compressed image: one pass to learn the raw size; it also checks the
            # SHA-1, so a wrong file costs no upload at all.
            hashed = HashingReader(source, None)
            size = zfs.measure(hashed, found.format)
            hashed.drain()
            compare_sha1(hashed.hexdigest(), expected)
            source.seek(0)
            found = found.with_size(size)
        return found
    except OSError as exc:
        raise BundleError(f"reading the image failed: {exc}") from exc


def verify_source(hashed: HashingReader, found: zfs.Probe, expected: str | None) -> None:
    """After the last image byte: the whole source was read and has the expected SHA-1."""
    if found.format is zfs.Format.RAW and found.tar_member is None:
        if hashed.read(1):
            raise BundleError("the image grew while it was being bundled")
    else:
        hashed.drain()  # a compressed file's trailer, a tar's end blocks
    compare_sha1(hashed.hexdigest(), expected)


def compare_sha1(actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise ImageChecksumMismatch(
            f"image SHA-1 {actual} does not match the expected {expected}; nothing was registered"
        )


class HashingReader:
    """Reads the source, hashing every byte and reporting progress; OSError → BundleError.

    A source that verifies as it serves (`blobs.MountReader`, the imgstore mount: its last
    byte comes only after the SHA-1 matched) is not hashed again: its `verified_sha1()` is the
    digest, asked once the whole source was read.
    """

    def __init__(self, source: BinaryIO, progress: Progress | None) -> None:
        self._source = source
        self._vouched: Callable[[], str] | None = getattr(source, "verified_sha1", None)
        self._sha1 = None if self._vouched is not None else hashlib.sha1()
        self._progress = progress
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._source.read(n)
        except OSError as exc:
            raise BundleError(f"reading the image failed: {exc}") from exc
        if self._sha1 is not None:
            self._sha1.update(data)
        self.count += len(data)
        if self._progress and data:
            self._progress(len(data))
        return data

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(zfs.READ_SIZE):
            pass

    def hexdigest(self) -> str:
        """Call once the whole source was read."""
        if self._sha1 is None:
            assert self._vouched is not None
            return self._vouched()
        return self._sha1.hexdigest()
