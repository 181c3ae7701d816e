"""One blob's live state in this process: its chunk maps, its fetches, its writes, its hash.

A `Blob` exists while the blob is open or busy. It holds state only; the code that moves a
chunk from one map to the next lives in `store.py` (fetches), `writeback.py` (durability) and
`hashing.py` (the verdict). Everything here is touched on the trio thread only; the rules for
who may change what, and in which order, are in docs/imgstore-design.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import trio

from imgstore.buffers import ChunkBuffer
from imgstore.catalog import BlobRecord
from imgstore.chunks import DataFile, chunk_count, chunk_span
from imgstore.errors import StoreError
from imgstore.verify import PrefixHasher

log = logging.getLogger(__name__)

# Chunks kept in memory after they became readable, per blob: a sequential reader is served
# from them without a thread hop per request, and the hasher reads them instead of the disk.
# As many as the readahead window holds (32 MiB of 4 MiB chunks): a sequential reader's
# chunks are written with O_DIRECT, so the page cache does not have them.
RECENT_CHUNKS = 8

# A chunk's bytes in memory: a pooled buffer (fetched by range) or bytes (a whole-body stream).
Chunk = bytes | ChunkBuffer


@dataclasses.dataclass
class Flights:
    """The fetches of a blob's chunks: at most one per chunk (single flight)."""

    # Parallel requests for this blob's chunks, to its origin.
    requests: trio.CapacityLimiter
    # Chunks being fetched: index -> event set when the flight ends (success or not).
    running: dict[int, trio.Event] = dataclasses.field(default_factory=dict)
    # The error of a chunk's last failed flight, for the readers it woke.
    failures: dict[int, StoreError] = dataclasses.field(default_factory=dict)
    # While the one whole-body stream runs (the origin ignores Range): set when it ends.
    whole: trio.Event | None = None
    whole_error: StoreError | None = None


@dataclasses.dataclass
class DiskState:
    """What is on its way to the disk: the write-behind queue, its writer, the group commit."""

    # Chunks readable from memory that the writer has not taken yet: index -> (generation,
    # bytes). Lowest first, neighbours together, they become one pwritev.
    queue: dict[int, tuple[int, Chunk]] = dataclasses.field(default_factory=dict)
    writer_running: bool = False  # a write-behind task runs for this blob
    # Chunks readable but not yet recorded (written, synced, marked in the catalog).
    unrecorded: int = 0
    # One pwrite at a time per blob: parallel writers of one file only spin on its inode
    # lock, and ext4 takes it exclusively to fill holes with O_DIRECT.
    lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    # Group commit (writeback.py): pwrites done, pwrites known durable, and the event of the
    # fdatasync running now, if any.
    written: int = 0
    synced: int = 0
    syncing: trio.Event | None = None
    synced_alloc: int = 0  # the data file's allocated bytes after the latest fdatasync


@dataclasses.dataclass
class HashState:
    """The SHA-1 of the blob's contiguous readable prefix, and the verdict on it."""

    hasher: PrefixHasher
    # Held by the one task feeding the hasher (hashing.py says why it is taken without waiting).
    lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    stale: bool = False  # a hashed chunk was lost before it was recorded: hash again from 0
    # Set (and replaced) whenever the hasher advances or stops: a writer waiting for it looks.
    moved: trio.Event = dataclasses.field(default_factory=trio.Event)
    # Set once: the blob is `verified` or `corrupt`.
    verdict: trio.Event = dataclasses.field(default_factory=trio.Event)


@dataclasses.dataclass(frozen=True)
class BlobStatus:
    """What the mount's xattrs show of a blob: its state and cached bytes."""

    state: str
    cached_bytes: int


class Blob:
    """This process's live state of one blob; exists while the blob is open or busy."""

    def __init__(self, rec: BlobRecord, data: DataFile, present: dict[int, int], max_requests: int):
        self.sha1 = rec.sha1
        self.size = rec.size
        self.chunk_size = rec.chunk_size
        self.nchunks = chunk_count(rec.size, rec.chunk_size)
        self.generation = rec.generation
        self.ranges = rec.ranges
        self.urls = list(rec.urls)
        self.state = rec.state
        self.data = data
        # Chunks whose bytes are durable and recorded in the catalog: index -> length.
        self.present = present
        # Chunks readers and the hasher may use now: in the data file (maybe not durable
        # yet) or in `unwritten`, in memory, until written behind. A superset of `present`.
        self.readable = dict(present)
        # Readable chunks not yet in the data file: served from here until written.
        self.unwritten: dict[int, Chunk] = {}
        # Copies of the last few present chunks, oldest first; only chunks in `present`.
        self.recent: OrderedDict[int, Chunk] = OrderedDict()
        self.wake = trio.Event()  # set (and replaced) when a chunk is lost, and at the verdict
        self.flights = Flights(trio.CapacityLimiter(max_requests))
        self.disk = DiskState()
        self.hashing = HashState(PrefixHasher(rec.sha1, rec.size))
        if rec.state in ("verified", "corrupt"):
            self.hashing.verdict.set()
        self.opens = 0
        self.closed = False

    @property
    def cached_bytes(self) -> int:
        return sum(self.present.values())

    def complete(self) -> bool:
        return len(self.present) == self.nchunks

    def busy(self) -> bool:
        """Whether a handle, a fetch, a write or the hasher still needs the data file."""
        return bool(
            self.opens
            or self.flights.running
            or self.disk.unrecorded
            or self.hashing.lock.locked()
            or self.flights.whole is not None
        )

    def span(self, idx: int) -> tuple[int, int]:
        """Chunk `idx`'s bytes [start, end) in the blob."""
        return chunk_span(idx, self.size, self.chunk_size)

    def make_readable(self, idx: int) -> None:
        start, end = self.span(idx)
        self.readable[idx] = end - start
        if self.state == "remote":
            self.state = "partial"  # the state xattr: a reader has bytes (the catalog follows)

    def remember(self, idx: int, data: Chunk) -> None:
        self.recent[idx] = data
        while len(self.recent) > RECENT_CHUNKS:
            self.recent.popitem(last=False)

    def lose(self, idx: int) -> None:
        """Forget a readable chunk that could not be made durable; it is fetched again."""
        self.readable.pop(idx, None)
        self.unwritten.pop(idx, None)
        self.recent.pop(idx, None)
        self.wake.set()
        self.wake = trio.Event()
        start, _ = self.span(idx)
        if self.hashing.hasher.hashed > start:
            # Its bytes were hashed, but the copy that would be recorded is not those bytes.
            self.hashing.stale = True

    def forget_chunks(self) -> None:
        """Forget every chunk (the blob turned corrupt): no read is served from them again."""
        self.present.clear()
        self.readable.clear()
        self.unwritten.clear()
        self.recent.clear()

    def memory(self, idx: int) -> Chunk | None:
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
