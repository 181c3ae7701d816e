"""Write-behind and durability: how a fetched chunk reaches the disk and the catalog.

A fetched chunk becomes *readable* here (`WriteBack.store_chunk`) and, later, *present*: its
pwrite returned, an fdatasync that started after it returned (`_wait_durable`, one group commit
per blob at a time), and `Catalog.mark_chunk` committed (`_commit_chunk`). Readers never wait
for the second step: until a crash, memory or the page cache serves the bytes; after one, the
catalog lists only durable chunks.

Two paths. A random reader's chunk is written through the page cache at once and is readable
when its pwrite returns. A sequential reader's chunk (readahead, a whole-blob fetch) is
readable at once from memory and written behind by the blob's one writer task with O_DIRECT,
so fetching and writing overlap instead of adding up.

The store passes its seams in (`db`/`io` runners, the budget, the catalog, callbacks), as
`Budget` takes its own, so this module imports neither `store.py` nor `hashing.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from imgstore.blob import RECENT_CHUNKS, Blob, Chunk
from imgstore.budget import Budget, Runner
from imgstore.catalog import Catalog
from imgstore.chunks import allocated_path
from imgstore.errors import CacheFull, StoreError

log = logging.getLogger(__name__)

# Neighbouring chunks waiting to be written behind go to the disk in one pwritev of up to this
# many: each write is a thread hop, and the writes of a blob are one chain.
WRITE_RUN = 4
# How often a writer waiting for the hasher looks again, should a signal be missed (the
# hasher signals each step, and when it stops).
HASH_WAIT_S = 0.1
# How long an fdatasync waits for more chunks to cover while a blob is being fetched: it costs
# a journal commit and a disk flush whatever it covers.
SYNC_BATCH_S = 0.05

BlobTask = Callable[[Blob], Awaitable[None]]


class WriteBack:
    """Writes fetched chunks within the budget and makes them durable, blob by blob."""

    def __init__(
        self,
        catalog: Catalog,
        budget: Budget,
        db: Runner,
        io: Runner,
        nursery: trio.Nursery,
        *,
        advance_hash: BlobTask,
        maybe_close: BlobTask,
        on_unstored: Callable[[Blob, int, StoreError], None],
    ) -> None:
        self.catalog = catalog
        self.budget = budget
        self._db = db
        self._io = io
        self.nursery = nursery
        self._advance_hash = advance_hash
        self._maybe_close = maybe_close
        self._on_unstored = on_unstored
        # Slots for chunks of sequential readers held in memory until written: a flight takes
        # one before it fetches, the writer gives it back once the chunk is written.
        self.slots = trio.Semaphore(RECENT_CHUNKS)

    async def store_chunk(self, blob: Blob, idx: int, data: Chunk, direct: bool = False) -> None:
        """Make a fetched chunk readable; it is recorded in the catalog once durable.

        A buffered chunk is readable once written. A `direct` one (a sequential reader's,
        holding a slot) is readable at once, from memory, and written behind. Raises
        StoreError (a buffered write).
        """
        generation = blob.generation
        start, end = blob.span(idx)
        assert len(data) == end - start
        if direct:
            blob.unwritten[idx] = data
            blob.disk.queue[idx] = (generation, data)
            blob.make_readable(idx)
            blob.disk.unrecorded += 1
            if not blob.disk.writer_running:
                blob.disk.writer_running = True
                self.nursery.start_soon(self._write_behind, blob)
            self.nursery.start_soon(self._advance_hash, blob)
            return
        if not await self._write(blob, generation, idx, [data], direct=False):
            return
        blob.make_readable(idx)
        blob.remember(idx, data)
        blob.disk.unrecorded += 1
        self.nursery.start_soon(self._commit_chunk, blob, generation, idx)
        self.nursery.start_soon(self._advance_hash, blob)

    async def _write(
        self, blob: Blob, generation: int, idx: int, pieces: list[Chunk], direct: bool
    ) -> bool:
        """pwrite chunks idx, idx+1, ... within the budget; False if the blob was dropped."""
        start = blob.span(idx)[0]
        length = sum(len(p) for p in pieces)
        # The write lock first: a chunk waiting for its turn holds no reservation, so a small
        # disk is not "full" of reservations for writes that cannot run yet. Under the lock,
        # nothing is written into a blob whose data was just dropped (`corrupt` holds it).
        async with blob.disk.lock, self.budget.reserve(blob.sha1, length):
            if blob.generation != generation or blob.state == "corrupt":
                return False
            try:
                alloc = await self._io(blob.data.write_many, start, pieces, direct)
            except CacheFull:
                # The disk is fuller than the budget knows: make room once, then give up.
                await self.budget.make_room(blob.sha1, length, force=True)
                alloc = await self._io(blob.data.write_many, start, pieces, direct)
            blob.disk.written += 1
            await self._note_allocated(blob, alloc)
        return True

    async def _write_behind(self, blob: Blob) -> None:
        """Write the chunks readers already have from memory; then commit each like any other.

        One task per blob takes what is waiting, lowest first, neighbours together: while
        one run is written, the next chunks queue up and go in one pwritev.
        """
        queue = blob.disk.queue
        try:
            while queue:
                first = min(queue)
                if _hash_lags(blob, first):
                    # A written chunk stays in memory only while it is among the recent ones:
                    # written too far ahead of the hasher, it would be read back from the disk
                    # to be hashed. Waiting here holds its slot, which holds back the fetches:
                    # the pipeline goes at the pace of its slowest chain.
                    with trio.move_on_after(HASH_WAIT_S):
                        await blob.hashing.moved.wait()
                    continue
                generation = queue[first][0]
                run = [first]
                while len(run) < WRITE_RUN:
                    queued = queue.get(run[-1] + 1)
                    if queued is None or queued[0] != generation:
                        break
                    run.append(run[-1] + 1)
                await self._write_run(blob, generation, [(i, queue.pop(i)[1]) for i in run])
        finally:
            blob.disk.writer_running = False

    async def _write_run(
        self, blob: Blob, generation: int, chunks: list[tuple[int, Chunk]]
    ) -> None:
        try:
            written = await self._write(
                blob, generation, chunks[0][0], [data for _, data in chunks], direct=True
            )
        except StoreError as exc:
            for idx, _ in chunks:
                self._on_unstored(blob, idx, exc)
                blob.lose(idx)
                blob.flights.failures[idx] = exc  # a reader waiting for it gets this
            written = False
        finally:
            for _ in chunks:
                self.slots.release()  # taken by the flight that fetched it
        kept = written and blob.generation == generation and blob.state != "corrupt"
        for idx, data in chunks:
            if blob.unwritten.pop(idx, None) is not None and kept:
                blob.remember(idx, data)
            if kept:
                self.nursery.start_soon(self._commit_chunk, blob, generation, idx)
            else:
                blob.disk.unrecorded -= 1
        if not kept:
            await self._maybe_close(blob)

    async def _commit_chunk(self, blob: Blob, generation: int, idx: int) -> None:
        """Make a written chunk durable, then mark it in the catalog: it is present then."""
        start, end = blob.span(idx)
        try:
            try:
                await self._wait_durable(blob)
            except StoreError as exc:
                self._on_unstored(blob, idx, exc)
                blob.lose(idx)
                return
            await self._note_allocated(blob, blob.disk.synced_alloc)
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
            blob.disk.unrecorded -= 1
            await self._maybe_close(blob)

    async def _note_allocated(self, blob: Blob, alloc: int) -> None:
        if blob.state == "corrupt":
            # Its data was dropped, maybe after `alloc` was measured (a sync that ended after
            # the verdict): count what the file holds now.
            self.budget.set_allocated(blob.sha1, await self._io(allocated_path, blob.data.path))
        else:
            self.budget.grow_allocated(blob.sha1, max(alloc, blob.disk.synced_alloc))

    async def _wait_durable(self, blob: Blob) -> None:
        """Return once every pwrite of this blob done before the call is durable.

        Group commit: one fdatasync at a time per blob; it covers every chunk written before
        it started, so chunks that land while it runs wait for the next one, which covers them
        all. An fdatasync costs a journal commit and a disk flush whatever it covers.
        """
        disk = blob.disk
        target = disk.written
        while disk.synced < target:
            if disk.syncing is not None:
                await disk.syncing.wait()
                continue
            disk.syncing = trio.Event()
            if blob.flights.running or blob.unwritten:
                # More chunks are on their way: let them join this fdatasync. Readers do not
                # wait for it.
                await trio.sleep(SYNC_BATCH_S)
            upto = disk.written
            try:
                disk.synced_alloc = await self._io(blob.data.sync)
                disk.synced = max(disk.synced, upto)
            finally:
                event, disk.syncing = disk.syncing, None
                event.set()


def _hash_lags(blob: Blob, idx: int) -> bool:
    """Whether writing chunks from `idx` now would push unhashed ones out of memory.

    Only while the hasher is busy (its next chunk is readable), which it cannot stay for
    long. A hasher that waits for a chunk must not stop the writes: the chunk may be slow
    to come, need a slot held by a chunk waiting here, or never be fetched (a reader that
    started mid-blob).
    """
    if blob.hashing.verdict.is_set() or blob.state == "corrupt":
        return False
    next_idx = blob.hashing.hasher.hashed // blob.chunk_size
    if idx - next_idx <= RECENT_CHUNKS - WRITE_RUN:
        return False
    return next_idx in blob.readable
