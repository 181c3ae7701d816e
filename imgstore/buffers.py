"""Chunk buffers, reused once nothing refers to them.

A fresh `bytearray(4 MiB)` per fetched chunk costs a memset and a page fault per 4 KiB page (on
a VM whose freed memory goes back to the host, the faults are the dear part). A chunk buffer
has several users with different lifetimes (the fetch thread, the write, the hasher's thread,
the in-memory cache of recent chunks, a fetch thread abandoned at a deadline that may still
write into it), so the pool does not ask them to give buffers back: a buffer is free when only
the pool refers to it, which CPython's reference count says exactly (a memoryview of it counts
as a reference too).

Pooled buffers are anonymous mappings, so they are page-aligned: the data file may write them
with O_DIRECT (see chunks.DataFile.write).
"""

from __future__ import annotations

import mmap
import sys

# A chunk's bytes: pooled (page-aligned) or not (a blob's short last chunk, a whole-body piece).
ChunkBuffer = bytearray | mmap.mmap

# References to a pooled buffer that is free: the pool's list, the loop variable in `take`,
# and getrefcount's own argument.
_FREE_REFS = 3


class BufferPool:
    """Up to `keep` buffers of `size` bytes, handed out again once unused."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._bufs: list[mmap.mmap] = []
        self.made = 0  # buffers of `size` ever created: more than `keep` means some were not

    def take(self, size: int) -> ChunkBuffer:
        """A buffer of exactly `size` bytes (contents undefined): a free pooled one if any."""
        if size != self.size:
            return bytearray(size)  # the short last chunk of a blob: not worth keeping
        for buf in self._bufs:
            if sys.getrefcount(buf) == _FREE_REFS:
                return buf
        buf = mmap.mmap(-1, size)
        self.made += 1
        if len(self._bufs) < self.keep:
            self._bufs.append(buf)
        return buf
