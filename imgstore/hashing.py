"""The prefix hash of each blob, and the SHA-1 verdict: `verified`, or `corrupt` and dropped.

`Hashing.advance` feeds a blob's `PrefixHasher` with its readable chunks in order (from memory
if this process still holds them, else from the data file) and, at the end of the blob, gives
the verdict: it is made here and nowhere else. A match becomes `verified` only once every chunk
is also present (durable and recorded), so the catalog never calls verified bytes that a crash
could lose; the last chunk to be recorded calls `advance` again for that.

The store passes its seams in: the `db`/`io` runners, the budget, and callbacks for what the
store reports (log lines, metrics) and for closing an idle blob, so this module imports neither
`store.py` nor `writeback.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio

from imgstore.blob import Blob, Chunk
from imgstore.budget import Budget, Runner
from imgstore.catalog import Catalog
from imgstore.chunks import DataFile
from imgstore.verify import PrefixHasher

log = logging.getLogger(__name__)

# The most chunks one hash step (one thread hop) takes, when the hasher lags: the prefix hash
# is one chain, and each step a thread hop.
HASH_BATCH = 4

BlobTask = Callable[[Blob], Awaitable[None]]


class Hashing:
    """Feeds every open blob's prefix hash and makes its verdict."""

    def __init__(
        self,
        catalog: Catalog,
        budget: Budget,
        db: Runner,
        io: Runner,
        nursery: trio.Nursery,
        *,
        on_verified: Callable[[Blob], None],
        on_mismatch: Callable[[Blob, str], None],
        maybe_close: BlobTask,
    ) -> None:
        self.catalog = catalog
        self.budget = budget
        self._db = db
        self._io = io
        self.nursery = nursery
        self._on_verified = on_verified
        self._on_mismatch = on_mismatch
        self._maybe_close = maybe_close

    async def advance(self, blob: Blob) -> None:
        """Hash the contiguous prefix as far as it goes; give the verdict at the end.

        Whoever holds the hash lock loops until the next chunk is missing. The final presence
        check and the release happen with no await between them, so a chunk that lands while
        the lock is held is always seen by the holder: a caller finding the lock held may leave.
        """
        state = blob.hashing
        if state.verdict.is_set() or blob.closed:  # closed: its fd may already be reused
            return
        try:
            state.lock.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            if state.stale:
                state.hasher = PrefixHasher(blob.sha1, blob.size)
                state.stale = False
            while not state.hasher.done:
                idx = state.hasher.hashed // blob.chunk_size
                if idx not in blob.readable or blob.state == "corrupt":
                    return
                pieces = _in_memory_run(blob, idx)
                if pieces:  # no need to read back what we just wrote
                    await self._io(_hash_pieces, state.hasher, pieces)
                else:
                    start, end = blob.span(idx)
                    await self._io(_hash_range, blob, start, end)
                # Dropped before the next await: the pool reuses a buffer nobody refers to.
                del pieces
                _hash_stepped(blob)
            await self._verdict(blob)
        finally:
            state.lock.release()
            _hash_stepped(blob)
            self.nursery.start_soon(self._maybe_close, blob)

    async def _verdict(self, blob: Blob) -> None:
        """The whole blob is hashed: verified (once all of it is present) or corrupt."""
        if blob.hashing.hasher.matches():
            if not blob.complete() or blob.hashing.stale:
                return  # the last recording calls again; "verified" needs all durable
            if await self._db(self.catalog.set_state, blob.sha1, blob.generation, "verified"):
                blob.state = "verified"
                self._on_verified(blob)
        else:
            await self.corrupt(blob)
        blob.hashing.verdict.set()
        blob.wake.set()

    async def verify_cached(self, blob: Blob) -> bool:
        """Hash every cached byte again (for `imgstore verify`); False if not fully cached."""
        if not blob.complete():
            return False
        async with blob.hashing.lock:
            hasher = PrefixHasher(blob.sha1, blob.size)
            for idx in range(blob.nchunks):
                start, end = blob.span(idx)
                data = await self._io(blob.data.pread, start, end - start)
                await self._io(hasher.update, data)
            blob.hashing.hasher = hasher
            if hasher.matches():
                await self._db(self.catalog.set_state, blob.sha1, blob.generation, "verified")
                blob.state = "verified"
            else:
                await self.corrupt(blob)
            blob.hashing.verdict.set()
            blob.wake.set()
        return True

    async def corrupt(self, blob: Blob) -> None:
        """Mark the blob corrupt, forget and free its cached bytes; readers get BlobCorrupt."""
        got = blob.hashing.hasher.hexdigest()
        self._on_mismatch(blob, got)
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
        blob.forget_chunks()
        async with blob.disk.lock:  # a write running now lands before the punch, not after
            await self._io(_punch_all, blob.data)
        self.budget.set_allocated(blob.sha1, 0)


def _in_memory_run(blob: Blob, idx: int) -> list[Chunk]:
    """Chunks idx, idx+1, ... that are readable and in memory, up to HASH_BATCH of them.

    When the hasher falls behind, one thread hop takes all the chunks that arrived meanwhile.
    """
    pieces = []
    while len(pieces) < HASH_BATCH and idx in blob.readable:
        data = blob.memory(idx)
        if data is None:
            break
        pieces.append(data)
        idx += 1
    return pieces


def _hash_stepped(blob: Blob) -> None:
    """Wake a writer waiting for the hasher (`writeback.WriteBack._write_behind`)."""
    blob.hashing.moved.set()
    blob.hashing.moved = trio.Event()


def _hash_pieces(hasher: PrefixHasher, pieces: list[Chunk]) -> None:
    for data in pieces:
        hasher.update(data)


def _hash_range(blob: Blob, start: int, end: int) -> None:
    blob.hashing.hasher.update(blob.data.pread(start, end - start))


def _punch_all(data: DataFile) -> None:
    os.ftruncate(data.fd, 0)
    os.ftruncate(data.fd, data.size)
