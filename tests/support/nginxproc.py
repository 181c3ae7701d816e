"""One nginx process for the test servers: start, wait until it listens, count, stop.

Shared by tests/support/origin.py (the origin) and tests/support/frontnginx.py (a proxy or a
redirector in front of it); each writes its own configuration.

- The port is picked before nginx binds it, so another process may win the race: a few ports
  are tried before giving up. Everything nginx says goes to the work directory's error.log and
  stderr.log, whose tail is in every failure message.
- ``sync(path)``: nginx writes an access-log line when a request is finalised, and one process
  handles requests in order, so after a private request to ``path`` shows up in the log, every
  earlier request is there too. Counting after a sync is exact.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pytest

NGINX = "/usr/sbin/nginx"
# nginx's temporary directories; the configurations point each at the work directory.
TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conf(
    workdir: Path, port: int, log_format: str, sync_prefix: str, http: str, server: str
) -> str:
    """A configuration: one server on 127.0.0.1:`port`, logging each request as `log_format`.

    `http` and `server` are extra lines for those blocks; `sync_prefix` answers 204 (see
    `NginxProcess.sync`). As root, nginx would hand requests to "nobody", who cannot read
    pytest's 0700 temp dirs; with master_process off there is no worker and no privilege drop,
    and one process makes the log ordering argument hold.
    """
    temps = "\n".join(f"    {k}_temp_path {workdir / ('tmp_' + k)};" for k in TEMPS)
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
events {{ worker_connections 512; }}
http {{
    log_format counted escape=json {log_format};
    # No buffer= and no flush=: each line is written when its request is finalised.
    access_log {workdir / "access.log"} counted;
{temps}
{http}
    server {{
        listen 127.0.0.1:{port};
        location ^~ {sync_prefix} {{ return 204; }}
{server}
    }}
}}
"""


class NginxProcess:
    """nginx run in the foreground from `workdir`, with the configuration `conf(port)`."""

    def __init__(self, workdir: Path, conf: Callable[[int], str]) -> None:
        self.workdir = workdir
        self._conf = conf
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.access_log = workdir / "access.log"

    @property
    def running(self) -> bool:
        return self._proc is not None

    def start(self) -> int:
        """Start on a free port and return it once nginx accepts connections."""
        for k in TEMPS:
            (self.workdir / f"tmp_{k}").mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port()
            if self._try_start():
                return self.port
        pytest.fail(f"nginx would not start:\n{self.error_tail()}")

    def _try_start(self) -> bool:
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._conf(self.port))
        err_log = self.workdir / "error.log"
        cmd = [NGINX, "-p", str(self.workdir), "-c", str(conf), "-e", str(err_log)]
        with open(self.workdir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in self.error_tail():
                    return False
                pytest.fail(f"nginx exited at start:\n{self.error_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.005)
        self.stop()
        pytest.fail(f"nginx did not listen within {_TIMEOUT}s:\n{self.error_tail()}")

    def error_tail(self) -> str:
        text = ""
        for name in ("error.log", "stderr.log"):
            p = self.workdir / name
            if p.exists():
                text += p.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def get(self, path: str) -> bytes:
        # http.client, not urllib: no proxy settings from the environment apply.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=_TIMEOUT)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def sync(self, path: str) -> None:
        """Request `path` (unique) and wait until the access log has it; see the docstring."""
        if self._proc is None:
            raise RuntimeError("nginx is not running")
        self.get(path)
        needle = path.encode()
        deadline = time.monotonic() + _TIMEOUT
        while needle not in self.access_log.read_bytes():
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not log sync request {path} within {_TIMEOUT}s")
            time.sleep(0.002)


class CountedServer:
    """What the test servers share: one NginxProcess, its access log parsed and counted.

    A subclass gives the configuration, the sync prefix, and `_name(entry)`: the file an
    access-log entry is about, or None for requests that are not counted.
    """

    sync_prefix = "/.sync/"

    def __init__(self, workdir: Path, conf: Callable[[int], str]) -> None:
        self.workdir = workdir
        self._nginx = NginxProcess(workdir, conf)
        self._skip = 0  # counted entries hidden by reset_counts()
        self.port = 0

    def _start(self) -> None:
        self.port = self._nginx.start()

    def stop(self) -> None:
        self._nginx.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _name(self, entry: dict) -> str | None:
        raise NotImplementedError

    def _entries(self) -> list[dict]:
        self._nginx.sync(f"{self.sync_prefix}{uuid.uuid4().hex}")
        out = []
        for line in self._nginx.access_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["uri"].startswith(self.sync_prefix):
                continue
            name = self._name(entry)
            if name is not None:
                entry["name"] = name
                out.append(entry)
        return out

    def log(self, name: str | None = None) -> list[dict]:
        entries = self._entries()[self._skip :]
        if name is None:
            return entries
        name = name.lstrip("/")
        return [e for e in entries if e["name"] == name]

    def requests(self, name: str | None = None) -> int:
        return len(self.log(name))

    def reset_counts(self) -> None:
        self._skip = len(self._entries())
