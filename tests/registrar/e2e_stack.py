"""The whole site for end-to-end tests: nginx origin, imgstore mount, moto cloud, registrar.

Fixture ``stack`` (function scope) -> ``Stack``: a config file naming a fresh cache, mountpoint,
state dir and bucket; a real ``imgstore mount`` (``fuse_mount``); and ``stack.start()`` to run
the real registrar service (the ``registrar serve`` console script) as a subprocess, which
is stopped (SIGTERM, then SIGKILL) at teardown. The registrar listens on a free port and logs
its address; ``start`` waits for that line and for ``/healthz`` with a deadline, failing at
once if the process dies. At teardown it prints the registrars' and imgstore's logs, which
pytest shows beside a failed test's error.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zeep

from registrar.server import SERVICE
from tests.registrar.soap_server import SOAP11_BINDING, SOAP12_BINDING, WSDL
from tests.support.cloud import StandInCloud
from tests.support.fusemount import Mounted

# The installed `registrar` console script, beside this interpreter (as systemd runs it).
REGISTRAR = [str(Path(sys.executable).parent / "registrar")]
IMGSTORE = [sys.executable, "-m", "imgstore"]
_LISTENING = re.compile(r"SOAP service listening on (http://[^\s/]+)")


@dataclasses.dataclass
class Registrar:
    """A running registrar process and where it listens."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def endpoint(self) -> str:
        return self.base_url + SERVICE

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.base_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        return self.proc.returncode


@dataclasses.dataclass
class Stack:
    """Paths, the cloud, the mount and the registrar processes of one test."""

    root: Path
    config: Path
    cache_dir: Path
    mountpoint: Path
    state_dir: Path
    cloud: StandInCloud
    mount: Mounted
    registrars: list[Registrar] = dataclasses.field(default_factory=list)

    def start(
        self,
        deadline: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Registrar:
        """Start `registrar serve` (`env` added to ours; in `cwd`, default ours) and wait until
        it answers /healthz."""
        log_path = self.root / f"registrar-{len(self.registrars)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*REGISTRAR, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        registrar = Registrar(proc, "", log_path)
        self.registrars.append(registrar)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if proc.poll() is not None:
                pytest.fail(f"registrar exited with {proc.returncode}:\n{registrar.log_text()}")
            match = _LISTENING.search(registrar.log_text())
            if match:
                registrar.base_url = match.group(1)
                if _healthy(registrar):
                    return registrar
            time.sleep(0.05)
        registrar.stop(signal.SIGKILL)
        pytest.fail(f"registrar not ready within {deadline} s:\n{registrar.log_text()}")

    def zeep(self, registrar: Registrar, *, soap12: bool = False, timeout: float = 120) -> Any:
        """A zeep service proxy built from ORCA's WSDL, addressed at `registrar`."""
        transport = zeep.Transport(timeout=timeout, operation_timeout=timeout)
        client = zeep.Client(WSDL, transport=transport)
        binding = SOAP12_BINDING if soap12 else SOAP11_BINDING
        return client.create_service(binding, registrar.endpoint)

    def imgstore_ls(self) -> dict[str, dict[str, Any]]:
        import json

        out = subprocess.run(
            [*IMGSTORE, "ls", "--json", "--cache-dir", str(self.cache_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return {b["sha1"]: b for b in json.loads(out)}


def register_in_background(
    service: Any, url: str, signature: str
) -> tuple[threading.Thread, list[BaseException | str]]:
    """Call RegisterImage on a started thread; its answer or exception lands in the list."""
    outcome: list[BaseException | str] = []

    def call() -> None:
        try:
            outcome.append(service.RegisterImage(url=url, signature=signature))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    return caller, outcome


def _healthy(registrar: Registrar) -> bool:
    host, port = registrar.host_port
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def write_stack_config(
    path: Path,
    cloud: StandInCloud,
    cache_dir: Path,
    mountpoint: Path,
    state_dir: Path,
    store: dict[str, Any] | None = None,
) -> Path:
    """The cloud fixture's config plus `listen` on a free port, loopback allowed, and [store]."""
    cloud.write_config(path, state_dir=state_dir)
    text = path.read_text().replace(
        "[registrar]\n",
        '[registrar]\nlisten = "127.0.0.1:0"\nallowed_networks = ["127.0.0.0/8"]\n',
        1,
    )
    lines = ["", "[store]", f'cache_dir = "{cache_dir}"', f'mountpoint = "{mountpoint}"']
    for key, value in (store or {}).items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path.write_text(text + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def stack_factory(
    tmp_path: Path, cloud: StandInCloud, fuse_mount: Callable[..., Mounted]
) -> Iterator[Callable[..., Stack]]:
    """Build a Stack; `store` adds [store] keys (e.g. read_deadline)."""
    stacks: list[Stack] = []

    def build(store: dict[str, Any] | None = None) -> Stack:
        root = tmp_path / f"site{len(stacks)}"
        root.mkdir()
        cache_dir, mountpoint, state_dir = root / "cache", root / "mnt", root / "state"
        config = write_stack_config(
            root / "imageproxy.toml", cloud, cache_dir, mountpoint, state_dir, store
        )
        mount = fuse_mount(
            [*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mountpoint)],
            mountpoint,
        )
        stack = Stack(root, config, cache_dir, mountpoint, state_dir, cloud, mount)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        for registrar in stack.registrars:
            registrar.stop()
        # pytest shows a test's captured output only when it fails: then the daemons' own
        # account is there beside the assertion, for a failure that does not come back.
        for n, registrar in enumerate(stack.registrars):
            print(f"--- registrar {n} log (last 6000 characters) ---")
            print(registrar.log_text()[-6000:])
        print("--- imgstore log (last 6000 characters) ---")
        print(stack.mount.stderr_text()[-6000:])


@pytest.fixture
def stack(stack_factory: Callable[..., Stack]) -> Stack:
    return stack_factory()
