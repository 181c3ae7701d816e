"""`registrar register`, `registrar list` and `registrar serve` from the shell, against the real
mount, nginx and the moto cloud, through the installed `registrar` console script (the functions
of registrar/service_cli.py)."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import REGISTRAR, Stack
from tests.registrar.script_runs import run_on_terminal, run_script
from tests.registrar.soap_javaprops import loads
from tests.support.images import ImageFactory
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


def _run(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--config", str(config)] if config else []
    return run_script(args[0], *extra, *args[1:])


def test_register_prints_the_same_answer_and_list_shows_it(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    done = _run("register", images.metadata_url, images.metadata_sha1, config=stack.config)
    assert done.returncode == 0, done.stderr
    answer = loads(done.stdout)
    assert done.stdout == (
        f"FILESYSTEM={answer['FILESYSTEM']}\nKERNEL={answer['KERNEL']}\n"
        f"RAMDISK={answer['RAMDISK']}\n"
    )
    assert sorted(stack.cloud.image_ids()) == sorted(answer.values())

    # The SOAP service answers the same from the registry the CLI filled.
    service = stack.zeep(stack.start())
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert text == done.stdout
    assert len(stack.cloud.calls_of("RegisterImage")) == 3

    listed = _run("list", config=stack.config)
    assert listed.returncode == 0, listed.stderr
    for image_id in answer.values():
        assert image_id in listed.stdout
    assert images.metadata_sha1 in listed.stdout
    assert "machine" in listed.stdout and "kernel" in listed.stdout


def test_cli_errors_are_one_line_with_documented_exit_codes(
    stack: Stack, origin: Origin, tmp_path: Path
) -> None:
    bad = _run("register", "http://127.0.0.1:9/m.xml", "xyz", config=stack.config)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "registrar register: metadata signature 'xyz' is not a SHA-1 (40 hexadecimal digits)"
    ]
    missing = _run("register", origin.url("nothing.xml"), "a" * 40, config=stack.config)
    assert missing.returncode == 1
    [line] = missing.stderr.strip().splitlines()
    assert line.startswith("registrar register: cannot fetch metadata at ")

    # The metadata is there but is not what its SHA-1 says: verification failed, exit 1.
    meta = origin.put("m.xml", b"<image/>")
    wrong = _run("register", meta, "b" * 40, config=stack.config)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [
        f"registrar register: signature {'b' * 40} does not match computed signature "
        f"{hashlib.sha1(b'<image/>').hexdigest()} for metadata at {meta}"
    ]

    no_config = _run("serve", config=tmp_path / "absent.toml")
    assert no_config.returncode == 2
    assert no_config.stderr.strip().splitlines()[-1].endswith("does not exist")
    absent = _run("list", "--state-dir", str(tmp_path / "absent"))
    assert absent.returncode == 2
    expected = f"registrar list: state directory {tmp_path / 'absent'} does not exist\n"
    assert absent.stderr == expected
    (tmp_path / "fresh").mkdir()
    fresh = _run("--debug", "list", "--state-dir", str(tmp_path / "fresh"))
    assert (fresh.returncode, fresh.stderr) == (0, "")
    assert fresh.stdout == f"nothing registered yet (no registry in {tmp_path / 'fresh'})\n"
    assert list((tmp_path / "fresh").iterdir()) == []  # `list` created nothing


def test_serve_tells_systemd_it_is_ready_and_stops_cleanly_on_sigterm(
    stack: Stack, tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(60)
        registrar = stack.start(env={"NOTIFY_SOCKET": address})
        assert notify.recv(64) == b"READY=1"
        assert registrar.stop(signal.SIGTERM) == 0
        assert notify.recv(64) == b"STOPPING=1"
    assert "SIGTERM: stopping" in registrar.log_text()


def test_register_shows_progress_on_a_terminal_and_keeps_stdout_clean(
    stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    out = tmp_path / "answer.txt"
    shown = run_on_terminal(
        "register",
        "--config",
        str(stack.config),
        images.metadata_url,
        images.metadata_sha1,
        stdout=out,
    )
    assert "bundling FILESYSTEM" in shown  # the terminal saw the progress bars
    answer = loads(out.read_text())
    assert sorted(stack.cloud.image_ids()) == sorted(answer.values())
    assert out.read_text().count("\n") == 3


def test_cli_and_server_registering_the_same_image_at_once_do_the_work_once(
    stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    # Two processes: the registry's job claims make them share each part's registration.
    images = image_factory.publish(origin, size_mib=16, fs_format="tar.gz")
    stack.cloud.hold_pending = True  # the server's kernel and ramdisk stay in flight
    service = stack.zeep(stack.start())
    answers: list[str] = []
    caller = threading.Thread(
        target=lambda: answers.append(
            service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
        )
    )
    caller.start()
    _wait_for(lambda: len(stack.cloud.calls_of("RegisterImage")) == 2, "the server's two claims")
    log = tmp_path / "cli.log"
    with open(log, "w") as err:
        cli = subprocess.Popen(
            [
                *REGISTRAR,
                "register",
                "--config",
                str(stack.config),
                images.metadata_url,
                images.metadata_sha1,
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    _wait_for(lambda: "which is registering it" in log.read_text(), "the CLI to wait on a claim")
    stack.cloud.hold_pending = False
    cli_out, _ = cli.communicate(timeout=170)
    caller.join(170)
    assert cli.returncode == 0, log.read_text()
    assert answers == [cli_out]
    assert len(stack.cloud.calls_of("RegisterImage")) == 3
    for part in images.parts.values():
        size = part.path.stat().st_size
        assert size <= origin.bytes_sent(part.name) < size + 64 * 1024


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
