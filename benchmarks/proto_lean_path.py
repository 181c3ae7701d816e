"""A prototype, not product code: how fast could a cold read through pyfuse3 be on this machine?

Issue 6 asks for a cold sequential read within 1.2x of `curl -o`; imgstore takes ~1.5x. This
script measures what a leaner data path reaches on the same machine and image, so the gap can
be told apart from what FUSE, SHA-1 and the disk cost anyway (docs/imgstore-design.md, fifth
round).

The prototype mounts one 1 GiB file. Its data path never goes back through the trio loop
between steps:
- four fetch threads (`imgstore.rangeget.RangeGetter`) fill pooled 4 MiB buffers, 8 in flight;
- one writer thread writes them in order with O_DIRECT;
- one hasher thread hashes them after it and makes the file durable at the end.
The trio loop only answers FUSE reads (`direct_io`, as imgstore serves unverified blobs), from
the buffers.

Everything imgstore does beyond that is missing: the catalog, the budget, retries, random
reads, generations, failures. So the figure is a floor to aim at, not a product.

Run as root: `.venv/bin/python benchmarks/proto_lean_path.py [--runs 3]`. It prints, per run,
`curl -o` and the prototype's `cat` on the same freshly dropped page cache.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import mmap
import os
import queue
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _readbench_image import ensure_images  # noqa: E402
from _readbench_servers import origin_server  # noqa: E402

from imgstore.rangeget import RangeGetter  # noqa: E402

CHUNK = 4 << 20
IN_FLIGHT = 8
FETCH_THREADS = 4
WORK = Path("/var/tmp/imageproxy-bench")


class Pipeline:
    """Fetch -> write -> hash in threads; the trio side learns of each step by run_sync_soon."""

    def __init__(self, url: str, size: int, data_path: Path, sha1: str) -> None:
        self.url, self.size, self.data_path, self.sha1 = url, size, data_path, sha1
        self.nchunks = (size + CHUNK - 1) // CHUNK
        self.bufs: dict[int, mmap.mmap] = {}  # fetched, not yet given back (trio side)
        self.events: dict[int, trio.Event] = {}
        self.read_upto = 0
        self.hashed = 0
        self.started = 0.0
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(IN_FLIGHT + 2):
            self.free.put(mmap.mmap(-1, CHUNK))
        self.slots = threading.Semaphore(IN_FLIGHT)
        self.token = trio.lowlevel.current_trio_token()

    def start(self) -> None:
        self.started = time.perf_counter()
        getter = RangeGetter(5, 30)
        with open(self.data_path, "wb") as f:
            f.truncate(self.size)
        fd = os.open(self.data_path, os.O_RDWR | os.O_DIRECT)
        order = iter(range(self.nchunks))
        order_lock = threading.Lock()
        landed: dict[int, mmap.mmap] = {}
        landed_cv = threading.Condition()
        to_hash: queue.SimpleQueue[tuple[int, mmap.mmap]] = queue.SimpleQueue()

        def fetch() -> None:
            while True:
                with order_lock:
                    idx = next(order, None)
                if idx is None:
                    return
                self.slots.acquire()
                buf = self.free.get()
                end = min(self.size, (idx + 1) * CHUNK)
                view = memoryview(buf)[: end - idx * CHUNK]
                getter.get_into(self.url, None, idx * CHUNK, self.size, view)
                with landed_cv:
                    landed[idx] = buf
                    landed_cv.notify_all()
                self.token.run_sync_soon(self._fetched, idx, buf)

        def write() -> None:
            for idx in range(self.nchunks):
                with landed_cv:
                    while idx not in landed:
                        landed_cv.wait()
                    buf = landed.pop(idx)
                os.pwrite(fd, buf, idx * CHUNK)  # the short last chunk: past EOF, trimmed below
                to_hash.put((idx, buf))

        def hash_all() -> None:
            h = hashlib.sha1(usedforsecurity=False)
            for _ in range(self.nchunks):
                idx, buf = to_hash.get()
                end = min(self.size, (idx + 1) * CHUNK)
                h.update(memoryview(buf)[: end - idx * CHUNK])
                self.token.run_sync_soon(self._hashed, idx)
            os.ftruncate(fd, self.size)
            os.fdatasync(fd)
            os.close(fd)
            self.token.run_sync_soon(self._verified, h.hexdigest())

        threads = [threading.Thread(target=fetch, daemon=True) for _ in range(FETCH_THREADS)]
        threads += [
            threading.Thread(target=write, daemon=True),
            threading.Thread(target=hash_all, daemon=True),
        ]
        for t in threads:
            t.start()

    def _fetched(self, idx: int, buf: mmap.mmap) -> None:
        self.bufs[idx] = buf
        self.events.setdefault(idx, trio.Event()).set()

    def _hashed(self, idx: int) -> None:
        self.hashed = idx + 1
        self.give_back()

    def _verified(self, digest: str) -> None:
        verdict = "matches" if digest == self.sha1 else f"DOES NOT MATCH ({digest})"
        seconds = time.perf_counter() - self.started
        print(f"  SHA-1 {verdict}, durable {seconds:.2f} s after the open", flush=True)

    def give_back(self) -> None:
        """A buffer is free once hashed (so written) and read past."""
        for idx in [i for i in self.bufs if i < self.hashed and (i + 1) * CHUNK <= self.read_upto]:
            self.free.put(self.bufs.pop(idx))
            self.slots.release()

    async def read(self, off: int, size: int) -> bytes | memoryview:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        first, last = off // CHUNK, (end - 1) // CHUNK
        for idx in range(first, last + 1):
            await self.events.setdefault(idx, trio.Event()).wait()
        if first == last:
            data: bytes | memoryview = memoryview(self.bufs[first])[
                off % CHUNK : end - first * CHUNK
            ]
        else:
            data = b"".join(
                memoryview(self.bufs[i])[
                    max(off, i * CHUNK) - i * CHUNK : min(end, (i + 1) * CHUNK) - i * CHUNK
                ]
                for i in range(first, last + 1)
            )
        if end > self.read_upto:
            self.read_upto = end
            self.give_back()
        return data


class OneFile(pyfuse3.Operations):
    """`/f`: the blob, read through the pipeline."""

    def __init__(self, make: type[Pipeline], args: tuple[str, int, Path, str]) -> None:
        super().__init__()
        self.make, self.args = make, args
        self.pipeline: Pipeline | None = None

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o444, 1
            attr.st_size, attr.st_blksize = self.args[1], 1 << 20
        attr.entry_timeout = attr.attr_timeout = 3600
        return attr

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.pipeline is None:
            self.pipeline = self.make(*self.args)
            self.pipeline.start()
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        assert self.pipeline is not None
        return await self.pipeline.read(off, size)


def serve(url: str, size: int, data_path: Path, sha1: str, mountpoint: Path) -> None:
    sys.setswitchinterval(0.0001)  # as the imgstore daemon does
    pyfuse3.init(
        OneFile(Pipeline, (url, size, data_path, sha1)), str(mountpoint), {"fsname=proto", "ro"}
    )
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


def drop_page_cache(keep: Path) -> None:
    """Drop the page cache, then load the origin's file back (the origin stands for a fast
    web server, as in bench_read.py)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    subprocess.run(["cat", str(keep)], stdout=subprocess.DEVNULL, check=True)


def compare(runs: int, size: int) -> None:
    images = ensure_images(WORK / f"images-{size}", size)
    blob = images.main
    scratch = Path(tempfile.mkdtemp(prefix="proto-", dir=WORK))
    origin = origin_server(scratch / "origin", images.root)
    origin.start()
    url = f"{origin.url}/{blob.name}"
    try:
        for run in range(1, runs + 1):
            drop_page_cache(images.path(blob))
            t = time.perf_counter()
            subprocess.run(["curl", "-sS", "-o", str(scratch / "curl.out"), url], check=True)
            curl = time.perf_counter() - t
            (scratch / "curl.out").unlink()
            mnt = scratch / "mnt"
            mnt.mkdir(exist_ok=True)
            argv = [
                sys.executable,
                __file__,
                "--serve",
                url,
                str(size),
                str(scratch / "data"),
                blob.sha1,
                str(mnt),
            ]
            server = subprocess.Popen(argv)
            try:
                for _ in range(200):
                    if os.path.ismount(mnt):
                        break
                    time.sleep(0.05)
                os.stat(mnt / "f")
                drop_page_cache(images.path(blob))
                t = time.perf_counter()
                subprocess.run(["cat", str(mnt / "f")], stdout=subprocess.DEVNULL, check=True)
                cold = time.perf_counter() - t
                time.sleep(0.5)  # let the hasher report
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                server.wait(timeout=30)
                (scratch / "data").unlink(missing_ok=True)
            ratio = cold / curl
            print(f"run {run}: curl -o {curl:.2f} s, prototype cat {cold:.2f} s: {ratio:.2f}x curl")
    finally:
        origin.stop()
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--serve",
        nargs=5,
        metavar=("URL", "SIZE", "DATA", "SHA1", "MOUNTPOINT"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.serve:
        url, size, data, sha1, mountpoint = args.serve
        serve(url, int(size), Path(data), sha1, Path(mountpoint))
    else:
        compare(args.runs, args.size_mib << 20)


if __name__ == "__main__":
    main()
