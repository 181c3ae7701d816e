"""Each daemon, started exactly as its unit's ExecStart= says, tells systemd READY=1 only once
it is usable: the mount answers, the SOAP listener accepts calls.

Only two things differ from a head node: the scripts' directory (this venv instead of
/usr/local/bin) and the file that the unit's IMAGEPROXY_CONFIG names (a test config).
"""

from __future__ import annotations

import configparser
import contextlib
import http.client
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registrar.e2e_stack import write_stack_config
from tests.support.cloud import StandInCloud
from tests.support.fusemount import lazy_unmount

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _unit(name: str, config: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """ExecStart, ExecStop and the environment of a unit, as systemd would run them here."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    service = parser["Service"]
    venv_bin = str(Path(shutil.which("imgstore")).parent) + "/"

    def command(key: str) -> list[str]:
        if key not in service:
            return []
        return shlex.split(service[key].replace("/usr/local/bin/", venv_bin))

    env = dict(item.split("=", 1) for item in shlex.split(service.get("Environment", "")))
    assert env["IMAGEPROXY_CONFIG"] == "/etc/imageproxy/imageproxy.toml"
    env["IMAGEPROXY_CONFIG"] = str(config)
    return command("ExecStart"), command("ExecStop"), env


@contextlib.contextmanager
def _notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    address = str(tmp_path / f"notify-{len(os.listdir(tmp_path))}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        yield sock, address


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _ready(sock: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for READY=1 with a deadline, failing at once if the daemon died."""
    sock.settimeout(0.2)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            message = sock.recv(256)
        except TimeoutError:
            continue
        assert message == b"READY=1", log.read_text(errors="replace")
        assert proc.poll() is None
        return
    pytest.fail(f"no READY=1 within 60 s:\n{log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def _ready_daemon(
    command: list[str], env: dict[str, str], tmp_path: Path, log_name: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a daemon as systemd does for Type=notify, wait for READY=1, stop it at the end."""
    log = tmp_path / log_name
    with _notify_socket(tmp_path) as (sock, address):
        proc = _start(command, {**env, "NOTIFY_SOCKET": address}, log)
        try:
            _ready(sock, proc, log)
            yield proc
        finally:
            _stop(proc)


@pytest.fixture
def site(tmp_path: Path, cloud: StandInCloud) -> Iterator[tuple[Path, Path, int]]:
    """A config for both daemons with a fixed free port; always unmounts at the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mountpoint = tmp_path / "images"
    mountpoint.mkdir()  # the README's install steps create it
    config = write_stack_config(
        tmp_path / "imageproxy.toml",
        cloud,
        tmp_path / "cache",
        mountpoint,
        tmp_path / "state",
    )
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    yield config, mountpoint, port
    lazy_unmount(mountpoint)


def test_imgstore_unit_is_ready_once_the_mount_answers(
    site: tuple[Path, Path, int], tmp_path: Path
) -> None:
    config, mountpoint, _ = site
    start, stop, env = _unit("imgstore.service", config)
    with _ready_daemon(start, env, tmp_path, "imgstore.log") as proc:
        assert os.path.ismount(mountpoint)
        assert os.listdir(mountpoint / "by-sha1") == []
        # ExecStop= as the unit says: the daemon unmounts and exits cleanly.
        subprocess.run(stop, env={**os.environ, **env}, check=True, timeout=60)
        assert proc.wait(30) == 0
        assert not os.path.ismount(mountpoint)


def test_registrar_unit_is_ready_once_it_answers_soap(
    site: tuple[Path, Path, int], tmp_path: Path
) -> None:
    config, mountpoint, port = site
    store_cmd, _, store_env = _unit("imgstore.service", config)
    serve_cmd, _, env = _unit("registrar.service", config)
    # Requires=/After= imgstore.service: the store is ready first.
    with _ready_daemon(store_cmd, store_env, tmp_path, "s.log") as store:
        with _ready_daemon(serve_cmd, env, tmp_path, "r.log") as registrar:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/axis2/services/IMAGEPROXY?wsdl")
            response = conn.getresponse()
            assert response.status == 200
            assert b"RegisterImage" in response.read()
            conn.close()
        assert registrar.returncode == 0
    assert store.returncode == 0
    assert not os.path.ismount(mountpoint)
