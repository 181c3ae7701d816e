"""The registry: what is registered and what is in flight, in SQLite under `state_dir`.

Four tables:

- `answers`: metadata SHA-1 → the ids answered for it (and the URL it came from), so a repeated
  request is answered without fetching or bundling.
- `images`: image key → registered image id and where its bundle lives (bucket, prefix). Keys are
  built from each part's own SHA-1 (`kernel:<sha1>`, `ramdisk:<sha1>`, and for machine images
  `machine:<sha1>:<kernel id>:<ramdisk id>`, since a machine image names its kernel and ramdisk),
  so a kernel registered for one image is reused by the next.
- `jobs`: one row per registration in progress, claimed atomically by key. It names its owner
  process (pid and the process's start time, so a reused pid is not mistaken for the owner) and
  records the bundle's bucket/prefix before the first upload and the image id as soon as one is
  registered. A row whose owner is gone is a half-done registration: the service deletes what it
  names in the cloud and takes the key over. The row and the finished image are swapped in one
  transaction, so a key is always either in flight, registered, or free.
- `imported`: part SHA-1 → image id, taken over from the original ImageProxy's `imageproxy.db`
  by `registrar import-registry`. The original keyed its images by the part's SHA-1 alone (its
  machine images had no kernel or ramdisk; ORCA passes those at launch), so one imported
  machine image serves every kernel/ramdisk combination.

A machine image's bundle is uploaded once: a second kernel/ramdisk combination for the same
filesystem adds only a manifest beside the first one's parts. Such an image's `manifest` column
names that manifest; its bundle folder is shared, so deleting it must leave the folder to the
other images that use it. A job that makes such an image records the manifest key too.

Concurrency: WAL mode and a busy timeout make the database safe for the server and a concurrent
`registrar register`; one connection per Registry, serialized by a lock, serves its threads.
Claims use `BEGIN IMMEDIATE` so two processes cannot both take a key.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILENAME = "registry.sqlite3"
BUSY_TIMEOUT_MS = 30_000
ABANDONED = "abandoned"  # a pid_start no process has: the job's owner gave it up

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    metadata_sha1 TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    filesystem TEXT NOT NULL,
    kernel TEXT NOT NULL,
    ramdisk TEXT NOT NULL,
    updated REAL NOT NULL,
    qcow2 TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS images (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    image_id TEXT NOT NULL,
    bucket TEXT NOT NULL,
    prefix TEXT NOT NULL,
    created REAL NOT NULL,
    manifest TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    bucket TEXT,
    prefix TEXT,
    image_id TEXT,
    started REAL NOT NULL,
    manifest TEXT
);
CREATE TABLE IF NOT EXISTS imported (
    sha1 TEXT PRIMARY KEY,
    image_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    imported REAL NOT NULL
);
"""
# Columns added after the first release: (table, column, declaration) for ALTER TABLE.
_ADDED_COLUMNS = (
    ("answers", "qcow2", "TEXT NOT NULL DEFAULT ''"),
    ("images", "manifest", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "manifest", "TEXT"),
)


@dataclass(frozen=True)
class Answer:
    """The ids answered for one metadata file; "" for a missing kernel or ramdisk."""

    metadata_sha1: str
    url: str
    filesystem: str
    kernel: str
    ramdisk: str
    updated: float = 0.0
    qcow2: str = ""

    def ids(self) -> list[str]:
        return [i for i in (self.filesystem, self.kernel, self.ramdisk, self.qcow2) if i]


@dataclass(frozen=True)
class Image:
    """A registered image: its key, kind (machine/kernel/ramdisk), part SHA-1, id and bundle."""

    key: str
    kind: str
    sha1: str
    image_id: str
    bucket: str
    prefix: str
    created: float = 0.0
    manifest: str = ""  # set when the bundle folder is shared with other machine images


@dataclass(frozen=True)
class Imported:
    """An image the original ImageProxy registered for a part's SHA-1."""

    sha1: str
    image_id: str
    kind: str
    imported: float = 0.0


@dataclass(frozen=True)
class Job:
    """A registration in flight (or abandoned, if its owner process is gone)."""

    key: str
    owner: str
    pid: int
    pid_start: str
    bucket: str | None
    prefix: str | None
    image_id: str | None
    started: float
    manifest: str | None = None  # a manifest added to a shared folder: all the job uploads

    def owner_alive(self) -> bool:
        """Whether the process that claimed this job still runs (same pid, same start time)."""
        start = process_start(self.pid)
        return bool(start) and start == self.pid_start


def process_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ("" if it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def image_key(kind: str, sha1: str, kernel_id: str = "", ramdisk_id: str = "") -> str:
    """The registry key of an image: a machine image depends on its kernel and ramdisk ids."""
    if kind == "machine":
        return f"machine:{sha1}:{kernel_id}:{ramdisk_id}"
    return f"{kind}:{sha1}"


class Claimed(Exception):
    """Raised by `claim` when another live process holds the key."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"{job.key} is being registered by {job.owner}")
        self.job = job


class Registry:
    """The registry database under `state_dir` (created 0700, the file 0600)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / FILENAME
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        # Create the file 0600 before SQLite does (it would honour the umask).
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            for table, column, declaration in _ADDED_COLUMNS:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so a read-then-write cannot race another
        # process doing the same; the busy timeout makes the loser wait instead of failing.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- answers ---

    def answer(self, metadata_sha1: str) -> Answer | None:
        rows = self._query("SELECT * FROM answers WHERE metadata_sha1 = ?", (metadata_sha1,))
        return Answer(**dict(rows[0])) if rows else None

    def save_answer(self, answer: Answer) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO answers (metadata_sha1, url, filesystem, kernel, ramdisk,"
                " updated, qcow2) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    answer.metadata_sha1,
                    answer.url,
                    answer.filesystem,
                    answer.kernel,
                    answer.ramdisk,
                    time.time(),
                    answer.qcow2,
                ),
            )

    def forget_answer(self, metadata_sha1: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM answers WHERE metadata_sha1 = ?", (metadata_sha1,))

    def answers(self) -> list[Answer]:
        return [Answer(**dict(r)) for r in self._query("SELECT * FROM answers ORDER BY updated")]

    # --- images ---

    def image(self, key: str) -> Image | None:
        rows = self._query("SELECT * FROM images WHERE key = ?", (key,))
        return Image(**dict(rows[0])) if rows else None

    def forget_image(self, key: str) -> None:
        """Drop a registered image the cloud no longer has, and every answer naming it."""
        with self._transaction() as db:
            row = db.execute("SELECT image_id FROM images WHERE key = ?", (key,)).fetchone()
            db.execute("DELETE FROM images WHERE key = ?", (key,))
            if row is not None:
                image_id = row["image_id"]
                db.execute(
                    "DELETE FROM answers WHERE ? IN (filesystem, kernel, ramdisk, qcow2)",
                    (image_id,),
                )

    def images(self) -> list[Image]:
        return [Image(**dict(r)) for r in self._query("SELECT * FROM images ORDER BY created")]

    def machine_images(self, sha1: str) -> list[Image]:
        """Registered machine images of this filesystem SHA-1 (any kernel/ramdisk), oldest first."""
        rows = self._query(
            "SELECT * FROM images WHERE kind = 'machine' AND sha1 = ? ORDER BY created", (sha1,)
        )
        return [Image(**dict(r)) for r in rows]

    def folder_users(self, bucket: str, prefix: str) -> list[Image]:
        """Registered images whose bundle lives in this folder."""
        rows = self._query("SELECT * FROM images WHERE bucket = ? AND prefix = ?", (bucket, prefix))
        return [Image(**dict(r)) for r in rows]

    def folder_in_use(self, bucket: str, prefix: str) -> bool:
        """Whether a job in flight is adding a manifest to this folder."""
        rows = self._query(
            "SELECT 1 FROM jobs WHERE bucket = ? AND prefix = ? AND manifest IS NOT NULL",
            (bucket, prefix),
        )
        return bool(rows)

    # --- imported from the original ---

    def imported(self, sha1: str) -> Imported | None:
        rows = self._query("SELECT * FROM imported WHERE sha1 = ?", (sha1,))
        return Imported(**dict(rows[0])) if rows else None

    def all_imported(self) -> list[Imported]:
        return [Imported(**dict(r)) for r in self._query("SELECT * FROM imported")]

    def add_imported(self, entries: list[Imported]) -> int:
        """Record imported images not already known; return how many were new."""
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO imported VALUES (?, ?, ?, ?)",
                [(e.sha1, e.image_id, e.kind, time.time()) for e in entries],
            )
            return db.total_changes - before

    def forget_imported(self, sha1: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM imported WHERE sha1 = ?", (sha1,))

    # --- jobs ---

    def claim(self, key: str, owner: str) -> Job | None:
        """Take `key` for this process, or return the abandoned job that held it.

        Returns None when the key was free and is now ours. Returns the old Job when a process
        that is gone held it: the caller must clean up what it names and then `take_over`.
        Raises Claimed when a live process holds it.
        """
        pid = os.getpid()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO jobs (key, owner, pid, pid_start, started) VALUES (?, ?, ?, ?, ?)",
                    (key, owner, pid, process_start(pid), time.time()),
                )
                return None
        job = Job(**dict(row))
        if job.owner_alive():
            raise Claimed(job)
        return job

    def take_over(self, stale: Job, owner: str) -> None:
        """Replace an abandoned job (already cleaned up) with a fresh claim for `owner`.

        Raises Claimed if another process took the key over first.
        """
        pid = os.getpid()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE key = ?", (stale.key,)).fetchone()
            if row is not None and row["owner"] != stale.owner:
                raise Claimed(Job(**dict(row)))
            db.execute("DELETE FROM jobs WHERE key = ?", (stale.key,))
            db.execute(
                "INSERT INTO jobs (key, owner, pid, pid_start, started) VALUES (?, ?, ?, ?, ?)",
                (stale.key, owner, pid, process_start(pid), time.time()),
            )

    def job(self, key: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE key = ?", (key,))
        return Job(**dict(rows[0])) if rows else None

    def jobs(self) -> list[Job]:
        return [Job(**dict(r)) for r in self._query("SELECT * FROM jobs ORDER BY started")]

    def record_bundle(
        self, key: str, bucket: str, prefix: str, manifest: str | None = None
    ) -> None:
        """Note where the job's bundle goes: called before its first object is uploaded.

        `manifest`: the job only adds this manifest to a folder other images share.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET bucket = ?, prefix = ?, manifest = ? WHERE key = ?",
                (bucket, prefix, manifest, key),
            )

    def record_image_id(self, key: str, image_id: str) -> None:
        """Note the job's registered id: called as soon as RegisterImage returns."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET image_id = ? WHERE key = ?", (image_id, key))

    def finish(self, key: str, image: Image) -> None:
        """Turn the job for `key` into the registered `image`, atomically."""
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE key = ?", (key,))
            db.execute(
                "INSERT OR REPLACE INTO images (key, kind, sha1, image_id, bucket, prefix,"
                " created, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image.key,
                    image.kind,
                    image.sha1,
                    image.image_id,
                    image.bucket,
                    image.prefix,
                    time.time(),
                    image.manifest,
                ),
            )

    def release(self, key: str, owner: str) -> None:
        """Drop our job for `key` (after a failure whose cloud objects were cleaned up)."""
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE key = ? AND owner = ?", (key, owner))

    def abandon(self, key: str, owner: str) -> None:
        """Mark our job for `key` as abandoned (its cleanup failed): the next claim redoes it."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET pid = 0, pid_start = ? WHERE key = ? AND owner = ?",
                (ABANDONED, key, owner),
            )

    def abandoned_jobs(self) -> list[Job]:
        """Jobs whose owner process is gone: half-done registrations to clean up."""
        return [job for job in self.jobs() if not job.owner_alive()]
