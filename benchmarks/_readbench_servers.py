"""Real nginx servers for bench_read.py: the origin and the slice-caching site proxy.

Each server runs from its own directory (config, pid, logs, temp and cache paths), so nothing
touches the system's nginx. Bytes sent are counted from the access log, whose line format is
`msec status body_bytes_sent "uri" "range" cache_status request_time`.
"""

from __future__ import annotations

import logging
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NGINX = "/usr/sbin/nginx"
_HERE = Path(__file__).resolve().parent


class ServerError(Exception):
    """Raised when an nginx server cannot be configured or does not come up."""


@dataclass(frozen=True)
class Traffic:
    """What a server's access log recorded over a window: requests and body bytes sent."""

    requests: int
    body_bytes: int
    by_status: dict[int, int]
    cache_status: dict[str, int]
    # Sum of $request_time: divided by a case's wall time, the mean number of requests in
    # flight; a sequential reader that keeps several ranges going shows more than 1.
    busy_s: float


class Nginx:
    """One nginx master in the foreground, configured from a template in benchmarks/."""

    def __init__(self, template: str, workdir: Path, **values: str) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        text = (_HERE / template).read_text()
        for key, value in {"DIR": str(self.dir), "PORT": str(self.port), **values}.items():
            text = text.replace(f"@@{key}@@", value)
        if "@@" in text:
            near = text[text.index("@@") :][:30]
            raise ServerError(f"{template}: unfilled placeholder near {near!r}")
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, deadline_s: float = 15.0) -> None:
        cmd = [NGINX, "-p", str(self.dir), "-c", str(self.conf), "-e", str(self.dir / "error.log")]
        self.access_log.touch()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ServerError(f"nginx exited ({shlex.join(cmd)}): {err.strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise ServerError(f"nginx did not listen on port {self.port} within {deadline_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_offset(self) -> int:
        """Where the access log ends now: pass it to `traffic_since` after the case."""
        return self.access_log.stat().st_size

    def traffic_since(self, offset: int, uri: str | None = None) -> Traffic:
        """Sum the access log from `offset`, only lines for `uri` if given.

        nginx writes a line when a request completes, so stop the clients first (unmount) to
        have every request of the case in the log.
        """
        requests = body = 0
        busy = 0.0
        by_status: dict[int, int] = {}
        cache: dict[str, int] = {}
        with self.access_log.open("rb") as f:
            f.seek(offset)
            for raw in f:
                fields = raw.decode(errors="replace").split('"')
                head = fields[0].split()
                if len(head) < 3 or len(fields) < 5:
                    continue
                if uri is not None and fields[1] != uri:
                    continue
                status, sent = int(head[1]), int(head[2])
                requests += 1
                body += sent
                by_status[status] = by_status.get(status, 0) + 1
                tail = fields[4].split() or ["-"]
                cache[tail[0]] = cache.get(tail[0], 0) + 1
                if len(tail) > 1:
                    busy += float(tail[1])
        return Traffic(requests, body, by_status, cache, busy)


def origin_server(workdir: Path, root: Path) -> Nginx:
    return Nginx("nginx_origin.conf", workdir, ROOT=str(root))


def slice_proxy(workdir: Path, origin_port: int, slice_size: int, max_size: int) -> Nginx:
    return Nginx(
        "nginx_slice_proxy.conf",
        workdir,
        ORIGIN_PORT=str(origin_port),
        SLICE=f"{slice_size // 1024}k",
        MAX_SIZE=f"{max(max_size, 1 << 20) // (1 << 20)}m",
    )


def free_port() -> int:
    """A TCP port that was free a moment ago (nginx binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
