"""Run a FUSE filesystem command in the foreground for a test, and always clean it up.

Fixture
-------
``fuse_mount`` (function scope) is a factory::

    m = fuse_mount(cmd, mountpoint, env=None, timeout=30)   # -> Mounted

It starts ``cmd`` (a list; it must stay in the foreground, e.g. ``imgstore mount
--foreground ...``) as a subprocess in its own session, with stdout/stderr captured to files,
and polls until ``os.path.ismount(mountpoint)``. If the process exits first, the test fails at
once (``pytest.fail``) with its exit code and the tail of its stderr; if the deadline passes,
the test fails saying so, with the stderr tail. In both cases the process is already cleaned up.
``env`` entries are added to the current environment. ``mountpoint`` is created if missing.

At teardown, for every mount the factory made, even when the test failed: ``fusermount3 -u -z
MOUNTPOINT`` (errors ignored, so an already unmounted or stale mount is fine), then SIGTERM to
the process group, SIGKILL after a grace period, and reap.

Plain helpers for use without the fixture (and to test the cleanup path itself):

- ``start_mount(cmd, mountpoint, *, logdir, env=None, timeout=30, on_start=None) -> Mounted``
  -- same as the factory; the caller owns cleanup (``Mounted.cleanup()``, or ``with
  start_mount(...) as m:``). ``on_start(m)`` is called right after the process starts, before
  waiting, so a caller can track a process whose mount then fails.
- ``lazy_unmount(mountpoint) -> None`` -- ``fusermount3 -u -z``, errors ignored.

``Mounted``
-----------
- ``proc: subprocess.Popen``, ``mountpoint: Path``, ``stdout_path``, ``stderr_path: Path``.
- ``stderr_text() -> str`` / ``stdout_text() -> str`` -- what the process wrote so far.
- ``kill(sig=signal.SIGKILL) -> None`` -- send a signal to the process (not its group); e.g.
  ``kill()`` then ``wait()`` leaves a dead mount behind, as a crash does.
- ``wait(timeout=10) -> int`` -- wait for the process to exit; return its exit code.
- ``unmount(timeout=10) -> int`` -- ``fusermount3 -u`` (not lazy: fails the test if busy), then
  wait for the process to exit and return its exit code (a clean filesystem exits 0).
- ``cleanup() -> None`` -- the teardown described above; idempotent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

FUSERMOUNT = "fusermount3"
_TERM_GRACE = 5.0
_POLL = 0.01


def lazy_unmount(mountpoint: Path) -> None:
    """Detach ``mountpoint`` now even if busy; ignore "not mounted" and similar errors."""
    subprocess.run(
        [FUSERMOUNT, "-u", "-z", str(mountpoint)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


class Mounted:
    """A filesystem process and its mount point; see the module docstring."""

    def __init__(
        self, proc: subprocess.Popen[bytes], mountpoint: Path, stdout: Path, stderr: Path
    ) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self.stdout_path = stdout
        self.stderr_path = stderr

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def _tail(self, n: int = 3000) -> str:
        return self.stderr_text()[-n:] or "(stderr empty)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"filesystem process {self.proc.pid} still running {timeout}s later; "
                f"stderr:\n{self._tail()}"
            )

    def unmount(self, timeout: float = 10) -> int:
        res = subprocess.run(
            [FUSERMOUNT, "-u", str(self.mountpoint)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            pytest.fail(f"fusermount3 -u {self.mountpoint} failed: {res.stderr.strip()}")
        return self.wait(timeout)

    def cleanup(self) -> None:
        lazy_unmount(self.mountpoint)
        if self.proc.poll() is None:
            # The process runs in its own session: signal the group so helpers die with it.
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=_TERM_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait()
        # A child that outlived a crashed parent must not keep running either.
        _signal_group(self.proc, signal.SIGKILL)

    def __enter__(self) -> Mounted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(
    cmd: list[str], mountpoint: Path, logdir: Path, env: Mapping[str, str] | None
) -> Mounted:
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mountpoint):
        pytest.fail(f"{mountpoint} is already a mount point before starting {cmd[0]}")
    logdir.mkdir(parents=True, exist_ok=True)
    stem = f"{mountpoint.name or 'mnt'}-{time.monotonic_ns()}"
    out_path = logdir / f"{stem}.stdout"
    err_path = logdir / f"{stem}.stderr"
    full_env = dict(os.environ) if env is None else {**os.environ, **env}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=full_env,
            start_new_session=True,
        )
    return Mounted(proc, mountpoint, out_path, err_path)


def _await_mount(m: Mounted, cmd: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(m.mountpoint):
        code = m.proc.poll()
        if code is not None:
            m.cleanup()
            pytest.fail(
                f"filesystem process exited with code {code} before mounting {m.mountpoint}\n"
                f"command: {cmd}\nstderr:\n{m._tail()}"
            )
        if time.monotonic() > deadline:
            m.cleanup()
            pytest.fail(
                f"{m.mountpoint} not mounted within {timeout}s (process {m.proc.pid} still "
                f"running)\ncommand: {cmd}\nstderr:\n{m._tail()}"
            )
        time.sleep(_POLL)


def start_mount(
    cmd: list[str],
    mountpoint: Path,
    *,
    logdir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    on_start: Callable[[Mounted], None] | None = None,
) -> Mounted:
    """Start ``cmd`` and return once ``mountpoint`` is mounted; fail the test otherwise."""
    m = _spawn(cmd, mountpoint, logdir, env)
    if on_start is not None:
        on_start(m)
    _await_mount(m, cmd, timeout)
    return m


@pytest.fixture
def fuse_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mounted]]:
    started: list[Mounted] = []
    logdir = tmp_path_factory.mktemp("fuse-logs")

    def mount(
        cmd: list[str],
        mountpoint: Path,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> Mounted:
        return start_mount(
            cmd, mountpoint, logdir=logdir, env=env, timeout=timeout, on_start=started.append
        )

    try:
        yield mount
    finally:
        # Newest first: a mount nested inside another must go before its parent.
        for m in reversed(started):
            m.cleanup()
