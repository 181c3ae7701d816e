"""The fetcher against an origin that misbehaves on purpose (the faulty_origin fixture).

Store-level (no kernel): what a mount read would get, with origin requests and bytes counted.
Issue 7 builds its full fault matrix on these paths; these pin down the behaviour the design
promises: retries with backoff, resume after a reset, one whole-body stream when Range is
ignored, chunked bodies, If-Range on a changed origin, and a deadline instead of a hang.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from imgstore import client
from imgstore.config import StoreConfig
from imgstore.errors import BlobCorrupt, OriginChanged, OriginError
from imgstore.store import open_store
from tests.support.faulty import Faults

MiB = 1024 * 1024
CHUNK = MiB


def config(cache, **kw) -> StoreConfig:
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("min_free", 0)
    kw.setdefault("read_deadline", 20.0)
    return StoreConfig(cache_dir=cache, **kw)


async def read_all(store, sha1: str) -> bytes:
    handle = await store.open(sha1)
    try:
        out = bytearray()
        while piece := await store.read(handle, len(out), 256 * 1024):
            out += piece
        return bytes(out)
    finally:
        await store.release(handle)


def declare(tmp_path, faulty_origin, size: int = 3 * MiB) -> tuple[bytes, str]:
    data = os.urandom(size)
    sha1 = hashlib.sha1(data).hexdigest()
    client.add(tmp_path, sha1, [faulty_origin.add("a", data)], chunk_size=CHUNK)
    return data, sha1


@pytest.mark.trio
async def test_5xx_and_429_are_retried(tmp_path, faulty_origin):
    data, sha1 = declare(tmp_path, faulty_origin, size=CHUNK)
    faulty_origin.program("a", Faults(status=503), Faults(status=429), Faults(status=500))
    async with open_store(config(tmp_path)) as store:
        assert await read_all(store, sha1) == data
    assert [e["status"] for e in faulty_origin.log("a")][-4:] == [503, 429, 500, 206]


@pytest.mark.trio
async def test_a_reset_mid_chunk_resumes_where_it_stopped(tmp_path, faulty_origin):
    data, sha1 = declare(tmp_path, faulty_origin, size=CHUNK)
    faulty_origin.program("a", Faults(reset_after=300_000))
    before = faulty_origin.bytes_sent("a")
    async with open_store(config(tmp_path)) as store:
        assert await read_all(store, sha1) == data
    log = faulty_origin.log("a")[-2:]
    assert [e["state"] for e in log] == ["reset", "done"]
    # The retry asks only for what had not arrived (all of it, if the reset ate the buffer).
    first, last = map(int, log[1]["range"][len("bytes=") :].split("-"))
    assert last == CHUNK - 1 and 0 <= first <= 300_000
    assert faulty_origin.bytes_sent("a") - before <= CHUNK + 300_000


@pytest.mark.trio
async def test_an_origin_ignoring_range_is_streamed_once_for_all_readers(tmp_path, faulty_origin):
    data, sha1 = declare(tmp_path, faulty_origin, size=5 * MiB + 7)
    faulty_origin.program("a", ignore_range=True)
    before = faulty_origin.bytes_sent("a")
    async with open_store(config(tmp_path)) as store:
        results = []

        async def reader() -> None:
            results.append(await read_all(store, sha1))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(reader)
    assert results == [data] * 4
    # The first ranged requests (one per chunk in flight) learnt that Range is ignored and
    # abandoned their bodies; then exactly one whole body served every chunk and reader.
    whole = [e for e in faulty_origin.log("a") if e["method"] == "GET" and e["range"] is None]
    assert len(whole) == 1 and whole[0]["body_bytes"] == len(data)
    assert faulty_origin.bytes_sent("a") - before < 2 * len(data)  # not once per chunk (6x)


@pytest.mark.trio
async def test_chunked_responses_work(tmp_path, faulty_origin):
    data = os.urandom(2 * MiB + 3)
    sha1 = hashlib.sha1(data).hexdigest()
    faulty_origin.add("a", data)
    faulty_origin.program("a", chunked=True)
    client.add(tmp_path, sha1, [faulty_origin.url("a")], chunk_size=CHUNK)
    async with open_store(config(tmp_path)) as store:
        assert await read_all(store, sha1) == data


@pytest.mark.trio
async def test_content_changing_mid_fetch_is_refused_not_mixed(tmp_path, faulty_origin):
    data, sha1 = declare(tmp_path, faulty_origin, size=3 * MiB)
    faulty_origin.program("a", Faults(), Faults(new_content=os.urandom(3 * MiB)))
    async with open_store(config(tmp_path, max_requests=1, readahead_max=CHUNK)) as store:
        handle = await store.open(sha1)
        # Reads that are not sequential get no readahead: one request each.
        assert await store.read(handle, CHUNK, 4096) == data[CHUNK : CHUNK + 4096]
        with pytest.raises(OriginChanged):
            await store.read(handle, 2 * CHUNK, 4096)
        await store.release(handle)
    assert [e["if_range"] for e in faulty_origin.log("a")][-1] is not None
    assert client.info(tmp_path, sha1).cached_bytes <= CHUNK


@pytest.mark.trio
async def test_flipped_bytes_end_corrupt(tmp_path, faulty_origin):
    data, sha1 = declare(tmp_path, faulty_origin, size=2 * MiB)
    faulty_origin.program("a", flip=(123_456,))
    async with open_store(config(tmp_path)) as store:
        with pytest.raises(BlobCorrupt):
            await read_all(store, sha1)
    assert client.info(tmp_path, sha1).state == "corrupt"


@pytest.mark.trio
async def test_a_stalled_origin_fails_within_the_deadline_and_others_still_work(
    tmp_path, faulty_origin
):
    data, sha1 = declare(tmp_path, faulty_origin, size=CHUNK)
    other = os.urandom(CHUNK)
    other_sha1 = hashlib.sha1(other).hexdigest()
    client.add(tmp_path, other_sha1, [faulty_origin.add("b", other)], chunk_size=CHUNK)
    faulty_origin.program("a", stall=60.0, stall_at=1000)
    with trio.fail_after(30):  # a hang is the bug this test exists for
        async with open_store(config(tmp_path, read_deadline=1.0)) as store:
            handle = await store.open(sha1)
            with pytest.raises(OriginError):
                await store.read(handle, 0, 4096)
            await store.release(handle)
            assert await read_all(store, other_sha1) == other


@pytest.mark.trio
async def test_chunked_origin_ignoring_range_still_works(tmp_path, faulty_origin):
    # The original ImageProxy failed without Content-Length. Here the probe's 200 has none
    # either, so the size comes from HEAD, and the body is streamed once.
    data = os.urandom(3 * MiB + 1)
    sha1 = hashlib.sha1(data).hexdigest()
    faulty_origin.add("a", data)
    faulty_origin.program("a", ignore_range=True, chunked=True)
    info = client.add(tmp_path, sha1, [faulty_origin.url("a")], chunk_size=CHUNK)
    assert info.size == len(data)
    async with open_store(config(tmp_path)) as store:
        assert await read_all(store, sha1) == data
    assert client.info(tmp_path, sha1).state == "verified"


def test_a_busy_origin_at_add_is_retried_not_fatal(tmp_path, faulty_origin):
    """One 503 (or a reset) while `add` probes must not fail the registration that asked."""
    data = os.urandom(CHUNK)
    sha1 = hashlib.sha1(data).hexdigest()
    url = faulty_origin.add("a", data)
    faulty_origin.program("a", Faults(status=503), Faults(status=503))  # its HEAD and GET
    blob = client.add(tmp_path, sha1, [url], chunk_size=CHUNK)
    assert blob.size == CHUNK
    seen = [(e["method"], e["status"]) for e in faulty_origin.log("a")]
    assert seen == [("HEAD", 503), ("GET", 503), ("HEAD", 200), ("GET", 206)]


def test_an_origin_that_stays_busy_fails_add_in_one_line(tmp_path, faulty_origin):
    url = faulty_origin.add("a", os.urandom(1000))
    faulty_origin.program("a", *[Faults(status=503)] * 20)
    with pytest.raises(OriginError) as caught:
        client.add(tmp_path, "a" * 40, [url], chunk_size=CHUNK)
    assert str(caught.value) == f"{url}: HTTP 503"
