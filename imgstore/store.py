"""The block cache: open blobs, single-flight chunk fetches, readahead, verification, budget.

This is what `fs.py` translates and what `imgstore fetch` drives. It runs on one trio thread;
disk I/O, hashing and SQLite go through `trio.to_thread` under limiters. The invariants (what
guards a chunk, how waiters are woken, what is persisted when) are in docs/imgstore-design.md.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import trio

from imgstore.budget import Budget
from imgstore.buffers import BufferPool, ChunkBuffer
from imgstore.catalog import BlobRecord, Catalog
from imgstore.chunks import DataFile, chunk_count, chunk_span, chunks_touching
from imgstore.config import StoreConfig
from imgstore.errors import BlobCorrupt, CacheFull, OriginError, StoreError
from imgstore.fetcher import Origin, RangeNotSupported
from imgstore.metrics import StoreMetrics
from imgstore.netpolicy import NetPolicy
from imgstore.verify import PrefixHasher

log = logging.getLogger(__name__)

T = TypeVar("T")
# What reads return: pyfuse3 takes any contiguous buffer, so cached bytes are not copied again.
Buffer = bytes | bytearray | memoryview

# Chunks kept in memory after they became readable, per blob: a sequential reader is served
# from them without a thread hop per request, and the hasher reads them instead of the disk.
# As many as the readahead window holds (32 MiB of 4 MiB chunks): a sequential reader's
# chunks are written with O_DIRECT, so the page cache does not have them.
RECENT_CHUNKS = 8
# The most chunks one hash step (one thread hop) takes, when the hasher lags.
HASH_BATCH = 4
# Neighbouring chunks waiting to be written behind go to the disk in one pwritev of up to this
# many: each write is a thread hop, and the writes of a blob are one chain.
WRITE_RUN = 4
# How often a writer waiting for the hasher looks again, should a signal be missed (the
# hasher signals each step, and when it stops).
HASH_WAIT_S = 0.1
# How long an fdatasync waits for more chunks to cover while a blob is being fetched.
SYNC_BATCH_S = 0.05
# At shutdown, how long to wait for fetched chunks to be written and recorded.
DRAIN_S = 5.0
# Reads the page cache holds are served on the trio thread (RWF_NOWAIT never waits for the
# disk); others take a worker thread.
_NOWAIT_READS = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")


class Blob:
    """This process's live state of one blob; exists while the blob is open or busy."""

    def __init__(self, rec: BlobRecord, data: DataFile, present: dict[int, int], max_requests: int):
        self.sha1 = rec.sha1
        self.size = rec.size
        self.chunk_size = rec.chunk_size
        self.generation = rec.generation
        self.ranges = rec.ranges
        self.urls = list(rec.urls)
        self.state = rec.state
        self.data = data
        self.nchunks = chunk_count(rec.size, rec.chunk_size)
        # Chunks whose bytes are durable and recorded in the catalog: index -> length.
        self.present = present
        # Chunks readers and the hasher may use now: in the data file (maybe not durable
        # yet) or in `unwritten`, in memory, until written behind. A superset of `present`:
        # recorded once an fdatasync covered the chunk's write (Store._record).
        self.readable = dict(present)
        self.recording = 0  # chunks readable but not yet recorded
        self.hash_stale = False  # a hashed chunk was lost before it was recorded
        self.wake = trio.Event()  # set (and replaced) when a chunk is lost, and at the verdict
        # Chunks being fetched: index -> event set when the flight ends (success or not).
        self.inflight: dict[int, trio.Event] = {}
        self.failures: dict[int, StoreError] = {}
        # Copies of the last few present chunks (index -> bytes), oldest first; only chunks in
        # `present`, cleared with it.
        self.recent: OrderedDict[int, bytes | ChunkBuffer] = OrderedDict()
        # Readable chunks not yet in the data file (Store._write_behind): served from here.
        self.unwritten: dict[int, bytes | ChunkBuffer] = {}
        # Of those, the ones the writer has not taken yet: index -> (generation, bytes).
        self.to_write: dict[int, tuple[int, bytes | ChunkBuffer]] = {}
        self.writing = False  # a `_write_behind` task is running for this blob
        self.hash_moved = trio.Event()  # set (and replaced) when the hasher advances or stops
        self.whole: trio.Event | None = None  # set when a whole-body stream ends
        self.whole_error: StoreError | None = None
        self.requests = trio.CapacityLimiter(max_requests)
        # Group commit (see Store._durable): pwrites done, pwrites known durable, and the
        # event of the fdatasync running now, if any.
        self.writes = 0
        # One pwrite at a time per blob: parallel writers of one file only spin on its inode
        # lock (a profile had that at 6 % of the daemon's CPU).
        self.write_lock = trio.Lock()
        self.synced = 0
        self.syncing: trio.Event | None = None
        self.synced_alloc = 0  # the data file's allocated bytes after the latest fdatasync
        self.hasher = PrefixHasher(rec.sha1, rec.size)
        self.hash_lock = trio.Lock()
        self.verdict = trio.Event()
        if rec.state in ("verified", "corrupt"):
            self.verdict.set()
        self.opens = 0
        self.closed = False

    @property
    def cached_bytes(self) -> int:
        return sum(self.present.values())

    def complete(self) -> bool:
        return len(self.present) == self.nchunks

    def remember(self, idx: int, data: bytes | ChunkBuffer) -> None:
        self.recent[idx] = data
        while len(self.recent) > RECENT_CHUNKS:
            self.recent.popitem(last=False)

    def memory(self, idx: int) -> bytes | ChunkBuffer | None:
        """Chunk `idx`'s bytes if this process holds them in memory."""
        data = self.unwritten.get(idx)
        return data if data is not None else self.recent.get(idx)

    def from_memory(self, off: int, end: int) -> memoryview | None:
        """Bytes [off, end) if they lie in one remembered chunk, else None.

        A view, not a copy: pyfuse3 copies it into its reply before anything else runs.
        """
        idx = off // self.chunk_size
        data = self.memory(idx)
        if data is None or (end - 1) // self.chunk_size != idx:
            return None
        start = idx * self.chunk_size
        return memoryview(data)[off - start : end - start]


@dataclasses.dataclass
class Handle:
    """One open file: what it has read, and its sequential-read state for readahead."""

    blob: Blob
    # Disjoint, sorted spans this handle has read, and their total: a random reader makes
    # thousands, so each read costs a bisect, not a sort of them all.
    covered: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    covered_bytes: int = 0
    # Reads of this handle still in progress count as covered when deciding whether a read
    # completes the handle: of two concurrent reads, the later one is gated.
    pending: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    next_off: int = 0
    window: int = 0
    advised: int = 0  # the page cache was asked to read the data file up to here

    def would_complete(self, start: int, end: int) -> bool:
        """True if reading [start, end) makes this handle's reads cover the whole blob."""
        extra = end - start + sum(e - s for s, e in self.pending)
        if self.covered_bytes + extra < self.blob.size:
            return False  # too few bytes, whatever they are
        return _covers(_merge([*self.covered, *self.pending, (start, end)]), self.blob.size)

    def add(self, start: int, end: int) -> None:
        spans = self.covered
        i = bisect.bisect_left(spans, (start,))
        if i and spans[i - 1][1] >= start:
            i -= 1
            start = spans[i][0]
        j = i
        while j < len(spans) and spans[j][0] <= end:
            end = max(end, spans[j][1])
            j += 1
        self.covered_bytes += end - start - sum(e - s for s, e in spans[i:j])
        spans[i:j] = [(start, end)]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _covers(spans: list[tuple[int, int]], size: int) -> bool:
    return size == 0 or (len(spans) == 1 and spans[0][0] <= 0 and spans[0][1] >= size)


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
        self._open_lock = trio.Lock()
        # Slots for chunks a sequential reader's flights fetch and `_write_behind` writes.
        self.behind = trio.Semaphore(RECENT_CHUNKS)
        # The trio thread's buffer for reads from the page cache, reused: a fresh 1 MiB per
        # read cost page faults. Safe because nothing awaits between filling it and pyfuse3
        # copying it into the reply (Store.read returns, Operations.read returns, it replies).
        self._read_buf = bytearray()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.db_limiter)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.io_limiter)

    async def start(self) -> None:
        """Learn what the cache holds now (allocated bytes of every data file)."""
        await self.budget.refresh()

    # -- open / release --------------------------------------------------------------------

    async def record(self, sha1: str) -> BlobRecord:
        return await self._db(self.catalog.get, sha1)

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
        if not blob.verdict.is_set():
            self.nursery.start_soon(self._advance_hash, blob)
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
        if blob.opens or blob.inflight or blob.recording or blob.hash_lock.locked():
            return
        if blob.whole is not None:
            return
        if blob.closed:
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

    # -- reading ---------------------------------------------------------------------------

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
                await self._verified(blob)
            elif not all(i in blob.readable for i in touched):
                # Only a read that must wait pays for a deadline (a cancel scope): a cached
                # 4 KiB read is mostly this function's own overhead.
                with self._deadline(blob, f"bytes {off}-{end - 1}"):
                    await self._ensure(blob, list(touched))
            data = blob.from_memory(off, end)
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
            start, stop = chunk_span(idx, blob.size, blob.chunk_size)
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
        await self._verified(handle.blob)

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

    async def _verified(self, blob: Blob) -> None:
        """Fetch every missing chunk, then wait for the verdict; BlobCorrupt if it failed.

        The deadline applies to each chunk in turn, not to the whole blob: a large blob from a
        slow origin is fine as long as it keeps arriving.
        """
        while not blob.verdict.is_set():
            wake = blob.wake
            for idx in range(blob.nchunks):
                self._start_flight(blob, idx, direct=True)
            for idx in range(blob.nchunks):
                with self._deadline(blob, f"chunk {idx}"):
                    await self._ensure(blob, [idx])
            self.nursery.start_soon(self._advance_hash, blob)
            # The verdict, or a chunk lost before it was durable (fetch it again, go on).
            await wake.wait()
        if blob.state == "corrupt":
            raise BlobCorrupt.of(blob.sha1)

    async def _ensure(self, blob: Blob, idxs: list[int]) -> None:
        """Wait until chunks `idxs` are readable, starting the flights that are missing."""
        for idx in idxs:
            self._start_flight(blob, idx)
        for idx in idxs:
            while idx not in blob.readable:
                if blob.state == "corrupt":
                    raise BlobCorrupt.of(blob.sha1)
                event = blob.inflight.get(idx)
                if event is None:
                    failure = blob.failures.pop(idx, None)
                    if failure is not None:
                        raise failure
                    self._start_flight(blob, idx)
                    continue
                await event.wait()
                if idx not in blob.readable and idx in blob.failures:
                    raise blob.failures[idx]

    def _start_flight(self, blob: Blob, idx: int, direct: bool = False) -> None:
        """Single-flight: at most one fetch per chunk; no await between check and claim.

        `direct`: for a sequential reader (readahead, a whole-blob fetch), whose chunks are
        served from memory as they land: the data file gets them with O_DIRECT. A random
        reader's chunk goes through the page cache, which serves its later reads.
        """
        if idx in blob.readable or idx in blob.inflight or blob.state == "corrupt":
            return
        blob.inflight[idx] = trio.Event()
        blob.failures.pop(idx, None)
        self.nursery.start_soon(self._flight, blob, idx, direct)

    async def _flight(self, blob: Blob, idx: int, direct: bool) -> None:
        slot = False
        try:
            if direct:
                # Chunks fetched but not yet written are held in memory: bound them.
                await self.behind.acquire()
                slot = True
            if blob.ranges:
                try:
                    async with blob.requests:
                        # The deadline starts once a request slot is ours: queueing behind
                        # this blob's other chunks is progress, not a stalled origin.
                        start, end = chunk_span(idx, blob.size, blob.chunk_size)
                        began = trio.current_time()
                        with self._deadline(blob, f"chunk {idx}"):
                            data = await self.origin.fetch_range(blob.urls, start, end, blob.size)
                        self.metrics.fetched(len(data), trio.current_time() - began)
                    slot = False  # from here `_write_behind` gives it back
                    await self._store_chunk(blob, idx, data, direct)
                except RangeNotSupported as exc:
                    log.warning("%s; streaming the whole body once instead", exc)
                    blob.ranges = False
                    await self._db(self.catalog.set_ranges, blob.sha1, False)
            if not blob.ranges and idx not in blob.readable:
                # No overall deadline on a whole body: the HTTP read timeout catches a stall,
                # and readers waiting on a chunk have their own deadlines.
                await self._whole_body(blob)
                if idx not in blob.readable and blob.whole_error is not None:
                    raise blob.whole_error
        except StoreError as exc:
            self.metrics.fetch_errors.inc()
            blob.failures[idx] = exc
            log.error("blob %s: chunk %d: %s", blob.sha1, idx, exc)
        finally:
            if slot:
                self.behind.release()
            blob.inflight.pop(idx).set()
        await self._maybe_close(blob)

    async def _whole_body(self, blob: Blob) -> None:
        """Single-flight stream of the whole body when the origin ignores Range."""
        if blob.whole is not None:
            await blob.whole.wait()
            return
        blob.whole = trio.Event()
        blob.whole_error = None
        pending = bytearray()
        pending_start = 0

        async def consume(offset: int, piece: bytes) -> None:
            nonlocal pending, pending_start
            self.metrics.origin_bytes.inc(len(piece))
            if offset != pending_start + len(pending):
                # The body broke and restarted from 0: what is pending belongs to the broken
                # answer and must not be joined to the new one's bytes.
                pending.clear()
                pending_start = offset
            pending += piece
            while pending:
                idx = pending_start // blob.chunk_size
                start, end = chunk_span(idx, blob.size, blob.chunk_size)
                if pending_start != start:  # restarted body: realign on the next chunk
                    skip = min(len(pending), end - pending_start)
                    del pending[:skip]
                    pending_start += skip
                    continue
                if len(pending) < end - start:
                    return
                chunk = bytes(pending[: end - start])
                del pending[: end - start]
                pending_start = end
                if idx not in blob.readable:
                    await self._store_chunk(blob, idx, chunk)

        try:
            await self.origin.stream_whole(blob.urls, blob.size, consume)
        except StoreError as exc:
            blob.whole_error = exc
        finally:
            event, blob.whole = blob.whole, None
            event.set()

    async def _store_chunk(
        self, blob: Blob, idx: int, data: bytes | ChunkBuffer, direct: bool = False
    ) -> None:
        """Make a fetched chunk readable; it is recorded in the catalog once durable.

        Readers need not wait for the fdatasync and the catalog: until a crash the page cache
        (or memory) serves the bytes, and after one the catalog lists only durable chunks.
        A buffered chunk is readable once written. A `direct` one (a sequential reader's) is
        readable at once, from memory, and written behind (`_write_behind`): reading and
        writing the disk overlap instead of adding up. Raises StoreError (a buffered write).
        """
        generation = blob.generation
        start, end = chunk_span(idx, blob.size, blob.chunk_size)
        assert len(data) == end - start
        if direct:
            blob.unwritten[idx] = data
            blob.to_write[idx] = (generation, data)
            self._readable(blob, idx)
            blob.recording += 1
            if not blob.writing:
                blob.writing = True
                self.nursery.start_soon(self._write_behind, blob)
            self.nursery.start_soon(self._advance_hash, blob)
            return
        if not await self._write(blob, generation, idx, [data], direct=False):
            return
        self._readable(blob, idx)
        blob.remember(idx, data)
        blob.recording += 1
        self.nursery.start_soon(self._record, blob, generation, idx)
        self.nursery.start_soon(self._advance_hash, blob)

    @staticmethod
    def _readable(blob: Blob, idx: int) -> None:
        start, end = chunk_span(idx, blob.size, blob.chunk_size)
        blob.readable[idx] = end - start
        if blob.state == "remote":
            blob.state = "partial"  # the state xattr: a reader has bytes (the catalog follows)

    async def _write(
        self,
        blob: Blob,
        generation: int,
        idx: int,
        pieces: list[bytes | ChunkBuffer],
        direct: bool,
    ) -> bool:
        """pwrite chunks idx, idx+1, ... within the budget; False if the blob was dropped."""
        start = chunk_span(idx, blob.size, blob.chunk_size)[0]
        length = sum(len(p) for p in pieces)
        # The write lock first: a chunk waiting for its turn holds no reservation, so a small
        # disk is not "full" of reservations for writes that cannot run yet. Under the lock,
        # nothing is written into a blob whose data was just dropped (`_corrupt` holds it).
        async with blob.write_lock, self.budget.reserve(blob.sha1, length):
            if blob.generation != generation or blob.state == "corrupt":
                return False
            try:
                alloc = await self._io(blob.data.write_many, start, pieces, direct)
            except CacheFull:
                # The disk is fuller than the budget knows: make room once, then give up.
                await self.budget.make_room(blob.sha1, length, force=True)
                alloc = await self._io(blob.data.write_many, start, pieces, direct)
            blob.writes += 1
            self._note_allocated(blob, alloc)
        return True

    async def _write_behind(self, blob: Blob) -> None:
        """Write the chunks readers already have from memory; then record each like any other.

        One task per blob takes what is waiting, lowest first, neighbours together: while
        one run is written, the next chunks queue up and go in one pwritev.
        """
        try:
            while blob.to_write:
                first = min(blob.to_write)
                if self._hash_lags(blob, first):
                    # A written chunk stays in memory only while it is among the recent ones:
                    # written too far ahead of the hasher, it would be read back from the disk
                    # to be hashed. Waiting here holds its write-behind slot, which holds back
                    # the fetches: the pipeline goes at the pace of its slowest chain.
                    with trio.move_on_after(HASH_WAIT_S):
                        await blob.hash_moved.wait()
                    continue
                generation = blob.to_write[first][0]
                run = [first]
                while len(run) < WRITE_RUN:
                    queued = blob.to_write.get(run[-1] + 1)
                    if queued is None or queued[0] != generation:
                        break
                    run.append(run[-1] + 1)
                await self._write_run(blob, generation, [(i, blob.to_write.pop(i)[1]) for i in run])
        finally:
            blob.writing = False

    @staticmethod
    def _hash_lags(blob: Blob, idx: int) -> bool:
        """Whether writing chunks from `idx` now would push unhashed ones out of memory.

        Only while the hasher is busy (its next chunk is readable), which it cannot stay for
        long. A hasher that waits for a chunk must not stop the writes: the chunk may be slow
        to come, need a write-behind slot held by a chunk waiting here, or never be fetched
        (a reader that started mid-blob).
        """
        if blob.verdict.is_set() or blob.state == "corrupt":
            return False
        next_idx = blob.hasher.hashed // blob.chunk_size
        if idx - next_idx <= RECENT_CHUNKS - WRITE_RUN:
            return False
        return next_idx in blob.readable

    async def _write_run(
        self, blob: Blob, generation: int, chunks: list[tuple[int, bytes | ChunkBuffer]]
    ) -> None:
        try:
            written = await self._write(
                blob, generation, chunks[0][0], [data for _, data in chunks], direct=True
            )
        except StoreError as exc:
            for idx, _ in chunks:
                log.error("blob %s: chunk %d not stored: %s", blob.sha1, idx, exc)
                self.metrics.fetch_errors.inc()
                self._lose(blob, idx)
                blob.failures[idx] = exc  # a reader waiting for it gets this, as from a flight
            written = False
        finally:
            for _ in chunks:
                self.behind.release()  # taken by the flight that fetched it
        kept = written and blob.generation == generation and blob.state != "corrupt"
        for idx, data in chunks:
            if blob.unwritten.pop(idx, None) is not None and kept:
                blob.remember(idx, data)
            if kept:
                self.nursery.start_soon(self._record, blob, generation, idx)  # ends `recording`
            else:
                blob.recording -= 1
        if not kept:
            await self._maybe_close(blob)

    async def _record(self, blob: Blob, generation: int, idx: int) -> None:
        """Make a written chunk durable, then record it in the catalog: it is present then."""
        start, end = chunk_span(idx, blob.size, blob.chunk_size)
        try:
            try:
                await self._durable(blob)
            except StoreError as exc:
                log.error("blob %s: chunk %d not stored: %s", blob.sha1, idx, exc)
                self.metrics.fetch_errors.inc()
                self._lose(blob, idx)
                return
            self._note_allocated(blob, blob.synced_alloc)
            if blob.generation != generation or blob.state == "corrupt":
                return
            if await self._db(
                self.catalog.mark_chunk, blob.sha1, generation, idx, end - start, blob.nchunks
            ):
                blob.present[idx] = end - start
                if blob.state not in ("verified",):
                    blob.state = "complete" if blob.complete() else "partial"
                self.nursery.start_soon(self._advance_hash, blob)
        finally:
            blob.recording -= 1
            await self._maybe_close(blob)

    def _lose(self, blob: Blob, idx: int) -> None:
        """Forget a readable chunk that could not be made durable; it is fetched again."""
        blob.readable.pop(idx, None)
        blob.unwritten.pop(idx, None)
        blob.recent.pop(idx, None)
        blob.wake.set()
        blob.wake = trio.Event()
        start, _ = chunk_span(idx, blob.size, blob.chunk_size)
        if blob.hasher.hashed > start:
            # Its bytes were hashed, but the copy that would be recorded is not those bytes.
            blob.hash_stale = True

    def _note_allocated(self, blob: Blob, alloc: int) -> None:
        # Writes and syncs finish in any order, and a blob's file only grows while it is
        # written (dropping its data needs it closed, and a corrupt one is set to 0 after):
        # the largest figure seen is the latest.
        if blob.state == "corrupt":  # its data was dropped meanwhile: no "largest" rule
            self.budget.allocated[blob.sha1] = alloc
        else:
            self.budget.allocated[blob.sha1] = max(
                alloc, blob.synced_alloc, self.budget.allocated.get(blob.sha1, 0)
            )

    async def _durable(self, blob: Blob) -> None:
        """Return once every pwrite of this blob done before the call is durable.

        Group commit: one fdatasync at a time per blob; it covers every chunk written before
        it started, so chunks that land while it runs wait for the next one, which covers them
        all. An fdatasync costs a journal commit and a disk flush (~20 ms here) whatever it
        covers, so batching turns one flush per chunk into one per batch.
        """
        target = blob.writes
        while blob.synced < target:
            if blob.syncing is not None:
                await blob.syncing.wait()
                continue
            blob.syncing = trio.Event()
            if blob.inflight or blob.unwritten:
                # More chunks are on their way: let them join this fdatasync. Readers do not
                # wait for it, and one per chunk (250 per GiB) took a core's third.
                await trio.sleep(SYNC_BATCH_S)
            upto = blob.writes
            try:
                blob.synced_alloc = await self._io(blob.data.sync)
                blob.synced = max(blob.synced, upto)
            finally:
                event, blob.syncing = blob.syncing, None
                event.set()

    # -- verification ----------------------------------------------------------------------

    async def _advance_hash(self, blob: Blob) -> None:
        """Hash the contiguous prefix as far as it goes; give the verdict at the end.

        Whoever holds hash_lock loops until the next chunk is missing. The final presence
        check and the release happen with no await between them, so a chunk that lands while
        the lock is held is always seen by the holder: a caller finding the lock held may leave.
        """
        if blob.verdict.is_set() or blob.closed:  # closed: its fd may already be reused
            return
        try:
            blob.hash_lock.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            if blob.hash_stale:
                blob.hasher = PrefixHasher(blob.sha1, blob.size)
                blob.hash_stale = False
            while not blob.hasher.done:
                idx = blob.hasher.hashed // blob.chunk_size
                if idx not in blob.readable or blob.state == "corrupt":
                    return
                pieces = self._in_memory_run(blob, idx)
                if pieces:  # no need to read back what we just wrote
                    await self._io(_hash_pieces, blob.hasher, pieces)
                else:
                    start, end = chunk_span(idx, blob.size, blob.chunk_size)
                    await self._io(_hash_range, blob, start, end)
                del pieces
                _hash_stepped(blob)
            if blob.hasher.matches():
                if not blob.complete() or blob.hash_stale:
                    return  # the last recording calls again; "verified" needs all durable
                if await self._db(self.catalog.set_state, blob.sha1, blob.generation, "verified"):
                    blob.state = "verified"
                    self.metrics.verified.inc()
                    log.info("blob %s verified", blob.sha1)
            else:
                await self._corrupt(blob)
            blob.verdict.set()
            blob.wake.set()
        finally:
            blob.hash_lock.release()
            _hash_stepped(blob)
            self.nursery.start_soon(self._maybe_close, blob)

    @staticmethod
    def _in_memory_run(blob: Blob, idx: int) -> list[bytes | ChunkBuffer]:
        """Chunks idx, idx+1, ... that are readable and in memory, up to HASH_BATCH of them.

        The prefix hash is one chain, and each step a thread hop: when it falls behind, one
        hop takes all the chunks that have arrived meanwhile.
        """
        pieces = []
        while len(pieces) < HASH_BATCH and idx in blob.readable:
            data = blob.memory(idx)
            if data is None:
                break
            pieces.append(data)
            idx += 1
        return pieces

    async def _corrupt(self, blob: Blob) -> None:
        """Mark the blob corrupt, forget and free its cached bytes; readers get BlobCorrupt."""
        got = blob.hasher.hexdigest()
        log.error("blob %s failed verification: content has SHA-1 %s", blob.sha1, got)
        self.metrics.verification_failures.inc()
        # Record the verdict and its reason before any reader can see `corrupt`: a reader that
        # gets EIO asks the catalog why, and must find the computed SHA-1 there.
        await self._db(
            self.catalog.set_state,
            blob.sha1,
            blob.generation,
            "corrupt",
            f"content has SHA-1 {got}",
        )
        blob.state = "corrupt"
        blob.present.clear()
        blob.readable.clear()
        blob.unwritten.clear()
        blob.recent.clear()
        async with blob.write_lock:  # a write running now lands before the punch, not after
            await self._io(_punch_all, blob.data)
        self.budget.allocated[blob.sha1] = 0

    async def drain(self) -> None:
        """Return once every fetched chunk is written and recorded (or given up on)."""
        while any(blob.recording for blob in self.blobs.values()):
            await trio.sleep(0.01)

    async def verify_cached(self, handle: Handle) -> bool:
        """Hash every cached byte again (for `imgstore verify`); False if not fully cached."""
        blob = handle.blob
        if not blob.complete():
            return False
        async with blob.hash_lock:
            hasher = PrefixHasher(blob.sha1, blob.size)
            for idx in range(blob.nchunks):
                start, end = chunk_span(idx, blob.size, blob.chunk_size)
                data = await self._io(blob.data.pread, start, end - start)
                await self._io(hasher.update, data)
            blob.hasher = hasher
            if hasher.matches():
                await self._db(self.catalog.set_state, blob.sha1, blob.generation, "verified")
                blob.state = "verified"
            else:
                await self._corrupt(blob)
            blob.verdict.set()
            blob.wake.set()
        return True


def _hash_stepped(blob: Blob) -> None:
    """Wake a writer waiting for the hasher (`Store._write_behind`)."""
    blob.hash_moved.set()
    blob.hash_moved = trio.Event()


def _hash_pieces(hasher: PrefixHasher, pieces: list[bytes | ChunkBuffer]) -> None:
    for data in pieces:
        hasher.update(data)


def _hash_range(blob: Blob, start: int, end: int) -> None:
    blob.hasher.update(blob.data.pread(start, end - start))


def _punch_all(data: DataFile) -> None:
    os.ftruncate(data.fd, 0)
    os.ftruncate(data.fd, data.size)


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
