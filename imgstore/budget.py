"""The cache budget: a hard limit on allocated bytes, and LRU eviction of whole blobs.

Allocated bytes are what the disk really holds (st_blocks * 512 of every data file), not the
apparent sizes of the sparse files. A chunk is written only after `reserve` made room for it, so
the total of allocated plus reserved bytes never exceeds `cache_size`. A blob is never evicted
while it is open by any process (its data file's shared flock) or pinned in the catalog.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from imgstore.catalog import Catalog
from imgstore.chunks import ExclusiveBlob, allocated_path, blob_dir
from imgstore.config import StoreConfig, human_size
from imgstore.errors import BlobBusy, CacheFull, UnknownBlob

log = logging.getLogger(__name__)

BLOCK = 4096
METADATA_SLACK = 2 * BLOCK
# A reservation trusts the last statvfs, less what was reserved since, while this much stays
# free above `min_free` and the figure is this recent: a statvfs per chunk would be a thread
# hop inside the one-at-a-time write chain of a sequential reader's chunks. Other
# processes may fill the disk in between: a write that meets ENOSPC still evicts and retries.
DISK_HEADROOM = 256 * 1024 * 1024
DISK_RECHECK_S = 1.0

Runner = Callable[..., Awaitable[Any]]


def round_up(n: int, block: int = BLOCK) -> int:
    return (n + block - 1) // block * block


class Budget:
    """Bytes in use and reserved, and the eviction that keeps them under the limit."""

    def __init__(self, cfg: StoreConfig, catalog: Catalog, db: Runner, io: Runner) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self._db = db
        self._io = io
        self.allocated: dict[str, int] = {}
        self.reserved = 0
        # What this process evicted, for imgstore/metrics.py.
        self.evictions = 0
        self.evicted_bytes = 0
        # Held while deciding and evicting, so two reservations never count the same room.
        self._lock = trio.Lock()
        # The last statvfs: (trio time, bytes available), and bytes reserved since.
        self._disk: tuple[float, int] | None = None
        self._reserved_since_stat = 0
        # Blobs counted while `refresh` scans the disk (None when no scan runs): their new
        # figures are newer than what the scan saw.
        self._counted_in_scan: set[str] | None = None

    @property
    def used(self) -> int:
        return sum(self.allocated.values()) + self.reserved

    def set_allocated(self, sha1: str, nbytes: int) -> None:
        """Count `nbytes` as what `sha1`'s data file holds now (after its data was dropped)."""
        self.allocated[sha1] = nbytes
        self._note_counted(sha1)

    def grow_allocated(self, sha1: str, nbytes: int) -> None:
        """Count at least `nbytes` for `sha1`'s data file, which is being written.

        Writes and syncs finish in any order, and the file only grows while it is written
        (dropping its data needs it closed): the largest figure seen is the latest.
        """
        self.allocated[sha1] = max(nbytes, self.allocated.get(sha1, 0))
        self._note_counted(sha1)

    def _note_counted(self, sha1: str) -> None:
        if self._counted_in_scan is not None:
            self._counted_in_scan.add(sha1)

    async def refresh(self) -> None:
        """Re-read the allocated size of every data file (other processes write too).

        Writes go on while the scan runs in its thread, and one that is counted then has
        already given back its reservation: the scan's older figure for that blob must not
        replace it, or the budget would undercount it and let the cache overrun.
        """
        self._counted_in_scan = set()
        try:
            scanned = await self._io(scan_allocated, self.cfg.cache_dir)
            for sha1 in self._counted_in_scan:
                scanned[sha1] = self.allocated[sha1]
            self.allocated = scanned
        finally:
            self._counted_in_scan = None
        self._disk = None  # and the disk's free space, at the next check

    @contextlib.asynccontextmanager
    async def reserve(self, sha1: str, length: int) -> AsyncIterator[None]:
        """Make room for `length` more bytes of `sha1` and hold it until the write is counted."""
        # A data write can also allocate filesystem metadata (an ext4 extent-tree block, an
        # indirect block): reserve two blocks beyond the data so the total never overshoots.
        # After the write, the file's real st_blocks replaces the estimate.
        need = round_up(length) + METADATA_SLACK
        async with self._lock:
            await self._make_room(sha1, need)
            self.reserved += need
            self._reserved_since_stat += need
        try:
            yield
        finally:
            self.reserved -= need

    async def make_room(self, sha1: str, length: int, *, force: bool = False) -> None:
        """Like `reserve`'s first step, for a write that met ENOSPC: evict, reserve nothing.

        The write still holds its reservation of `length`: it is not counted again here, or
        a write that an eviction made room for would need room for itself twice over, and
        fail with CacheFull naming no cause.
        """
        held = round_up(length) + METADATA_SLACK
        async with self._lock:
            self.reserved -= held
            try:
                await self._make_room(sha1, held, force=force)
            finally:
                self.reserved += held

    async def _make_room(self, sha1: str, need: int, *, force: bool = False) -> None:
        """Evict least-recently-used blobs until `need` bytes fit; CacheFull if they cannot.

        `force` evicts at least one blob even if the numbers say it fits (the disk said ENOSPC).
        """
        if not force and self._fits(need) and await self._disk_fits(need):
            return
        await self.refresh()
        evicted_one = False
        while force and not evicted_one or not (self._fits(need) and await self._disk_fits(need)):
            victim = await self._evict_one(exclude=sha1)
            if victim is None:
                raise CacheFull(
                    f"cannot cache {human_size(need)} more of blob {sha1}: "
                    f"{human_size(self.used)} used of {self._limit_text()}, and every other "
                    "cached blob is open or pinned"
                )
            evicted_one = True

    def _fits(self, need: int) -> bool:
        return self.cfg.cache_size is None or self.used + need <= self.cfg.cache_size

    async def _disk_fits(self, need: int) -> bool:
        floor = self.cfg.min_free + need
        if self._disk is not None:
            checked, avail = self._disk
            left = avail - self._reserved_since_stat
            if trio.current_time() - checked < DISK_RECHECK_S and left - DISK_HEADROOM >= floor:
                return True
        st = await self._io(os.statvfs, self.cfg.cache_dir)
        avail = st.f_bavail * st.f_frsize
        self._disk = (trio.current_time(), avail - self.reserved)
        self._reserved_since_stat = 0
        return avail - need - self.reserved >= self.cfg.min_free

    def _limit_text(self) -> str:
        if self.cfg.cache_size is None:
            return f"the disk (keeping {human_size(self.cfg.min_free)} free)"
        return f"the {human_size(self.cfg.cache_size)} budget"

    async def _evict_one(self, exclude: str) -> str | None:
        """Evict the least recently used blob that is neither open, pinned nor `exclude`."""
        lru = [sha1 for sha1, _ in await self._db(self.catalog.lru)]
        # Files with blocks but no recorded chunk (a write cut short by kill -9) go first.
        strays = [s for s, n in self.allocated.items() if n and s not in set(lru)]
        for sha1 in strays + lru:
            if sha1 == exclude or self.allocated.get(sha1, 0) == 0:
                continue
            if await self._db(self.catalog.pinned, sha1):
                continue
            try:
                freed = await self._io(evict_blob, self.cfg.cache_dir, self.catalog, sha1)
            except BlobBusy:
                # Said, so that a CacheFull that follows has its cause in the log.
                log.info("blob %s is open: not evicted", sha1)
                continue
            self.allocated[sha1] = 0
            self.evictions += 1
            self.evicted_bytes += freed
            log.info("evicted blob %s (%s) to make room", sha1, human_size(freed))
            return sha1
        return None


def scan_allocated(cache_dir: os.PathLike[str]) -> dict[str, int]:
    """Allocated bytes of every data file under cache_dir/blobs."""
    directory = blob_dir(cache_dir)  # type: ignore[arg-type]
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    return {name: allocated_path(directory / name) for name in names if len(name) == 40}


def evict_blob(cache_dir: os.PathLike[str], catalog: Catalog, sha1: str) -> int:
    """Drop a blob's cached bytes if no process has it open; returns the bytes freed.

    Order matters: exclusive lock, then the catalog forgets the chunks, then the bytes go.
    Raises BlobBusy if the blob is open, UnknownBlob if it is not in the catalog.
    """
    with ExclusiveBlob(cache_dir, sha1) as ex:  # type: ignore[arg-type]
        before = allocated_path(ex.path)
        try:
            size = catalog.reset(sha1).size
        except UnknownBlob:
            size = 0  # a stray file: nothing to forget, only bytes to free
        ex.truncate(size)
        return before - allocated_path(ex.path)
