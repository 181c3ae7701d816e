"""The block cache: open blobs, reads, readahead, single-flight chunk fetches.

This is what `fs.py` translates and what `imgstore fetch` drives. A chunk is fetched here
(`Store._flight`, one per chunk at a time); it becomes readable and then durable in
`writeback.py`; the SHA-1 verdict is made in `hashing.py`; a blob's state is in `blob.py`. It
all runs on one trio thread; disk I/O, hashing and SQLite go through `trio.to_thread` under
limiters. The invariants that hold across these modules are in docs/imgstore-design.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import trio

from imgstore.blob import RECENT_CHUNKS, Blob, BlobStatus, Chunk
from imgstore.budget import Budget
from imgstore.buffers import BufferPool
from imgstore.catalog import BlobRecord, Catalog
from imgstore.chunks import ChunkAligner, DataFile, chunks_touching
from imgstore.config import StoreConfig
from imgstore.errors import BlobCorrupt, OriginError, RangeNotSupported, StoreError
from imgstore.fetcher import Origin
from imgstore.handle import Handle
from imgstore.hashing import Hashing
from imgstore.metrics import StoreMetrics
from imgstore.netpolicy import NetPolicy
from imgstore.writeback import WriteBack

log = logging.getLogger(__name__)

T = TypeVar("T")
# What reads return: pyfuse3 takes any contiguous buffer, so cached bytes are not copied again.
Buffer = bytes | bytearray | memoryview

# At shutdown, how long to wait for fetched chunks to be written and recorded.
DRAIN_S = 5.0
# Reads the page cache holds are served on the trio thread (RWF_NOWAIT never waits for the
# disk); others take a worker thread.
_NOWAIT_READS = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    """The cache's size (its budget, else the disk's size) and the bytes it uses."""

    total: int
    used: int


class Store:
    """The cache of one cache directory, as seen by one process."""

    def __init__(
        self,
        cfg: StoreConfig,
        catalog: Catalog,
        origin: Origin,
        nursery: trio.Nursery,
    ) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.origin = origin
        self.nursery = nursery
        self.blobs: dict[str, Blob] = {}  # what `open` hands out
        self.live: set[Blob] = set()  # every Blob whose data file is open (incl. replaced ones)
        # SQLite: one connection, so one thread at a time; disk: a few parallel syscalls.
        self.db_limiter = trio.CapacityLimiter(1)
        self.io_limiter = trio.CapacityLimiter(8)
        self.budget = Budget(cfg, catalog, self._db, self._io)
        self.metrics = StoreMetrics()
        self.metrics.watch_cache(self.budget, cfg.cache_size, cfg.min_free)
        self.hashing = Hashing(
            catalog,
            self.budget,
            self._db,
            self._io,
            nursery,
            on_verified=self._report_verified,
            on_mismatch=self._report_mismatch,
            maybe_close=self._maybe_close,
        )
        self.writeback = WriteBack(
            catalog,
            self.budget,
            self._db,
            self._io,
            nursery,
            advance_hash=self.hashing.advance,
            maybe_close=self._maybe_close,
            on_unstored=self._report_unstored,
        )
        self._open_lock = trio.Lock()
        # The trio thread's buffer for reads from the page cache, reused rather than allocated
        # per read (page faults). Safe because nothing awaits between filling it and pyfuse3
        # copying it into the reply (Store.read returns, Operations.read returns, it replies).
        self._read_buf = bytearray()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.db_limiter)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.io_limiter)

    async def start(self) -> None:
        """Learn what the cache holds now (allocated bytes of every data file)."""
        await self.budget.refresh()

    # -- what the catalog and this process know ---------------------------------------------

    async def blob_record(self, sha1: str) -> BlobRecord:
        """The catalog's row for `sha1` (UnknownBlob if there is none)."""
        return await self._db(self.catalog.get, sha1)

    async def blob_record_by_id(self, blob_id: int) -> BlobRecord | None:
        """The catalog's row with this id, or None."""
        return await self._db(self.catalog.by_id, blob_id)

    async def blob_records(self) -> list[BlobRecord]:
        """Every blob in the catalog."""
        return await self._db(self.catalog.list)

    def status(self, rec: BlobRecord) -> BlobStatus:
        """The blob's state and cached bytes, as the mount's xattrs show them.

        This process's view if it has the blob open (ahead of the catalog, which follows once
        chunks are durable), else the catalog's.
        """
        live = self.blobs.get(rec.sha1)
        if live is None:
            return BlobStatus(rec.state, rec.cached_bytes)
        return BlobStatus(live.state, live.cached_bytes)

    async def usage(self) -> CacheUsage:
        """The cache's size (its budget, or the whole disk without one) and the bytes it uses."""
        st = await trio.to_thread.run_sync(os.statvfs, self.cfg.cache_dir)
        limit = self.cfg.cache_size
        total = limit if limit is not None else st.f_blocks * st.f_frsize
        return CacheUsage(total, self.budget.used)

    # -- what the store reports ---------------------------------------------------------------

    def _report_verified(self, blob: Blob) -> None:
        self.metrics.verified.inc()
        log.info("blob %s verified", blob.sha1)

    def _report_mismatch(self, blob: Blob, got: str) -> None:
        log.error("blob %s failed verification: content has SHA-1 %s", blob.sha1, got)
        self.metrics.verification_failures.inc()

    def _report_unstored(self, blob: Blob, idx: int, exc: StoreError) -> None:
        log.error("blob %s: chunk %d not stored: %s", blob.sha1, idx, exc)
        self.metrics.fetch_errors.inc()

    # -- open / release ----------------------------------------------------------------------

    async def open(self, sha1: str) -> Handle:
        """Open a blob for reading (UnknownBlob if it is not in the catalog)."""
        async with self._open_lock:  # one loader per blob: never two DataFiles for one sha1
            blob = self.blobs.get(sha1)
            if blob is not None and blob.state == "corrupt":
                # Re-added since it failed? Then new opens get the fresh blob; handles on the
                # corrupt one keep failing until closed.
                rec = await self._db(self.catalog.get, sha1)
                if rec.generation != blob.generation:
                    blob = None
            if blob is None:
                blob = await self._load(sha1)
                self.blobs[sha1] = blob
                self.live.add(blob)
            blob.opens += 1
        self.nursery.start_soon(self._db, self.catalog.touch, sha1)
        if not blob.hashing.verdict.is_set():
            self.nursery.start_soon(self.hashing.advance, blob)
        return Handle(blob)

    async def _load(self, sha1: str) -> Blob:
        rec = await self._db(self.catalog.get, sha1)
        if rec.chunk_size != self.cfg.chunk_size and rec.cached_bytes == 0:
            if await self._db(
                self.catalog.set_chunk_size, sha1, rec.generation, self.cfg.chunk_size
            ):
                rec = await self._db(self.catalog.get, sha1)
        data = await self._io(DataFile, self.cfg.cache_dir, sha1, rec.size)
        try:
            # Re-read under the shared lock: an eviction elsewhere may have just finished.
            rec = await self._db(self.catalog.get, sha1)
            present = await self._db(self.catalog.chunks, sha1)
            if data.created and present:
                log.warning("blob %s: its cache file was deleted; fetching it again", sha1)
                rec = await self._db(self.catalog.reset, sha1)
                present = {}
        except BaseException:
            data.close()
            raise
        return Blob(rec, data, present, self.cfg.max_requests)

    async def release(self, handle: Handle) -> None:
        handle.blob.opens -= 1
        self.nursery.start_soon(self._db, self.catalog.touch, handle.blob.sha1)
        await self._maybe_close(handle.blob)

    def close_all(self) -> None:
        """Close every data file (at shutdown, once no task runs): drop our shared flocks."""
        for blob in list(self.live):
            blob.closed = True
            blob.data.close()
        self.live.clear()
        self.blobs.clear()

    async def _maybe_close(self, blob: Blob) -> None:
        """Close the data file once nothing uses the blob, so eviction may take it."""
        if blob.busy() or blob.closed:
            return
        blob.closed = True
        self.live.discard(blob)
        if self.blobs.get(blob.sha1) is blob:
            del self.blobs[blob.sha1]
        # Shielded: it is out of `live` now, so a cancelled close (the store shutting down
        # while the disk threads are busy) would leak the fd and its flock, and no eviction
        # in this process could take the blob any more.
        with trio.CancelScope(shield=True):
            await self._io(blob.data.close)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, handle: Handle, off: int, size: int) -> Buffer:
        """Bytes [off, off+size) of the blob, fetching what is missing.

        Raises BlobCorrupt, OriginError (including the read deadline) or CacheFull. A read that
        would complete the handle's coverage of the blob returns only after the SHA-1 matched.
        The result may be a view of a reused buffer: copy it before the next await.
        """
        blob = handle.blob
        if blob.state == "corrupt":
            raise BlobCorrupt.of(blob.sha1)
        end = min(off + size, blob.size)
        if off >= end:
            return b""
        touched = chunks_touching(off, end - off, blob.size, blob.chunk_size)
        self.metrics.lookup(blob, touched)
        self._readahead(handle, off, end)
        gated = blob.state != "verified" and handle.would_complete(off, end)
        handle.pending.append((off, end))
        try:
            if gated:
                await self._fetch_and_verify(blob)
            elif not all(i in blob.readable for i in touched):
                # Only a read that must wait pays for a deadline (a cancel scope): a cached
                # 4 KiB read is mostly this function's own overhead.
                with self._deadline(blob, f"bytes {off}-{end - 1}"):
                    await self._ensure(blob, list(touched))
            data: Buffer | None = blob.from_memory(off, end)
            if data is None and any(i in blob.unwritten for i in touched):
                # Across a chunk boundary, and one side is only in memory (written behind):
                # the data file does not have it yet.
                data = await self._assemble(blob, off, end)
            if data is None and _NOWAIT_READS:
                data = blob.data.pread_cached(off, end - off, self._read_buf)
            if data is None:
                data = await self._io(blob.data.pread, off, end - off)
        finally:
            handle.pending.remove((off, end))
        # Verification may have failed (and the bytes been dropped) while pread ran.
        if blob.state == "corrupt":
            raise BlobCorrupt.of(blob.sha1)
        if len(data) != end - off:
            raise StoreError(f"blob {blob.sha1}: short read of the cache at {off}")
        handle.add(off, end)
        self.metrics.served_bytes.inc(len(data))
        return data

    async def _assemble(self, blob: Blob, off: int, end: int) -> bytes:
        """Bytes [off, end) piece by piece: each chunk's from memory if there, else the file.

        A chunk not in memory is in the data file: it was readable (the caller waited) and
        it is not waiting to be written, since those stay in memory until they are.
        """
        pieces: list[bytes | memoryview] = []
        for idx in chunks_touching(off, end - off, blob.size, blob.chunk_size):
            start, stop = blob.span(idx)
            lo, hi = max(off, start), min(end, stop)
            data = blob.memory(idx)
            if data is not None:
                # A view: the join below is the one copy (the view keeps the buffer from
                # being reused meanwhile).
                pieces.append(memoryview(data)[lo - start : hi - start])
            else:
                pieces.append(await self._io(blob.data.pread, lo, hi - lo))
        return b"".join(pieces)

    def _readahead(self, handle: Handle, off: int, end: int) -> None:
        """Grow the window for sequential readers; random reads get none."""
        blob = handle.blob
        if off == handle.next_off:
            handle.window = min(max(2 * handle.window, blob.chunk_size), self.cfg.readahead_max)
        else:
            handle.window = 0
        handle.next_off = end
        if not handle.window:
            return
        for idx in chunks_touching(end, handle.window, blob.size, blob.chunk_size):
            self._start_flight(blob, idx, direct=True)
        if blob.complete():
            # All on disk: have the kernel read the window into the page cache now, so the
            # reads to come are served on the trio thread (pread_cached) and not one by one
            # from the disk. What was asked for before is not asked for again.
            lo = max(end, handle.advised)
            hi = min(blob.size, end + handle.window)
            if hi - lo >= blob.chunk_size or (hi == blob.size and hi > lo):
                handle.advised = hi
                self.nursery.start_soon(self._io, blob.data.will_need, lo, hi - lo)

    async def fetch_all(self, handle: Handle) -> None:
        """Fetch every chunk and wait for the verdict (for `imgstore fetch`)."""
        await self._fetch_and_verify(handle.blob)

    async def verify_cached(self, handle: Handle) -> bool:
        """Hash every cached byte again (for `imgstore verify`); False if not fully cached."""
        return await self.hashing.verify_cached(handle.blob)

    @contextlib.contextmanager
    def _deadline(self, blob: Blob, what: str) -> Iterator[None]:
        """Turn a wait longer than `read_deadline` into OriginError (EIO), never a hang."""
        try:
            with trio.fail_after(self.cfg.read_deadline):
                yield
        except trio.TooSlowError:
            raise OriginError(
                f"blob {blob.sha1}: {what} not available within {self.cfg.read_deadline:g}s"
            ) from None

    async def _fetch_and_verify(self, blob: Blob) -> None:
        """Fetch every missing chunk, then wait for the verdict; BlobCorrupt if it failed.

        The deadline applies to each chunk in turn, not to the whole blob: a large blob from a
        slow origin is fine as long as it keeps arriving.
        """
        while not blob.hashing.verdict.is_set():
            wake = blob.wake
            for idx in range(blob.nchunks):
                self._start_flight(blob, idx, direct=True)
            for idx in range(blob.nchunks):
                with self._deadline(blob, f"chunk {idx}"):
                    await self._ensure(blob, [idx])
            self.nursery.start_soon(self.hashing.advance, blob)
            # The verdict, or a chunk lost before it was durable (fetch it again, go on).
            await wake.wait()
        if blob.state == "corrupt":
            raise BlobCorrupt.of(blob.sha1)

    # -- fetching ----------------------------------------------------------------------------

    async def _ensure(self, blob: Blob, idxs: list[int]) -> None:
        """Wait until chunks `idxs` are readable, starting the flights that are missing."""
        flights = blob.flights
        for idx in idxs:
            self._start_flight(blob, idx)
        for idx in idxs:
            while idx not in blob.readable:
                if blob.state == "corrupt":
                    raise BlobCorrupt.of(blob.sha1)
                event = flights.running.get(idx)
                if event is None:
                    failure = flights.failures.pop(idx, None)
                    if failure is not None:
                        raise failure
                    self._start_flight(blob, idx)
                    continue
                await event.wait()
                if idx not in blob.readable and idx in flights.failures:
                    raise flights.failures[idx]

    def _start_flight(self, blob: Blob, idx: int, direct: bool = False) -> None:
        """Single-flight: at most one fetch per chunk; no await between check and claim.

        `direct`: for a sequential reader (readahead, a whole-blob fetch), whose chunks are
        served from memory as they land: the data file gets them with O_DIRECT. A random
        reader's chunk goes through the page cache, which serves its later reads.
        """
        flights = blob.flights
        if idx in blob.readable or idx in flights.running or blob.state == "corrupt":
            return
        flights.running[idx] = trio.Event()
        flights.failures.pop(idx, None)
        self.nursery.start_soon(self._flight, blob, idx, direct)

    async def _flight(self, blob: Blob, idx: int, direct: bool) -> None:
        """Fetch chunk `idx` (by range, else with the whole body) and hand it to writeback."""
        slot = False
        try:
            if direct:
                # Chunks fetched but not yet written are held in memory: bound them.
                await self.writeback.slots.acquire()
                slot = True
            if blob.ranges:
                try:
                    data = await self._fetch_range(blob, idx)
                    slot = False  # from here the writer gives it back
                    await self.writeback.store_chunk(blob, idx, data, direct)
                except RangeNotSupported as exc:
                    log.warning("%s; streaming the whole body once instead", exc)
                    blob.ranges = False
                    await self._db(self.catalog.set_ranges, blob.sha1, False)
            if not blob.ranges and idx not in blob.readable:
                # No overall deadline on a whole body: the HTTP read timeout catches a stall,
                # and readers waiting on a chunk have their own deadlines.
                await self._whole_body(blob)
                if idx not in blob.readable and blob.flights.whole_error is not None:
                    raise blob.flights.whole_error
        except StoreError as exc:
            self.metrics.fetch_errors.inc()
            blob.flights.failures[idx] = exc
            log.error("blob %s: chunk %d: %s", blob.sha1, idx, exc)
        finally:
            if slot:
                self.writeback.slots.release()
            blob.flights.running.pop(idx).set()
        await self._maybe_close(blob)

    async def _fetch_range(self, blob: Blob, idx: int) -> Chunk:
        async with blob.flights.requests:
            # The deadline starts once a request slot is ours: queueing behind this blob's
            # other chunks is progress, not a stalled origin.
            start, end = blob.span(idx)
            began = trio.current_time()
            with self._deadline(blob, f"chunk {idx}"):
                data = await self.origin.fetch_range(blob.urls, start, end, blob.size)
            self.metrics.fetched(len(data), trio.current_time() - began)
        return data

    async def _whole_body(self, blob: Blob) -> None:
        """Single-flight stream of the whole body when the origin ignores Range."""
        flights = blob.flights
        if flights.whole is not None:
            await flights.whole.wait()
            return
        flights.whole = trio.Event()
        flights.whole_error = None
        aligner = ChunkAligner(blob.size, blob.chunk_size)

        async def consume(offset: int, piece: bytes) -> None:
            self.metrics.origin_bytes.inc(len(piece))
            for idx, chunk in aligner.feed(offset, piece):
                if idx not in blob.readable:
                    await self.writeback.store_chunk(blob, idx, chunk)

        try:
            await self.origin.stream_whole(blob.urls, blob.size, consume)
        except StoreError as exc:
            flights.whole_error = exc
        finally:
            event, flights.whole = flights.whole, None
            event.set()

    async def drain(self) -> None:
        """Return once every fetched chunk is written and recorded (or given up on)."""
        while any(blob.disk.unrecorded for blob in self.blobs.values()):
            await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_store(cfg: StoreConfig) -> AsyncIterator[Store]:
    """A Store with its catalog, HTTP client and nursery; everything closed on exit."""
    catalog = await trio.to_thread.run_sync(Catalog, cfg.cache_dir)
    policy = NetPolicy.from_cidrs(cfg.allowed_networks)
    # Enough chunk buffers for the requests in flight, the recent chunks and a few being
    # written or hashed; more are allocated (and freed) when a burst needs them.
    pool = BufferPool(cfg.chunk_size, cfg.max_requests + RECENT_CHUNKS + 2)
    origin = Origin(
        cfg.connect_timeout, cfg.socket_timeout, cfg.retries, policy, cfg.http_proxy, pool
    )
    try:
        async with trio.open_nursery() as nursery:
            store = Store(cfg, catalog, origin, nursery)
            await store.start()
            try:
                yield store
            finally:
                # Chunks already fetched are kept: a stop right after a read (an unmount,
                # `systemctl stop`) should not throw away what it just downloaded.
                with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_S):
                    await store.drain()
                nursery.cancel_scope.cancel()
        store.close_all()
    finally:
        with trio.CancelScope(shield=True):
            await origin.aclose()
        catalog.close()
