"""The FUSE operations: translation between the kernel's requests and the Store, nothing more.

Layout: `/by-sha1/<sha1>` for every blob in the catalog (looked up live, so blobs added after
mounting appear at once). Files are read-only and have the blob's exact size. Unverified blobs
are opened with `direct_io`, so every byte a handle gets passes through `Store.read` and the
"complete read only after the SHA-1 matched" rule cannot be bypassed by the page cache;
verified blobs get `keep_cache` and long timeouts.

This is the only module that knows errno; its one table is `_ERRNO`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence

import pyfuse3

from imgstore.catalog import BlobRecord
from imgstore.errors import (
    BadSha1,
    BlobBusy,
    BlobCorrupt,
    CacheFull,
    OriginError,
    StoreError,
    UnknownBlob,
)
from imgstore.store import Buffer, Handle, Store
from imgstore.verify import normalize_sha1

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BY_SHA1 = ROOT + 1
BLOB_BASE = 1000  # blob inode = BLOB_BASE + catalog id: stable across restarts
DIRS = {ROOT: {b"by-sha1": BY_SHA1}, BY_SHA1: {}}

# Immutable content: the kernel may cache what it learned about a verified blob for long.
LONG_TIMEOUT = 3600.0
SHORT_TIMEOUT = 1.0

XATTRS = (b"user.imgstore.state", b"user.imgstore.url", b"user.imgstore.cached_bytes")

_ERRNO: list[tuple[type[StoreError], int]] = [
    (UnknownBlob, errno.ENOENT),
    (BadSha1, errno.ENOENT),
    (BlobCorrupt, errno.EIO),
    # ENOSPC would tell a reader its own disk is full; the cache's budget is not its problem.
    (CacheFull, errno.EIO),
    (OriginError, errno.EIO),
    (BlobBusy, errno.EBUSY),
    (StoreError, errno.EIO),
]


def to_errno(exc: StoreError) -> int:
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    raise AssertionError("StoreError is the last row")


class Operations(pyfuse3.Operations):
    """Read-only pyfuse3 operations over a Store."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, store: Store, on_first_open: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.store = store
        # Mount tuning that must wait until the kernel has finished FUSE's INIT handshake.
        self._on_first_open = on_first_open
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.uid = os.getuid()
        self.gid = os.getgid()

    # -- attributes ------------------------------------------------------------------------

    def _dir_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFDIR | 0o555
        attr.st_nlink = 2
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = 0
        attr.entry_timeout = attr.attr_timeout = LONG_TIMEOUT
        return attr

    def _blob_attr(self, rec: BlobRecord) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = BLOB_BASE + rec.id
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = rec.size
        attr.st_blksize = 1024 * 1024  # cat & co. read this much per call: 1 MiB FUSE requests
        attr.st_blocks = (rec.cached_bytes + 511) // 512
        ns = int(rec.last_used * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        timeout = LONG_TIMEOUT if rec.state == "verified" else SHORT_TIMEOUT
        attr.entry_timeout = attr.attr_timeout = timeout
        return attr

    async def _blob_record(self, inode: int) -> BlobRecord:
        rec = await self.store.blob_record_by_id(inode - BLOB_BASE)
        if rec is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return rec

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode in DIRS:
            return self._dir_attr(inode)
        return self._blob_attr(await self._blob_record(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT:
            if name in DIRS[ROOT]:
                return self._dir_attr(DIRS[ROOT][name])
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode != BY_SHA1:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            sha1 = normalize_sha1(name.decode("ascii", "replace"))
            if sha1 != name.decode("ascii", "replace"):
                raise pyfuse3.FUSEError(errno.ENOENT)  # only the canonical name exists
            rec = await self.store.blob_record(sha1)
        except StoreError as exc:
            raise pyfuse3.FUSEError(to_errno(exc)) from None
        return self._blob_attr(rec)

    # -- directories -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in DIRS:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT:
            entries = [(name, self._dir_attr(ino)) for name, ino in DIRS[ROOT].items()]
        else:
            recs = await self.store.blob_records()
            entries = [(rec.sha1.encode(), self._blob_attr(rec)) for rec in recs]
        for i, (name, attr) in enumerate(entries[start_id:], start=start_id):
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode in DIRS:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self._on_first_open is not None:
            tune, self._on_first_open = self._on_first_open, None
            tune()
        rec = await self._blob_record(inode)
        try:
            handle = await self.store.open(rec.sha1)
        except StoreError as exc:
            raise pyfuse3.FUSEError(to_errno(exc)) from None
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        verified = handle.blob.state == "verified"
        return pyfuse3.FileInfo(fh=fh, keep_cache=verified, direct_io=not verified)

    async def read(self, fh: int, off: int, size: int) -> Buffer:
        handle = self.handles[fh]
        try:
            return await self.store.read(handle, off, size)
        except StoreError as exc:
            log.warning("read of %s at %d failed: %s", handle.blob.sha1, off, exc)
            raise pyfuse3.FUSEError(to_errno(exc)) from None

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        await self.store.release(handle)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        usage = await self.store.usage()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = usage.total // 4096
        out.f_bfree = out.f_bavail = max(0, usage.total - usage.used) // 4096
        out.f_files = out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- extended attributes ---------------------------------------------------------------

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [] if inode in DIRS else list(XATTRS)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode in DIRS or name not in XATTRS:
            raise pyfuse3.FUSEError(errno.ENODATA)
        rec = await self._blob_record(inode)
        if name == b"user.imgstore.state":
            return self.store.status(rec).state.encode()
        if name == b"user.imgstore.url":
            return rec.urls[0].url.encode() if rec.urls else b""
        return str(self.store.status(rec).cached_bytes).encode()
