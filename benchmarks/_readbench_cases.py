"""The measured cases of bench_read.py: one method per case and tool, one sample per call.

Every sample is a dict of plain numbers (seconds, bytes) so the report can take medians and the
JSON stays flat. Timing is `time.perf_counter` around the reading subprocesses only: mounting,
declaring blobs and unmounting are outside the clock. Origin bytes come from the origin's
access log, read after the clients have unmounted (nginx logs a request when it completes).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _readbench_image import Blob, ImageSet
from _readbench_mounts import (
    FuseMount,
    clean_env,
    httpdirfs_mount,
    imgstore_add,
    imgstore_mount,
    rclone_mount,
)
from _readbench_servers import Nginx, slice_proxy

log = logging.getLogger(__name__)

Sample = dict[str, float | int | str | None]
STATE_XATTR = "user.imgstore.state"
# A reader that has not finished by then is hung: fail the case rather than the whole run.
READ_TIMEOUT_S = 900.0


class CaseError(Exception):
    """Raised when a case cannot produce a valid sample (a tool failed or read wrong bytes)."""


@dataclass
class Settings:
    """What the command line decided, as the cases need it."""

    chunk_size: int
    random_reads: int
    drop_caches: bool
    keep_logs: Path | None = None


@dataclass
class Bench:
    """Runs cases against one origin, writing scratch data under `workdir`."""

    images: ImageSet
    origin: Nginx
    workdir: Path
    settings: Settings
    cases: list[str]
    _serial: int = field(default=0)

    # ---- plumbing -------------------------------------------------------------------------

    @contextmanager
    def scratch(self, label: str) -> Iterator[Path]:
        """A fresh directory for one sample, removed afterwards (caches are as big as images)."""
        self._serial += 1
        d = self.workdir / f"{self._serial:03d}-{label}"
        d.mkdir(parents=True)
        try:
            yield d
        finally:
            if self.settings.keep_logs is not None:
                for f in d.glob("*.log"):
                    shutil.copy(f, self.settings.keep_logs / f"{d.name}-{f.name}")
            _rmtree_unmounted(d)

    def drop_page_cache(self) -> None:
        if self.settings.drop_caches:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")

    def cold_start(self, blobs: list[Blob]) -> None:
        """Drop the page cache, then load the origin's files back into it.

        The origin stands for a fast web server: what a cold case measures is the client
        fetching and writing to its own disk, not nginx reading its disk.
        """
        self.drop_page_cache()
        for blob in blobs:
            _read_all(self.images.path(blob))

    def url(self, blob: Blob, base: str | None = None) -> str:
        return f"{base or self.origin.url}/{blob.name}"

    def origin_bytes(self, offset: int, blobs: list[Blob]) -> int:
        return sum(self.origin.traffic_since(offset, "/" + b.name).body_bytes for b in blobs)

    def origin_shape(self, offset: int, blob: Blob, seconds: float) -> Sample:
        """How a read used the origin: bytes, requests, mean requests in flight."""
        t = self.origin.traffic_since(offset, "/" + blob.name)
        return {
            "origin_bytes": t.body_bytes,
            "origin_requests": t.requests,
            "origin_in_flight": t.busy_s / seconds if seconds else None,
        }

    def imgstore(
        self,
        d: Path,
        name: str,
        blobs: list[Blob],
        url_base: str | None = None,
        env: dict[str, str] | None = None,
    ) -> FuseMount:
        cache = d / f"{name}-cache"
        for blob in blobs:
            # A site's operator sets http_proxy for every imgstore command, `add` included.
            imgstore_add(cache, blob.sha1, self.url(blob, url_base), d / f"{name}-add.log", env)
        size = sum(b.size for b in blobs)
        return imgstore_mount(
            d / f"{name}-mnt",
            cache,
            self.settings.chunk_size,
            d / f"{name}.log",
            cache_size=2 * size + (64 << 20),
            env=env,
        )

    def competitor(self, tool: str, d: Path) -> FuseMount:
        make = {"rclone": rclone_mount, "httpdirfs": httpdirfs_mount}[tool]
        return make(d / "mnt", d / "cache", self.origin.url, d / f"{tool}.log")

    @staticmethod
    def blob_path(tool: str, mount: FuseMount, blob: Blob) -> Path:
        if tool == "imgstore":
            return mount.mountpoint / "by-sha1" / blob.sha1
        return mount.mountpoint / blob.name

    # ---- cold sequential read (+ warm reads through imgstore) ------------------------------

    def cold(self, tool: str, run: int) -> dict[str, Sample]:
        """Cold sequential read of the main image; imgstore also yields its warm samples."""
        blob = self.images.main
        with self.scratch(f"cold-{tool}") as d:
            if tool == "curl":
                return {"cold": self._curl_cold(d, blob)}
            if tool == "imgstore":
                return self._imgstore_cold_warm(d, blob, timed_cold=True)
            # Origin bytes count from before the mount: listings and probes are part of the cost.
            offset = self.origin.log_offset()
            with self.competitor(tool, d) as m:
                path = self.blob_path(tool, m, blob)
                _expect_size(path, blob)
                self.cold_start([blob])
                cpu0 = cpu_seconds(m.pid)
                seconds = timed_cat([path])
                cpu = cpu_seconds(m.pid) - cpu0
            return {
                "cold": {
                    "seconds": seconds,
                    "daemon_cpu_s": cpu,
                    **self.origin_shape(offset, blob, seconds),
                }
            }

    def _curl_cold(self, d: Path, blob: Blob) -> Sample:
        out = d / "curl.out"
        self.cold_start([blob])
        offset = self.origin.log_offset()
        t0 = time.perf_counter()
        run_checked(["curl", "-sS", "--fail", "-o", str(out), self.url(blob)])
        seconds = time.perf_counter() - t0
        # What it costs to make curl's bytes as durable as a cache's chunks (the file only: a
        # global sync would also wait for everybody else's writes).
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with_sync = time.perf_counter() - t0
        _expect_size(out, blob)
        return {
            "seconds": seconds,
            "seconds_with_sync": with_sync,
            **self.origin_shape(offset, blob, seconds),
        }

    def _imgstore_cold_warm(self, d: Path, blob: Blob, timed_cold: bool) -> dict[str, Sample]:
        out: dict[str, Sample] = {}
        offset = self.origin.log_offset()  # from before `add`: its probe is origin traffic too
        with self.imgstore(d, "site", [blob]) as m:
            path = self.blob_path("imgstore", m, blob)
            _expect_size(path, blob)
            self.cold_start([blob])
            poller = StatePoller(path)
            cpu0 = cpu_seconds(m.pid)
            poller.start()
            try:
                seconds = timed_cat([path])
                poller.join(timeout=max(60.0, 3 * seconds))
            finally:
                poller.stop()
            cpu = cpu_seconds(m.pid) - cpu0
            cold: Sample = {
                "seconds": seconds,
                "verified_s": poller.verified_at,
                "final_state": poller.last_state,
                "rss_hwm_bytes": vm_hwm(m.pid),
                "daemon_cpu_s": cpu,
            }
        cold.update(self.origin_shape(offset, blob, seconds))
        if timed_cold:
            out["cold"] = cold
        if "warm" in self.cases:
            out.update(self._imgstore_warm(d, blob))
        return out

    def _imgstore_warm(self, d: Path, blob: Blob) -> dict[str, Sample]:
        # The same cache directory, a new mount: the data is on disk, nothing in memory.
        offset = self.origin.log_offset()
        with self.imgstore(d, "site", []) as m:
            path = self.blob_path("imgstore", m, blob)
            _expect_size(path, blob)
            self.drop_page_cache()
            fresh = timed_cat([path])
            hot = timed_cat([path])
        origin = self.origin_bytes(offset, [blob])
        return {
            "warm_fresh": {"seconds": fresh, "origin_bytes": origin},
            "warm_hot": {"seconds": hot, "origin_bytes": origin},
        }

    def warm_only(self, tool: str, run: int) -> dict[str, Sample]:
        """Warm reads: imgstore (filled untimed when the cold case is off) or a plain file."""
        blob = self.images.main
        if tool == "imgstore":
            with self.scratch("warm-imgstore") as d:
                return self._imgstore_cold_warm(d, blob, timed_cold=False)
        path = self.images.path(blob)
        self.drop_page_cache()
        fresh = timed_cat([path])
        hot = timed_cat([path])
        return {"warm_fresh": {"seconds": fresh}, "warm_hot": {"seconds": hot}}

    # ---- random 4 KiB reads ---------------------------------------------------------------

    def random(self, tool: str, run: int) -> dict[str, Sample]:
        blob = self.images.main
        with self.scratch(f"random-{tool}") as d:
            offset = self.origin.log_offset()
            mount = (
                self.imgstore(d, "site", [blob]) if tool == "imgstore" else self.competitor(tool, d)
            )
            with mount as m:
                path = self.blob_path(tool, m, blob)
                _expect_size(path, blob)
                self.cold_start([blob])
                lat = random_reads(path, blob.size, self.settings.random_reads, seed=run)
            lat.sort()
            return {
                "random": {
                    "reads": len(lat),
                    "median_s": statistics.median(lat),
                    "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                    "seconds": sum(lat),
                    "origin_bytes": self.origin_bytes(offset, [blob]),
                }
            }

    # ---- concurrent readers of different cold blobs ---------------------------------------

    def concurrent(self, tool: str, run: int) -> dict[str, Sample]:
        blobs = list(self.images.concurrent)
        total = sum(b.size for b in blobs)
        with self.scratch(f"concurrent-{tool}") as d:
            if tool == "curl":
                self.cold_start(blobs)
                offset = self.origin.log_offset()
                outs = [d / f"{b.name}.out" for b in blobs]
                seconds = timed_parallel(
                    [
                        ["curl", "-sS", "--fail", "-o", str(o), self.url(b)]
                        for o, b in zip(outs, blobs, strict=True)
                    ]
                )
                for o, b in zip(outs, blobs, strict=True):
                    _expect_size(o, b)
            else:
                offset = self.origin.log_offset()
                mount = (
                    self.imgstore(d, "site", blobs)
                    if tool == "imgstore"
                    else self.competitor(tool, d)
                )
                with mount as m:
                    paths = [self.blob_path(tool, m, b) for b in blobs]
                    for p, b in zip(paths, blobs, strict=True):
                        _expect_size(p, b)
                    self.cold_start(blobs)
                    seconds = timed_cat(paths)
        return {
            "concurrent": {
                "seconds": seconds,
                "bytes": total,
                "origin_bytes": self.origin_bytes(offset, blobs),
            }
        }

    # ---- two sites behind one slice-caching proxy -----------------------------------------

    def scaleout(self, tool: str, run: int) -> dict[str, Sample]:
        sample = self._two_sites(mode="http_proxy")
        if sample["proxy_requests"] == 0:
            # imgstore went straight to the origin: it ignored http_proxy. Say so, and show the
            # cache tier with imgstore's URL pointing at the proxy instead.
            log.warning("imgstore did not use http_proxy; measuring the reverse-proxy stand-in")
            sample = self._two_sites(mode="reverse_proxy")
            sample["http_proxy_ignored"] = 1
        return {"scaleout": sample}

    def _two_sites(self, mode: str) -> Sample:
        blob = self.images.main
        with self.scratch(f"scaleout-{mode}") as d, ExitStack() as stack:
            proxy = slice_proxy(
                d / "proxy",
                self.origin.port,
                self.settings.chunk_size,
                max_size=2 * blob.size + (64 << 20),
            )
            proxy.start()
            stack.callback(proxy.stop)
            if mode == "http_proxy":
                base, env = None, {"http_proxy": proxy.url}
            else:
                base, env = proxy.url, None
            offset, proxy_offset = self.origin.log_offset(), proxy.log_offset()
            mounts = [
                stack.enter_context(self.imgstore(d, f"site{i}", [blob], base, env)) for i in (1, 2)
            ]
            paths = [self.blob_path("imgstore", m, blob) for m in mounts]
            for p in paths:
                _expect_size(p, blob)
            self.cold_start([blob])
            seconds = timed_cat(paths)
            states = [_state(p) for p in paths]
            for m in reversed(mounts):
                m.stop()
            origin = self.origin.traffic_since(offset, "/" + blob.name)
            via = proxy.traffic_since(proxy_offset, "/" + blob.name)
        # Not the proxy's $upstream_cache_status: with `slice` it reports HIT on the main request
        # even when its slice was fetched; the origin's own log is the ground truth.
        return {
            "mode": mode,
            "seconds": seconds,
            "origin_bytes": origin.body_bytes,
            "origin_requests": origin.requests,
            "proxy_requests": via.requests,
            "proxy_bytes_to_sites": via.body_bytes,
            "states": ",".join(states),
        }

    # ---- profiling ------------------------------------------------------------------------

    def profile(self, out: Path, pyspy: str, wall: bool) -> Sample:
        """One extra cold read through imgstore with py-spy attached (not a timed sample).

        `wall` adds --idle: threads are sampled while blocked too (fdatasync, epoll), so the
        counts show where the time goes rather than where the CPU goes.
        """
        blob = self.images.main
        with self.scratch("profile") as d, self.imgstore(d, "site", [blob]) as m:
            path = self.blob_path("imgstore", m, blob)
            _expect_size(path, blob)
            self.cold_start([blob])
            argv = [
                pyspy,
                "record",
                "--pid",
                str(m.pid),
                "--rate",
                "200",
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ]
            if wall:
                argv.append("--idle")
            spy = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
            )
            try:
                time.sleep(1.0)  # py-spy needs a moment to attach; nothing to poll for
                seconds = timed_cat([path])
            finally:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                _, err = spy.communicate(timeout=60)
            if not out.exists():
                raise CaseError(f"py-spy wrote no profile: {err.decode(errors='replace')[-300:]}")
        return {"seconds": seconds, "profile": str(out)}


# ---- helpers ---------------------------------------------------------------------------------


class StatePoller(threading.Thread):
    """Polls user.imgstore.state from when it starts; notes when `verified` first shows."""

    def __init__(self, path: Path, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval_s = interval_s
        self.t0 = time.perf_counter()
        self.verified_at: float | None = None
        self.last_state: str | None = None
        self._stop_evt = threading.Event()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        super().start()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                self.last_state = os.getxattr(self.path, STATE_XATTR).decode()
            except OSError as exc:
                self.last_state = f"error: {exc.strerror}"
            if self.last_state == "verified":
                self.verified_at = time.perf_counter() - self.t0
                return
            if self.last_state == "corrupt":
                return
            self._stop_evt.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=10)


def timed_cat(paths: list[Path]) -> float:
    """Seconds for `cat PATH > /dev/null`, one cat per path, all at once."""
    return timed_parallel([["cat", str(p)] for p in paths])


def timed_parallel(commands: list[list[str]], timeout_s: float = READ_TIMEOUT_S) -> float:
    """Seconds for the commands run all at once; raises CaseError if one fails or hangs."""
    t0 = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    failures = []
    try:
        for c in commands:
            procs.append(
                subprocess.Popen(
                    c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            )
        for c, p in zip(commands, procs, strict=True):
            left = timeout_s - (time.perf_counter() - t0)
            try:
                _, err = p.communicate(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                raise CaseError(f"{' '.join(c)}: still running after {timeout_s:.0f} s") from None
            if p.returncode != 0:
                failures.append(
                    f"{' '.join(c)}: exit {p.returncode}: "
                    f"{err.decode(errors='replace').strip()[-200:]}"
                )
        seconds = time.perf_counter() - t0
    finally:
        # On failure or Ctrl-C no reader may outlive the case: it would keep the mount busy.
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failures:
        raise CaseError("; ".join(failures))
    return seconds


def run_checked(cmd: list[str]) -> None:
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=clean_env())
    if r.returncode != 0:
        raise CaseError(
            f"{cmd[0]} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}"
        )


def random_reads(path: Path, size: int, n: int, seed: int) -> list[float]:
    """Latency of each of `n` 4 KiB preads at random aligned offsets (same offsets per seed)."""
    rng = random.Random(seed)
    pages = size // 4096
    offsets = [rng.randrange(pages) * 4096 for _ in range(n)]
    lat = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, 4096, off)
            lat.append(time.perf_counter() - t0)
            if len(data) != 4096:
                raise CaseError(f"short read at {off}: {len(data)} bytes")
    finally:
        os.close(fd)
    return lat


def vm_hwm(pid: int) -> int | None:
    """Peak resident set of `pid` in bytes (VmHWM), None if it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid`, all threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _state(path: Path) -> str:
    try:
        return os.getxattr(path, STATE_XATTR).decode()
    except OSError as exc:
        return f"error: {exc.strerror}"


def _expect_size(path: Path, blob: Blob) -> None:
    size = path.stat().st_size
    if size != blob.size:
        raise CaseError(f"{path}: size {size}, expected {blob.size}")


def _read_all(path: Path) -> None:
    buf = bytearray(4 << 20)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _rmtree_unmounted(d: Path) -> None:
    """Remove a scratch directory, refusing to descend into anything still mounted."""
    # Mountpoints are direct children; never walk into one that is still mounted.
    for p in d.iterdir():
        if os.path.ismount(p):
            subprocess.run(["fusermount3", "-u", "-z", str(p)], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


CaseFn = Callable[[Bench, str, int], dict[str, Sample]]
