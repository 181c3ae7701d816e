"""Origin faults seen through a real mount (the store-level matrix is tests/imgstore/).

- Mirrors: with the first URL dead (its server gone, or the file removed), the blob comes
  whole and verified from the second, through `cat` on the mount.
- An origin down for longer than `read_deadline`: the read fails with EIO (not a hang; each
  reader runs under a subprocess timeout), the mount log says why, another blob on the same
  mount reads fine, and the mount still unmounts cleanly.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

from tests.imgstore.helpers import IMGSTORE, ls_json, run, write_config

MiB = 1024 * 1024


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _cat(path: Path) -> subprocess.CompletedProcess[bytes]:
    # A hang is the bug these tests exist for: the timeout turns one into a failure.
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=60)


def test_dead_first_mirrors_fall_through_to_the_next(
    tmp_path: Path, origin, origin_factory, fuse_mount
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    config = write_config(tmp_path / "s.toml", cache, chunk_size="1MiB", retries=2)
    gone, mirror = origin_factory(), origin_factory()
    a, b = os.urandom(3 * MiB + 5), os.urandom(2 * MiB)
    # Blob a: its first server stops after the add. Blob b: its first URL starts to 404.
    run("add", "--config", config, _sha1(a), gone.put("a.img", a), mirror.put("a.img", a))
    run("add", "--config", config, _sha1(b), origin.put("b.img", b), mirror.put("b.img", b))
    gone.stop()
    origin.remove("b.img")
    mirror.reset_counts()
    origin.reset_counts()
    fuse_mount([*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mnt)], mnt)

    for data in (a, b):
        out = _cat(mnt / "by-sha1" / _sha1(data))
        assert out.returncode == 0, out.stderr
        assert out.stdout == data
    assert mirror.bytes_sent("a.img") == len(a)  # every chunk once, from the mirror
    assert mirror.bytes_sent("b.img") == len(b)
    assert origin.log("b.img") and all(e["status"] == 404 for e in origin.log("b.img"))
    states = ls_json(cache)
    assert states[_sha1(a)]["state"] == states[_sha1(b)]["state"] == "verified"


def test_origin_down_past_the_read_deadline_is_eio_and_the_mount_stays_usable(
    tmp_path: Path, faulty_origin, origin, fuse_mount
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    config = write_config(
        tmp_path / "s.toml", cache, chunk_size="1MiB", read_deadline=1.0, retries=2
    )
    stuck, fine = os.urandom(2 * MiB), os.urandom(MiB + 7)
    run("add", "--config", config, _sha1(stuck), faulty_origin.add("stuck", stuck))
    run("add", "--config", config, _sha1(fine), origin.put("fine.img", fine))
    faulty_origin.program("stuck", stall=120.0, stall_at=1000)  # stalls on every request
    m = fuse_mount([*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mnt)], mnt)

    out = _cat(mnt / "by-sha1" / _sha1(stuck))
    assert out.returncode != 0
    assert b"Input/output error" in out.stderr
    with open(mnt / "by-sha1" / _sha1(stuck), "rb") as f:  # and again: a clean EIO, no hang
        try:
            f.read(4096)
            raise AssertionError("read of a stalled blob succeeded")
        except OSError as exc:
            assert exc.errno == errno.EIO
    log = m.stderr_text()
    assert f"read of {_sha1(stuck)} at 0 failed" in log
    # The same mount serves other blobs, and the stuck one is not marked corrupt.
    assert _cat(mnt / "by-sha1" / _sha1(fine)).stdout == fine
    assert ls_json(cache)[_sha1(stuck)]["state"] in ("remote", "partial")
    assert m.unmount() == 0
