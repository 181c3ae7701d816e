"""A small cache filesystem (tmpfs, so we need root): eviction before the disk is full, and a
clean failure when a blob cannot fit, with a consistent catalog afterwards."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from imgstore import client
from imgstore.budget import METADATA_SLACK, round_up
from imgstore.config import StoreConfig
from imgstore.errors import CacheFull
from imgstore.store import open_store

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m,mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path / "cache"
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


async def read_all(store, sha1: str) -> bytes:
    handle = await store.open(sha1)
    try:
        out = bytearray()
        while piece := await store.read(handle, len(out), 256 * 1024):
            out += piece
        return bytes(out)
    finally:
        await store.release(handle)


@pytest.mark.trio
async def test_small_disk_evicts_lru_and_refuses_what_cannot_fit(small_disk, origin):
    blobs = {}
    for name, size in (("a", 5 * MiB), ("b", 5 * MiB), ("huge", 14 * MiB)):
        data = os.urandom(size)
        sha1 = hashlib.sha1(data).hexdigest()
        client.add(small_disk, sha1, [origin.put(name, data)], chunk_size=MiB)
        blobs[name] = (sha1, data)
    # No byte budget: only the disk and min_free limit the cache.
    cfg = StoreConfig(cache_dir=small_disk, chunk_size=MiB, min_free=MiB)
    async with open_store(cfg) as store:
        assert await read_all(store, blobs["a"][0]) == blobs["a"][1]
        assert await read_all(store, blobs["b"][0]) == blobs["b"][1]  # a had to go
        assert client.info(small_disk, blobs["a"][0]).cached_bytes == 0
        with pytest.raises(CacheFull):
            await read_all(store, blobs["huge"][0])
        st = os.statvfs(small_disk)
        assert st.f_bavail * st.f_frsize >= 0
    # What the catalog says is there is really there, byte for byte, after a restart.
    for sha1, data in blobs.values():
        info = client.info(small_disk, sha1)
        assert info.state != "verified" or info.cached_bytes == len(data)
    async with open_store(cfg) as store:
        for name in ("a", "b"):
            assert await read_all(store, blobs[name][0]) == blobs[name][1]


@pytest.mark.trio
async def test_a_write_that_meets_enospc_evicts_once_and_is_not_counted_twice(small_disk, origin):
    # The flaky CacheFull "of unknown cause" in the test above: a chunk write that met ENOSPC
    # (the disk fuller than the last statvfs said) asked the budget for room with its own
    # reservation still counted, so it needed room for itself twice. Set up a disk where,
    # once the other blob is evicted, the write's room exists once and not twice.
    data = os.urandom(MiB // 2)
    sha1 = hashlib.sha1(data).hexdigest()
    client.add(small_disk, sha1, [origin.put("small", data)], chunk_size=MiB)
    roomy = StoreConfig(cache_dir=small_disk, chunk_size=MiB, min_free=MiB)
    async with open_store(roomy) as store:
        assert await read_all(store, sha1) == data
    st = os.statvfs(small_disk)
    avail = st.f_bavail * st.f_frsize
    held = round_up(MiB) + METADATA_SLACK  # what `reserve` holds for a 1 MiB chunk
    slack = 128 * 1024  # the catalog may grow a few pages meanwhile
    # The write fits beside the cached blob, but only just: `reserve` evicts nothing.
    tight = StoreConfig(cache_dir=small_disk, chunk_size=MiB, min_free=avail - held - slack)
    writer = "f" * 40
    async with open_store(tight) as store:
        async with store.budget.reserve(writer, MiB):
            assert client.info(small_disk, sha1).cached_bytes == len(data)
            # What WriteBack._write does when pwrite says ENOSPC.
            await store.budget.make_room(writer, MiB, force=True)
            assert client.info(small_disk, sha1).cached_bytes == 0
        assert store.budget.reserved == 0
        assert store.budget.evictions == 1
