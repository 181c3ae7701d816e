"""`scripts/demo`, run the way CI would: as a subprocess, no stdin, no terminal.

It must print three ids from the stand-in cloud, the mount listing, and a second answer that is
identical and came from the registry; and it must leave nothing behind, also when interrupted.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo"

_ANSWER = re.compile(
    r"^answer after [\d.]+ s:\nFILESYSTEM=(\S+)\nKERNEL=(\S+)\nRAMDISK=(\S+)$", re.M
)
_PART = re.compile(r"^([0-9a-f]{40})  (\S+)  \((ZFILESYSTEM|KERNEL|RAMDISK), (\d+) bytes\)$", re.M)


def _workdir(out: str) -> Path:
    match = re.search(r"working directory (\S+)", out)
    assert match, out[:2000]
    return Path(match.group(1))


def _assert_nothing_left(workdir: Path) -> None:
    assert not workdir.exists(), f"{workdir} was not removed"
    assert str(workdir) not in Path("/proc/mounts").read_text(), "a mount was left behind"
    leftovers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline:
            leftovers.append(f"{proc.name}: {cmdline}")
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_registers_an_image_and_answers_the_repeat_from_the_registry() -> None:
    res = subprocess.run(
        [str(DEMO)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\n{out[-4000:]}\n{res.stderr[-4000:]}"

    answers = _ANSWER.findall(out)
    assert len(answers) == 2, out
    first, second = answers
    assert all(re.fullmatch(r"ami-[0-9a-f]+", i) for i in first), first  # moto's id format
    assert len(set(first)) == 3, "kernel, ramdisk and machine image are three registrations"
    assert second == first
    assert re.search(r"^identical ids, answered from the registry", out, re.M), out
    # The first call fetched and uploaded; the second did neither. Both durations are shown.
    assert re.search(r"^duration +[\d.]+ s +[\d.]+ s$", out, re.M), out
    assert re.search(r"^origin requests +[1-9]\d* +0$", out, re.M), out
    assert re.search(r"^S3 PUT requests +[1-9]\d* +0$", out, re.M), out

    # The listing shows every part under its SHA-1 with its exact size, verified.
    parts = _PART.findall(out)
    assert sorted(p[2] for p in parts) == ["KERNEL", "RAMDISK", "ZFILESYSTEM"]
    for sha1, _name, _type, size in parts:
        assert re.search(rf"^-r--r--r-- .* {size} .* {sha1}$", out, re.M), (sha1, out)
        assert f"# file: by-sha1/{sha1}\n" in out
    assert out.count('user.imgstore.state="verified"') == 4  # the parts and the metadata

    # The demo itself fails unless /metrics shows the work; here: both daemons' were printed.
    assert "imageproxy_registrar_registry_hits_total 1.0" in out
    assert re.search(r"^imgstore_origin_bytes_total [1-9]", out, re.M), out

    assert "=== Cleaning up" in out
    _assert_nothing_left(_workdir(out))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_interrupted_with_everything_running_cleans_up() -> None:
    proc = subprocess.Popen(
        [str(DEMO)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = b""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + 240
    try:
        # The registrar is the last daemon to start: from then on the nginx origin,
        # moto_server, the imgstore mount and the registrar are all up.
        while b"\nlistening at http://" not in out:
            assert proc.poll() is None, out.decode(errors="replace")
            assert time.monotonic() < deadline, out.decode(errors="replace")
            if selector.select(timeout=1):
                out += proc.stdout.read() or b""
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        rest, _ = proc.communicate(timeout=120)
    finally:
        selector.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (out + rest).decode(errors="replace")
    assert proc.returncode == 130, text
    assert "scripts/demo: interrupted (SIGINT)" in text
    assert "stopped: nginx, moto_server, registrar, imgstore" in text
    _assert_nothing_left(_workdir(text))
