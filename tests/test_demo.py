"""`scripts/demo`, run the way CI would: as a subprocess, no stdin, no terminal.

It must print three ids from the stand-in cloud, the mount listing, and a second answer that is
identical and came from the registry; and it must leave nothing behind, also when interrupted.
`scripts/demo openstack` must do the same into a real Glance, whose own database and file store
must then hold the answer's four images with the published bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import selectors
import shutil
import signal
import sqlite3
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
    _assert_processes_and_mounts_gone(workdir)


def _assert_processes_and_mounts_gone(workdir: Path) -> None:
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
@pytest.mark.parametrize(
    ("args", "cloud"), [([], "moto_server"), (["openstack"], "glance")], ids=["moto", "glance"]
)
def test_demo_interrupted_with_everything_running_cleans_up(args: list[str], cloud: str) -> None:
    proc = subprocess.Popen(
        [str(DEMO), *args],
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
        # The registrar is the last daemon to start: from then on the nginx origin, the
        # cloud (moto_server or Glance), the imgstore mount and the registrar are all up.
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
    assert f"stopped: nginx, {cloud}, registrar, imgstore" in text
    _assert_nothing_left(_workdir(text))


_OS_ANSWER = re.compile(
    r"^answer after [\d.]+ s:\n"
    r"FILESYSTEM=(\S+)\nKERNEL=(\S+)\nRAMDISK=(\S+)\nQCOW2=(\S+)$",
    re.M,
)
_OS_PART = re.compile(
    r"^([0-9a-f]{40})  (\S+)  \((ZFILESYSTEM|KERNEL|RAMDISK|QCOW2), (\d+) bytes\)$", re.M
)
_SHOW = re.compile(r"^\$ openstack image show (\S+)   # (\w+)\n((?:[+|].*\n)+)", re.M)
# What ORCA's answer names, as Glance must hold it: (disk_format, container_format).
_FORMATS = {
    "FILESYSTEM": ("ami", "ami"),
    "KERNEL": ("aki", "aki"),
    "RAMDISK": ("ari", "ari"),
    "QCOW2": ("qcow2", "bare"),
}


def _table(text: str) -> dict[str, str]:
    rows = (line.split("|") for line in text.splitlines() if line.startswith("|"))
    return {cells[1].strip(): cells[2].strip() for cells in rows if cells[1].strip() != "Field"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_openstack_registers_every_part_in_a_real_glance() -> None:
    """`scripts/demo openstack --keep`: the answer's ids are images in Glance's own database and
    file store, with the published bytes and formats; nothing runs or stays mounted after."""
    res = subprocess.run(
        [str(DEMO), "openstack", "--keep"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = res.stdout
    workdir = _workdir(out)
    try:
        assert res.returncode == 0, f"exit {res.returncode}\n{out[-4000:]}\n{res.stderr[-4000:]}"
        answers = _OS_ANSWER.findall(out)
        assert len(answers) == 2 and answers[0] == answers[1], out
        ids = dict(zip(_FORMATS, answers[0], strict=True))
        assert len(set(ids.values())) == 4
        assert re.search(r"^Glance uploads +4 +0$", out, re.M), out
        assert "stopped: nginx, glance, registrar, imgstore" in out

        # What the demo printed, `openstack image show`-like, for each id of the answer.
        shown = {kind: (image_id, _table(rows)) for image_id, kind, rows in _SHOW.findall(out)}
        assert {kind: image_id for kind, (image_id, _) in shown.items()} == ids
        parts = {
            type_: (sha1, name, int(size)) for sha1, name, type_, size in _OS_PART.findall(out)
        }
        parts["FILESYSTEM"] = parts.pop("ZFILESYSTEM")
        for kind, (image_id, row) in shown.items():
            sha1, name, _ = parts[kind]
            assert row["id"] == image_id
            assert (row["disk_format"], row["container_format"]) == _FORMATS[kind]
            assert row["status"] == "active"
            assert row["imageproxy_sha1"] == sha1
            assert row["imageproxy_source_url"].endswith("/" + name)
            assert row["os_hash_algo"] == "sha512" and len(row["os_hash_value"]) == 128
        assert shown["FILESYSTEM"][1]["kernel_id"] == ids["KERNEL"]
        assert shown["FILESYSTEM"][1]["ramdisk_id"] == ids["RAMDISK"]
        assert out.count("\nread back from Glance: ") == 4

        # Glance's own records (kept by --keep), read without the demo: the same images, and
        # the bytes in its file store are the published ones (the filesystem decompressed).
        glance = workdir / "glance"
        with contextlib.closing(sqlite3.connect(glance / "glance.sqlite")) as db:
            rows = db.execute(
                "SELECT id, disk_format, container_format, status, size FROM images"
                " WHERE deleted = 0"
            ).fetchall()
        stored = {row[0]: row[1:] for row in rows}
        assert set(stored) == set(ids.values()), "Glance holds exactly the answer's images"
        for kind, image_id in ids.items():
            disk, container, status, size = stored[image_id]
            assert (disk, container, status) == (*_FORMATS[kind], "active")
            data = (glance / "images" / image_id).read_bytes()
            assert len(data) == size
            _, name, _ = parts[kind]
            published = (workdir / "www" / name).read_bytes()
            if kind == "FILESYSTEM":
                published = gzip.decompress(published)
            assert data == published, kind
        assert (glance / "images" / ids["QCOW2"]).read_bytes()[:4] == b"QFI\xfb"  # a real QCOW2
    finally:
        _assert_processes_and_mounts_gone(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
