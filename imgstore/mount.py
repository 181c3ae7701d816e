"""Wiring of the mount: one nursery, signals, systemd notify, daemonizing, stale-mount cleanup.

`run_mount` returns only once the mount is usable. Without `foreground` it forks: the child
mounts, moves its stdout/stderr to cache_dir/imgstore.log, then writes one byte to a pipe; the
parent exits 0 on that byte, or reports failure when the pipe closes without it (the child
died, its error is on stderr).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import trio

from imgstore import metrics_listener
from imgstore.config import StoreConfig
from imgstore.errors import MountError
from imgstore.fs import Operations
from imgstore.store import open_store

log = logging.getLogger(__name__)

STOP_GRACE = 2.0  # seconds running requests get to finish after SIGTERM
# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
# The hasher and the writer are one chain each, and every step ends by taking the GIL back
# from the trio thread, which serves FUSE requests in Python: with 5 ms, a cold 1 GiB read's
# hash steps spent ~0.5 s waiting on top of 0.7 s of hashing (0.1 ms: 1.55 s -> 1.4 s).
GIL_SWITCH_S = 0.0001


def notify_systemd(message: bytes) -> None:
    """Send `message` (e.g. b"READY=1") to $NOTIFY_SOCKET if systemd gave us one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    return any(where == target for where, _ in _mounts())


_OCTAL = re.compile(r"\\([0-7]{3})")


def _mounts() -> Iterator[tuple[str, str]]:
    """(mount point, "major:minor") of each mount this process sees, from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                # Space, tab, newline and backslash are octal escapes (\040) in mountinfo.
                where = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
                yield where, fields[2]


def clean_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount a dead FUSE mount ("Transport endpoint is not connected")."""
    try:
        os.stat(mountpoint)
        # statfs always reaches the filesystem; stat may be answered from the kernel's cache.
        os.statvfs(mountpoint)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            if exc.errno == errno.ENOENT:
                raise MountError(f"mountpoint {mountpoint} does not exist") from None
            raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    log.warning("cleaning up the dead mount at %s", mountpoint)
    unmount(mountpoint, lazy=True)


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {res.stderr.strip() or res.returncode}")


def lock_cache_dir(cfg: StoreConfig, mountpoint: Path) -> int:
    """One mount per cache directory: hold an exclusive flock on cache_dir/mount.lock."""
    cfg.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(cfg.cache_dir / "mount.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise MountError(f"cache {cfg.cache_dir} is already mounted ({other})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} at {mountpoint}\n".encode(), 0)
    return fd


def mount_options(cfg: StoreConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {f"fsname={cfg.fs_name}", "subtype=imgstore", "ro"}
    if cfg.allow_other:
        options.add("allow_other")
    return options


def set_readahead(mountpoint: Path, size: int) -> None:
    """Let the kernel read ahead `size` bytes for readers of verified blobs (page cache).

    A FUSE mount starts with 128 KiB, so a warm read came to the daemon in small pieces. Half
    the store's own window (16 MiB by default) cut a warm 1 GiB read's daemon CPU by a third;
    the whole window was no faster and took more CPU. Only root may change it; otherwise the
    default stays, which is slower but correct.
    """
    device = _mount_device(mountpoint)
    if device is None:
        log.debug("no mountinfo line for %s: readahead left as is", mountpoint)
        return
    path = Path("/sys/class/bdi") / device / "read_ahead_kb"
    try:
        path.write_text(f"{max(128, size // 2 // 1024)}\n")
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc)


def _mount_device(mountpoint: Path) -> str | None:
    """ "major:minor" of the mount at `mountpoint`, from /proc/self/mountinfo.

    Not from stat(): that would be a FUSE request to this very process, which does not
    answer yet.
    """
    found = None
    try:
        for where, device in _mounts():
            if where == str(mountpoint):
                found = device  # the last one is the mount on top
    except OSError:
        return None
    return found


def run_mount(cfg: StoreConfig, mountpoint: Path, foreground: bool) -> None:
    """Mount and serve until unmounted or signalled; see the module docstring."""
    # abspath, not resolve(): stat on a dead mount fails, and the daemon chdirs to /.
    mountpoint = Path(os.path.abspath(mountpoint))
    cfg.cache_dir = Path(os.path.abspath(cfg.cache_dir))
    clean_stale_mount(mountpoint)
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already mounted")
    if foreground:
        lock_fd = lock_cache_dir(cfg, mountpoint)
        trio.run(_serve, cfg, mountpoint, None)
        os.close(lock_fd)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.read(1)
            why = pipe.read().decode(errors="replace") if ready == b"0" else ""
        if ready != b"1":
            os.waitpid(pid, 0)
            # The daemon's reason, as the one line the caller prints; without one it died
            # before it could say (its traceback is above).
            raise MountError(why or f"mounting {mountpoint} failed (see the messages above)")
        return
    os.close(read_end)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory busy
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    ready = Readiness(write_end)
    code = 0
    try:
        lock_fd = lock_cache_dir(cfg, mountpoint)
        trio.run(_serve, cfg, mountpoint, ready)
        os.close(lock_fd)
    except MountError as exc:
        if not ready.fail(str(exc)):
            print(f"imgstore: {exc}", file=sys.stderr)  # after it was ready: to its log
        code = 1
    except BaseException:
        log.exception("the mount daemon crashed")
        code = 1
    os._exit(code)


class Readiness:
    """A daemon's word to the `imgstore mount` that forked it: b"1" (mounted), or b"0" and
    why not. Said once; the parent stops listening after it."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def ok(self) -> None:
        self._say(b"1")

    def fail(self, why: str) -> bool:
        """Tell the parent why mounting failed; False if it was told already."""
        return self._say(b"0" + why.encode())

    def _say(self, word: bytes) -> bool:
        if self.fd is None:
            return False
        os.write(self.fd, word)
        os.close(self.fd)
        self.fd = None
        return True


async def _serve(cfg: StoreConfig, mountpoint: Path, ready: Readiness | None) -> None:
    sys.setswitchinterval(GIL_SWITCH_S)
    listener = await metrics_listener.bind(cfg.metrics_listen) if cfg.metrics_listen else None
    async with open_store(cfg) as store:
        if listener is not None:
            await store.nursery.start(metrics_listener.serve, store.metrics, listener)
        try:
            # The kernel sets a FUSE mount's readahead when it gets the answer to INIT,
            # after init() returns: so the first open sets it.
            ops = Operations(store, lambda: set_readahead(mountpoint, cfg.readahead_max))
            pyfuse3.init(ops, str(mountpoint), mount_options(cfg))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mountpoint}: {exc}") from None
        try:
            with trio.CancelScope() as serving:
                store.nursery.start_soon(_signals, serving)
                log.info("mounted %s (cache %s)", mountpoint, cfg.cache_dir)
                _announce(ready, cfg.cache_dir / "imgstore.log")
                await pyfuse3.main()
        finally:
            # Unmount before anything else: a live mount without a daemon is the
            # "Transport endpoint is not connected" state we promise never to leave.
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)


def _announce(ready: Readiness | None, log_path: Path) -> None:
    if ready is not None:
        # A daemon must not hold its caller's stdout/stderr open (a caller reading them would
        # wait for our exit): from now on it logs to cache_dir/imgstore.log.
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        ready.ok()
    notify_systemd(b"READY=1")


async def _signals(serving: trio.CancelScope) -> None:
    """On SIGTERM/SIGINT/SIGHUP: stop taking requests, then unmount.

    pyfuse3.terminate() waits for running handlers; a read waiting on a stalled origin could
    hold the exit for the whole read deadline, longer than systemd's stop timeout. So after a
    short grace period the handlers are cancelled (their readers get an error).
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            notify_systemd(b"STOPPING=1")
            pyfuse3.terminate()
            await trio.sleep(STOP_GRACE)
            log.warning("requests still running after %gs: cancelling them", STOP_GRACE)
            serving.cancel()
            return
