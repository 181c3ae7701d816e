"""Reading through a real mount from a real nginx origin, counting origin bytes in its log."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.imgstore.helpers import MiB, ls_json, run, wait_for
from tests.support.images import make_sparse_file, sha1_file

CHUNK = 4 * MiB


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)


def test_cat_sha1sum_64mib_ext4_then_second_cat_fetches_nothing(store, origin, image_factory):
    image = image_factory.ext4(64)
    sha1 = image_factory.sha1(image)
    store.add(sha1, origin.put("fs.img", image))
    store.mount()
    origin.reset_counts()

    out = sh(f"cat {store.file(sha1)} | sha1sum")
    assert out.stdout.split()[0] == sha1
    assert origin.bytes_sent("fs.img") == image.stat().st_size  # each byte exactly once
    assert os.getxattr(store.file(sha1), "user.imgstore.state") == b"verified"

    origin.reset_counts()
    out = sh(f"cat {store.file(sha1)} | sha1sum")
    assert out.stdout.split()[0] == sha1
    assert origin.bytes_sent("fs.img") == 0
    assert origin.requests("fs.img") == 0


def test_everyday_tools_work_on_the_mount(store, origin, image_factory, tmp_path):
    image = image_factory.ext4(16, seed=3)
    sha1 = image_factory.sha1(image)
    url = origin.put("fs.img", image)
    store.add(sha1, url)
    store.mount()
    f = store.file(sha1)

    ls = sh(f"ls -l {store.mountpoint}/by-sha1")
    assert ls.returncode == 0
    line = next(line for line in ls.stdout.splitlines() if sha1 in line)
    assert line.startswith("-r--r--r--")
    assert str(image.stat().st_size) in line.split()

    assert "ext4" in sh(f"file -s {f}").stdout  # reads the superblock, not the whole image
    skip = sh(f"dd if={f} bs=4096 skip=1000 count=3 status=none | od -An -tx1 | md5sum").stdout
    with open(image, "rb") as src:
        src.seek(4096 * 1000)
        want = subprocess.run(
            "od -An -tx1 | md5sum", shell=True, input=src.read(3 * 4096), capture_output=True
        ).stdout.decode()
    assert skip == want
    assert sh(f"cmp {f} {image}").returncode == 0

    attrs = sh(f"getfattr -d {f}").stdout
    assert 'user.imgstore.state="verified"' in attrs  # cmp read it all
    assert f'user.imgstore.url="{url}"' in attrs
    assert f'user.imgstore.cached_bytes="{image.stat().st_size}"' in attrs

    with pytest.raises(OSError) as exc:
        open(f, "r+b")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        (store.mountpoint / "by-sha1" / "new").write_bytes(b"x")
    mounts_line = next(
        line
        for line in Path("/proc/mounts").read_text().splitlines()
        if str(store.mountpoint) in line
    ).split()
    assert mounts_line[0] == "imgstore"
    assert "allow_other" not in mounts_line[3]
    assert "ro" in next(
        line
        for line in Path("/proc/mounts").read_text().splitlines()
        if str(store.mountpoint) in line
    ).split()[3].split(",")


def test_blob_added_after_mounting_appears(store, origin, image_factory):
    store.mount()
    assert os.listdir(store.mountpoint / "by-sha1") == []
    blob = image_factory.blob(3 * MiB, seed=11)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("late.bin", blob))
    assert os.listdir(store.mountpoint / "by-sha1") == [sha1]
    assert store.file(sha1).read_bytes() == blob.read_bytes()
    assert not (store.mountpoint / "by-sha1" / ("0" * 40)).exists()


def test_remount_keeps_the_cache(store, origin, image_factory):
    blob = image_factory.blob(10 * MiB, seed=12)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("b.bin", blob))
    m = store.mount()
    assert sh(f"sha1sum {store.file(sha1)}").stdout.split()[0] == sha1
    assert m.unmount() == 0
    origin.reset_counts()
    store.mount()
    assert os.getxattr(store.file(sha1), "user.imgstore.state") == b"verified"
    assert sh(f"sha1sum {store.file(sha1)}").stdout.split()[0] == sha1
    assert origin.bytes_sent() == 0


def test_4k_at_random_offset_of_cold_256mib_blob_fetches_one_chunk(store, origin, tmp_path):
    size = 256 * MiB
    rng = random.Random(256)
    regions = [(rng.randrange(0, size - MiB), rng.randbytes(MiB)) for _ in range(8)]
    path = make_sparse_file(tmp_path / "big.img", size, regions)
    sha1 = sha1_file(path)
    store.add(sha1, origin.put("big.img", path))
    store.mount("--chunk-size", "4MiB")
    origin.reset_counts()

    offset = regions[3][0] + 12345  # inside a region of random bytes, not a hole
    fd = os.open(store.file(sha1), os.O_RDONLY)
    try:
        got = os.pread(fd, 4096, offset)
    finally:
        os.close(fd)
    assert got == regions[3][1][12345 : 12345 + 4096]
    sent = origin.bytes_sent("big.img")
    # A random read gets no readahead: only the chunk(s) the 4 KiB touch (two if it straddles).
    touched = len({offset // CHUNK, (offset + 4095) // CHUNK})
    assert 0 < sent <= touched * CHUNK
    assert ls_json(store.cache_dir)[sha1]["state"] == "partial"
    table = run("ls", "--cache-dir", store.cache_dir).stdout
    assert f"({100 * sent // size}%)" in table or f"({round(100 * sent / size)}%)" in table


def test_sequential_reader_gets_a_growing_readahead(store, origin, image_factory):
    blob = image_factory.blob(48 * MiB, seed=61)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("seq.bin", blob))
    store.mount()
    f = store.file(sha1)
    fd = os.open(f, os.O_RDONLY)
    try:
        # Reading the first 8 MiB in order makes the daemon fetch well beyond them, without
        # being asked: several chunks ahead, as separate ranged requests.
        for off in range(0, 8 * MiB, 128 * 1024):
            assert os.pread(fd, 128 * 1024, off) == blob.read_bytes()[off : off + 128 * 1024]
        cached = lambda: int(os.getxattr(f, "user.imgstore.cached_bytes"))  # noqa: E731
        wait_for(lambda: cached() >= 16 * MiB, what="readahead beyond the bytes read")
    finally:
        os.close(fd)
    # Not the probe's HEAD and one byte.
    ranges = [e["range"] for e in origin.log("seq.bin") if e["range"] not in ("", "bytes=0-0")]
    assert len(ranges) >= 4
    assert all(r.startswith("bytes=") for r in ranges)
    # Aligned chunks, so a slice-caching proxy can cache them.
    assert all(int(r[6:].split("-")[0]) % CHUNK == 0 for r in ranges)


def test_8_concurrent_readers_of_a_cold_blob_fetch_it_once(store, origin, image_factory):
    image = image_factory.ext4(64, seed=8)
    sha1 = image_factory.sha1(image)
    store.add(sha1, origin.put("fs.img", image))
    store.mount()
    origin.reset_counts()

    readers = [
        subprocess.Popen(["sha1sum", str(store.file(sha1))], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    outputs = [r.communicate(timeout=120)[0] for r in readers]
    assert [r.returncode for r in readers] == [0] * 8
    assert all(out.split()[0] == sha1 for out in outputs)
    assert origin.bytes_sent("fs.img") <= image.stat().st_size + CHUNK


def test_reads_across_chunk_boundaries_of_a_cold_blob_get_exact_bytes(store, origin, image_factory):
    # A sequential reader's chunks are served from memory while they are written to the
    # cache behind it. Reads that straddle two chunks must still get every byte: one read()
    # of a whole file (the kernel splits it into concurrent requests at odd offsets), and
    # unaligned reads in order.
    blobs = [image_factory.blob(32 * MiB, seed=62 + i) for i in range(2)]
    sha1s = [image_factory.sha1(b) for b in blobs]
    for i, (blob, sha1) in enumerate(zip(blobs, sha1s, strict=True)):
        store.add(sha1, origin.put(f"straddle{i}.bin", blob))
    store.mount()
    with open(store.file(sha1s[0]), "rb") as f:
        assert f.read() == blobs[0].read_bytes()
    data = blobs[1].read_bytes()
    fd = os.open(store.file(sha1s[1]), os.O_RDONLY)
    try:
        step = MiB + 3 * 1024
        for off in range(0, len(data), step):
            assert os.pread(fd, step, off) == data[off : off + step], f"at {off}"
    finally:
        os.close(fd)


def test_the_mount_reads_ahead_half_the_store_window(store, origin, image_factory):
    # FUSE mounts start with 128 KiB of kernel readahead; the first open raises it (as root)
    # to half of readahead_max, so warm reads reach the daemon in large requests.
    blob = image_factory.blob(MiB, seed=63)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("ra.bin", blob))
    store.mount()
    with open(store.file(sha1), "rb") as f:
        assert f.read() == blob.read_bytes()
    dev = os.stat(store.mountpoint).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(bdi.read_text()) == 32 * 1024 // 2
