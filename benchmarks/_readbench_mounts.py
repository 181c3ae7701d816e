"""FUSE mounts for bench_read.py: imgstore, rclone and httpdirfs, each in the foreground.

Every mount runs as a child process we started (so its pid is the daemon's, for RSS and
py-spy), is waited for with a deadline, and is torn down with `fusermount3 -u`, then `-u -z`
and a kill if it will not go: a failed case must never leave a mount behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MOUNT_DEADLINE_S = 60.0


class MountError(Exception):
    """Raised when a FUSE mount does not come up, or its process dies."""


def imgstore_exe() -> str | None:
    """The imgstore console script of this venv, else the one on PATH."""
    here = Path(sys.executable).parent / "imgstore"
    return str(here) if here.exists() else shutil.which("imgstore")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tools: no inherited proxy settings, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env.update(extra or {})
    return env


class FuseMount:
    """A FUSE filesystem served by one foreground child process."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        mountpoint: Path,
        logfile: Path,
        env: dict[str, str] | None = None,
        ready: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.mountpoint = mountpoint
        self.logfile = logfile
        self.env = clean_env(env)
        # A path inside the mount that exists once it serves requests.
        self.ready = ready or mountpoint
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> FuseMount:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches the harness, which unmounts in order
            )
        deadline = time.monotonic() + MOUNT_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise MountError(
                    f"{self.name} exited with {self.proc.returncode} before mounting: "
                    f"{self.log_tail()}"
                )
            if os.path.ismount(self.mountpoint) and self.ready.exists():
                return
            time.sleep(0.02)
        self.stop()
        raise MountError(
            f"{self.name} did not mount within {MOUNT_DEADLINE_S:.0f} s: {self.log_tail()}"
        )

    def stop(self) -> None:
        """Unmount and reap the process; lazily and by force if it does not go cleanly."""
        if os.path.ismount(self.mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if r.returncode != 0:
                log.warning(
                    "%s: fusermount3 -u failed (%s); detaching lazily",
                    self.name,
                    r.stderr.decode(errors="replace").strip(),
                )
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True
                )
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("%s: still running 30 s after unmount; killing it", self.name)
                self.proc.kill()
                self.proc.wait(timeout=10)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)

    def log_tail(self, n: int = 600) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return " | ".join(text.strip().splitlines()[-8:])[-n:] or "(no output)"


def imgstore_mount(
    mountpoint: Path,
    cache_dir: Path,
    chunk_size: int,
    logfile: Path,
    cache_size: int | None = None,
    env: dict[str, str] | None = None,
) -> FuseMount:
    exe = imgstore_exe()
    if exe is None:
        raise MountError("imgstore is not installed")
    argv = [exe, "mount", "--cache-dir", str(cache_dir), "--chunk-size", str(chunk_size)]
    if cache_size is not None:
        argv += ["--cache-size", str(cache_size)]
    argv += ["--foreground", str(mountpoint)]
    return FuseMount("imgstore", argv, mountpoint, logfile, env, ready=mountpoint / "by-sha1")


def imgstore_add(
    cache_dir: Path, sha1: str, url: str, logfile: Path, env: dict[str, str] | None = None
) -> None:
    exe = imgstore_exe()
    if exe is None:
        raise MountError("imgstore is not installed")
    cache_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [exe, "add", "--cache-dir", str(cache_dir), sha1, url],
        capture_output=True,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
    )
    with logfile.open("ab") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise MountError(
            f"imgstore add failed ({r.returncode}): "
            f"{r.stderr.decode(errors='replace').strip()[-300:]}"
        )


def rclone_mount(mountpoint: Path, cache_dir: Path, origin_url: str, logfile: Path) -> FuseMount:
    argv = [
        "rclone",
        "mount",
        ":http:",
        str(mountpoint),
        "--http-url",
        origin_url + "/",
        "--vfs-cache-mode",
        "full",
        "--cache-dir",
        str(cache_dir),
        "--config",
        str(cache_dir.parent / "rclone.conf"),  # absent: defaults, no user config
    ]
    return FuseMount("rclone", argv, mountpoint, logfile)


def httpdirfs_mount(mountpoint: Path, cache_dir: Path, origin_url: str, logfile: Path) -> FuseMount:
    cache_dir.mkdir(parents=True, exist_ok=True)
    # 1.2.5 probes Range support in a way nginx does not answer as it expects.
    argv = [
        "httpdirfs",
        "-f",
        "--cache",
        "--cache-location",
        str(cache_dir),
        "--no-range-check",
        origin_url + "/",
        str(mountpoint),
    ]
    return FuseMount("httpdirfs", argv, mountpoint, logfile)


def tool_missing(tool: str) -> str | None:
    """Why `tool` cannot run here, or None if it can."""
    if tool == "imgstore":
        exe = imgstore_exe()
        if exe is None:
            return "imgstore console script not found"
        r = subprocess.run([exe, "mount", "--help"], capture_output=True, text=True)
        if r.returncode != 0 or "--foreground" not in r.stdout:
            return "`imgstore mount` is not implemented yet"
        return None
    exe = {"curl": "curl", "rclone": "rclone", "httpdirfs": "httpdirfs"}[tool]
    return None if shutil.which(exe) else f"{exe} not installed"
