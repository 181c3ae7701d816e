"""The SQLite catalog: blobs, their URLs, chunk bitmaps, pins and the LRU clock.

Safe across processes (the mount daemon, the CLI and the registrar at once):

- WAL journal, so readers never wait for the writer and the writer never waits for readers;
- every write is one short `BEGIN IMMEDIATE` transaction: it takes the write lock up front, so
  two writers never deadlock on a read-to-write upgrade (the classic source of
  "database is locked" that busy_timeout cannot fix); the busy timeout covers the wait;
- no transaction is held open across network or disk I/O of blob data.

A `Catalog` is one connection guarded by a lock, usable from any thread; the daemon calls it
through `trio.to_thread` so SQLite never runs on the trio thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from imgstore.errors import UnknownBlob

log = logging.getLogger(__name__)

STATES = ("remote", "partial", "complete", "verified", "corrupt")
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id INTEGER PRIMARY KEY,
    sha1 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    etag TEXT,
    ranges INTEGER NOT NULL DEFAULT 1,
    chunk_size INTEGER NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    added REAL NOT NULL,
    last_used REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS urls (
    sha1 TEXT NOT NULL,
    pos INTEGER NOT NULL,
    url TEXT NOT NULL,
    trusted INTEGER NOT NULL,
    etag TEXT,
    PRIMARY KEY (sha1, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    sha1 TEXT NOT NULL,
    idx INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (sha1, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pins (
    sha1 TEXT NOT NULL,
    owner TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (sha1, owner)
) WITHOUT ROWID;
"""


@dataclasses.dataclass(frozen=True)
class Url:
    """One origin URL of a blob; `trusted` is False for URLs that came from remote users.

    `etag` is what this URL answered when probed (each mirror has its own).
    """

    url: str
    trusted: bool
    etag: str | None = None


@dataclasses.dataclass(frozen=True)
class BlobRecord:
    """A blob as the catalog knows it."""

    id: int
    sha1: str
    size: int
    etag: str | None
    ranges: bool
    chunk_size: int
    state: str
    generation: int
    last_used: float
    urls: tuple[Url, ...]
    pins: tuple[str, ...]
    cached_bytes: int
    error: str | None


class Catalog:
    """One connection to `cache_dir/catalog.sqlite`; every method is one short transaction."""

    def __init__(self, cache_dir: Path) -> None:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = cache_dir / "catalog.sqlite"
        self._lock = threading.Lock()
        # Create the file 0600 first: SQLite gives the -wal and -shm files the same mode.
        # (Not umask: it is process-wide, and the registrar calls us from threads.)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable against process crashes (kill -9), which is what the
        # chunk bitmap needs; data bytes are fdatasync'ed before their bit is written.
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._write() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            yield

    # -- blobs -----------------------------------------------------------------------------

    def upsert(
        self,
        sha1: str,
        size: int,
        etag: str | None,
        ranges: bool,
        urls: list[Url],
        chunk_size: int,
    ) -> tuple[BlobRecord, bool]:
        """Declare a blob, or update its URLs; returns (record, reset).

        A blob whose stored state is corrupt is reset to remote with a new generation (this is
        how "until re-added" works); `reset` tells the caller to drop its cached data.
        """
        now = time.time()
        with self._locked(), self._write() as db:
            row = db.execute(
                "SELECT state, size, chunk_size FROM blobs WHERE sha1=?", (sha1,)
            ).fetchone()
            reset = False
            if row is None:
                db.execute(
                    "INSERT INTO blobs (sha1, size, etag, ranges, chunk_size, state, added,"
                    " last_used) VALUES (?, ?, ?, ?, ?, 'remote', ?, ?)",
                    (sha1, size, etag, int(ranges), chunk_size, now, now),
                )
            elif row[0] == "corrupt" or row[1] != size:
                # A new size means the old record was wrong about the content: start over.
                reset = True
                db.execute("DELETE FROM chunks WHERE sha1=?", (sha1,))
                db.execute(
                    "UPDATE blobs SET size=?, etag=?, ranges=?, chunk_size=?, state='remote',"
                    " error=NULL, generation=generation+1 WHERE sha1=?",
                    (size, etag, int(ranges), chunk_size, sha1),
                )
            else:
                db.execute(
                    "UPDATE blobs SET etag=?, ranges=? WHERE sha1=?", (etag, int(ranges), sha1)
                )
            old = self._urls(db, sha1)
            merged = list(urls) + [u for u in old if u.url not in {n.url for n in urls}]
            db.execute("DELETE FROM urls WHERE sha1=?", (sha1,))
            db.executemany(
                "INSERT INTO urls (sha1, pos, url, trusted, etag) VALUES (?, ?, ?, ?, ?)",
                [(sha1, i, u.url, int(u.trusted), u.etag) for i, u in enumerate(merged)],
            )
            return self._get(db, sha1), reset

    def get(self, sha1: str) -> BlobRecord:
        """The blob's record; UnknownBlob if it was never added."""
        with self._locked():
            return self._get(self._db, sha1)

    def find(self, sha1: str) -> BlobRecord | None:
        with self._locked():
            try:
                return self._get(self._db, sha1)
            except UnknownBlob:
                return None

    def by_id(self, blob_id: int) -> BlobRecord | None:
        with self._locked():
            row = self._db.execute("SELECT sha1 FROM blobs WHERE id=?", (blob_id,)).fetchone()
            return None if row is None else self._get(self._db, row[0])

    def list(self) -> list[BlobRecord]:
        """Every blob, oldest declaration first; one read transaction for a consistent view."""
        with self._locked():
            self._db.execute("BEGIN")
            try:
                sha1s = [r[0] for r in self._db.execute("SELECT sha1 FROM blobs ORDER BY id")]
                return [self._get(self._db, s) for s in sha1s]
            finally:
                self._db.execute("COMMIT")

    def names(self) -> list[tuple[int, str, int, str]]:
        """(id, sha1, size, state) of every blob: the cheap listing readdir needs."""
        with self._locked():
            return list(self._db.execute("SELECT id, sha1, size, state FROM blobs ORDER BY id"))

    def _get(self, db: sqlite3.Connection, sha1: str) -> BlobRecord:
        row = db.execute(
            "SELECT id, sha1, size, etag, ranges, chunk_size, state, generation, last_used, error"
            " FROM blobs WHERE sha1=?",
            (sha1,),
        ).fetchone()
        if row is None:
            raise UnknownBlob(f"unknown blob {sha1}")
        urls = tuple(self._urls(db, sha1))
        pins = tuple(
            r[0] for r in db.execute("SELECT owner FROM pins WHERE sha1=? ORDER BY owner", (sha1,))
        )
        cached = db.execute(
            "SELECT COALESCE(SUM(length), 0) FROM chunks WHERE sha1=?", (sha1,)
        ).fetchone()[0]
        return BlobRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            bool(row[4]),
            *row[5:9],
            urls=urls,
            pins=pins,
            cached_bytes=cached,
            error=row[9],
        )

    @staticmethod
    def _urls(db: sqlite3.Connection, sha1: str) -> list[Url]:
        rows = db.execute("SELECT url, trusted, etag FROM urls WHERE sha1=? ORDER BY pos", (sha1,))
        return [Url(u, bool(t), e) for u, t, e in rows]

    # -- chunks and states -----------------------------------------------------------------

    def chunks(self, sha1: str) -> dict[int, int]:
        """The chunk bitmap: index -> length of every chunk durably present."""
        with self._locked():
            return dict(self._db.execute("SELECT idx, length FROM chunks WHERE sha1=?", (sha1,)))

    def mark_chunk(self, sha1: str, generation: int, idx: int, length: int, nchunks: int) -> bool:
        """Record a durably written chunk; False (nothing recorded) if the generation moved on.

        The state becomes `complete` when all `nchunks` are recorded (counted inside the same
        transaction, so concurrent writers cannot both miss it), else `partial`; a `verified`
        blob stays verified.
        """
        with self._locked(), self._write() as db:
            row = db.execute("SELECT generation, state FROM blobs WHERE sha1=?", (sha1,)).fetchone()
            if row is None or row[0] != generation or row[1] == "corrupt":
                return False
            db.execute(
                "INSERT OR REPLACE INTO chunks (sha1, idx, length) VALUES (?, ?, ?)",
                (sha1, idx, length),
            )
            if row[1] != "verified":
                count = db.execute("SELECT COUNT(*) FROM chunks WHERE sha1=?", (sha1,)).fetchone()
                state = "complete" if count[0] >= nchunks else "partial"
                db.execute("UPDATE blobs SET state=? WHERE sha1=?", (state, sha1))
            return True

    def set_state(self, sha1: str, generation: int, state: str, error: str | None = None) -> bool:
        """Set `verified` or `corrupt` (corrupt also clears the bitmap); False if stale."""
        assert state in STATES
        with self._locked(), self._write() as db:
            row = db.execute("SELECT generation FROM blobs WHERE sha1=?", (sha1,)).fetchone()
            if row is None or row[0] != generation:
                return False
            if state == "corrupt":
                db.execute("DELETE FROM chunks WHERE sha1=?", (sha1,))
            db.execute("UPDATE blobs SET state=?, error=? WHERE sha1=?", (state, error, sha1))
            return True

    def reset(self, sha1: str) -> BlobRecord:
        """Forget the cached data of a blob (eviction): state remote, new generation.

        Corrupt blobs stay corrupt: eviction must not launder a failed verification.
        """
        with self._locked(), self._write() as db:
            db.execute("DELETE FROM chunks WHERE sha1=?", (sha1,))
            db.execute(
                "UPDATE blobs SET generation=generation+1,"
                " state=CASE state WHEN 'corrupt' THEN 'corrupt' ELSE 'remote' END WHERE sha1=?",
                (sha1,),
            )
            return self._get(db, sha1)

    def set_chunk_size(self, sha1: str, generation: int, chunk_size: int) -> bool:
        """Adopt a mount's chunk size for a blob with nothing cached; False if it has chunks."""
        with self._locked(), self._write() as db:
            if db.execute("SELECT 1 FROM chunks WHERE sha1=? LIMIT 1", (sha1,)).fetchone():
                return False
            cur = db.execute(
                "UPDATE blobs SET chunk_size=? WHERE sha1=? AND generation=?",
                (chunk_size, sha1, generation),
            )
            return cur.rowcount == 1

    def set_ranges(self, sha1: str, ranges: bool) -> None:
        with self._locked(), self._write() as db:
            db.execute("UPDATE blobs SET ranges=? WHERE sha1=?", (int(ranges), sha1))

    def touch(self, sha1: str) -> None:
        """Advance the blob on the LRU clock."""
        with self._locked(), self._write() as db:
            db.execute("UPDATE blobs SET last_used=? WHERE sha1=?", (time.time(), sha1))

    def lru(self) -> list[tuple[str, float]]:
        """(sha1, last_used) of blobs with cached chunks, least recently used first."""
        with self._locked():
            return list(
                self._db.execute(
                    "SELECT sha1, last_used FROM blobs WHERE sha1 IN (SELECT DISTINCT sha1 FROM"
                    " chunks) ORDER BY last_used, id"
                )
            )

    # -- pins ------------------------------------------------------------------------------

    def pin(self, sha1: str, owner: str) -> None:
        with self._locked(), self._write() as db:
            if db.execute("SELECT 1 FROM blobs WHERE sha1=?", (sha1,)).fetchone() is None:
                raise UnknownBlob(f"unknown blob {sha1}")
            db.execute(
                "INSERT OR IGNORE INTO pins (sha1, owner, since) VALUES (?, ?, ?)",
                (sha1, owner, time.time()),
            )

    def unpin(self, sha1: str, owner: str) -> None:
        with self._locked(), self._write() as db:
            db.execute("DELETE FROM pins WHERE sha1=? AND owner=?", (sha1, owner))

    def unpin_owner_prefix(self, prefix: str) -> int:
        """Drop every pin whose owner starts with `prefix`; returns how many."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._locked(), self._write() as db:
            cur = db.execute("DELETE FROM pins WHERE owner LIKE ? ESCAPE '\\'", (escaped + "%",))
            return cur.rowcount

    def pinned(self, sha1: str) -> bool:
        with self._locked():
            row = self._db.execute("SELECT 1 FROM pins WHERE sha1=? LIMIT 1", (sha1,)).fetchone()
            return row is not None
