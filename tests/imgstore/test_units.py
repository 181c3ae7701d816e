"""Pure pieces: sizes, config, chunk geometry, Content-Range, SHA-1 text, catalog rules."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgstore.buffers import BufferPool
from imgstore.catalog import Catalog, Url
from imgstore.chunks import DataFile, chunk_span, chunks_touching
from imgstore.config import load, parse_size
from imgstore.errors import BadSha1, BadUrl, ConfigError, UnknownBlob
from imgstore.fetcher import check_url, parse_content_range
from imgstore.handle import Handle, _covers, _merge
from imgstore.verify import normalize_sha1

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50G", 50 << 30),
        ("512M", 512 << 20),
        ("4MiB", 4 << 20),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        ("10 k", 10240),
        (123, 123),
    ],
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "5X", "-1", "G"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_config_rejects_unknown_keys_and_bad_chunk_sizes(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('[store]\ncache_dir = "/x"\nbogus = 1\n[registrar]\nlisten = "a"\n')
    with pytest.raises(ConfigError, match="bogus"):
        load(conf, {})
    conf.write_text('[store]\ncache_dir = "/x"\nchunk_size = "1000"\n')
    with pytest.raises(ConfigError, match="chunk_size"):
        load(conf, {})
    conf.write_text('[store]\ncache_dir = "/x"\ncache_size = "2G"\n')
    cfg = load(conf, {"cache_dir": "/y"})
    assert (cfg.cache_dir, cfg.cache_size, cfg.chunk_size) == (Path("/y"), 2 << 30, 4 * MiB)


def test_chunk_geometry():
    assert chunk_span(2, 10 * MiB, 4 * MiB) == (8 * MiB, 10 * MiB)
    assert list(chunks_touching(4 * MiB - 1, 2, 10 * MiB, 4 * MiB)) == [0, 1]
    assert list(chunks_touching(10 * MiB, 5, 10 * MiB, 4 * MiB)) == []
    assert list(chunks_touching(0, 100 * MiB, 10 * MiB, 4 * MiB)) == [0, 1, 2]


def test_coverage():
    assert _merge([(5, 9), (0, 5), (20, 30)]) == [(0, 9), (20, 30)]
    assert _covers([(0, 10)], 10) and not _covers([(0, 9)], 10)
    assert not _covers([(0, 5), (6, 10)], 10)


def test_content_range_and_urls_and_sha1():
    assert parse_content_range("bytes 0-0/1234") == (0, 1, 1234)
    assert parse_content_range("bytes 10-19/*") == (10, 20, None)
    assert parse_content_range("items 1-2/3") is None
    assert check_url("  http://h/x ") == "http://h/x"
    for bad in ("ftp://h/x", "gopher://h", "/etc/passwd", "http://"):
        with pytest.raises(BadUrl):
            check_url(bad)
    assert normalize_sha1(" " + "AB" * 20 + "\n") == "ab" * 20
    with pytest.raises(BadSha1):
        normalize_sha1("g" * 40)


def test_catalog_reset_rules(tmp_path):
    cat = Catalog(tmp_path)
    sha1 = "a" * 40
    rec, reset = cat.upsert(sha1, 10 * MiB, '"e"', True, [Url("http://h/a", True)], 4 * MiB)
    assert (rec.state, rec.size, reset) == ("remote", 10 * MiB, False)
    assert cat.mark_chunk(sha1, rec.generation, 0, 4 * MiB, 3)
    assert cat.get(sha1).state == "partial" and cat.get(sha1).cached_bytes == 4 * MiB
    assert not cat.mark_chunk(sha1, rec.generation + 1, 1, 4 * MiB, 3)  # stale
    # Re-adding adds mirrors (new URLs first) and keeps the cache.
    rec2, reset = cat.upsert(sha1, 10 * MiB, None, True, [Url("http://m/a", False)], 4 * MiB)
    assert [u.url for u in rec2.urls] == ["http://m/a", "http://h/a"]
    assert [u.trusted for u in rec2.urls] == [False, True]
    assert not reset and rec2.cached_bytes == 4 * MiB
    # Corrupt: bitmap gone; eviction does not launder it; re-adding does.
    assert cat.set_state(sha1, rec.generation, "corrupt", "bad")
    assert cat.get(sha1).cached_bytes == 0
    assert cat.reset(sha1).state == "corrupt"
    rec3, reset = cat.upsert(sha1, 10 * MiB, None, True, [Url("http://h/a", True)], 4 * MiB)
    assert reset and rec3.state == "remote" and rec3.generation > rec.generation
    with pytest.raises(UnknownBlob):
        cat.get("b" * 40)
    cat.pin(sha1, "registrar:7:x")
    cat.pin(sha1, "registrar:7:y")
    cat.pin(sha1, "registrar:70:z")
    assert cat.unpin_owner_prefix("registrar:7:") == 2
    assert cat.get(sha1).pins == ("registrar:70:z",)
    cat.close()


def _hammer(cache_dir: str, k: int, n: int) -> None:
    cat = Catalog(Path(cache_dir))
    for i in range(n):
        sha1 = f"{k:02x}{i:038x}"
        rec, _ = cat.upsert(sha1, 8 * MiB, None, True, [Url(f"http://h/{i}", True)], 4 * MiB)
        cat.mark_chunk(sha1, rec.generation, 0, 4 * MiB, 2)
        cat.touch(sha1)
        cat.pin(sha1, f"p{k}")
        cat.list()
        cat.unpin(sha1, f"p{k}")
    cat.close()


def test_catalog_from_many_processes_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), k, 40)) for k in range(6)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 6, time.monotonic() - start
    cat = Catalog(tmp_path)
    blobs = cat.list()
    assert len(blobs) == 240
    assert all(b.state == "partial" and b.pins == () for b in blobs)
    cat.close()


def test_client_api_records_untrusted_urls_and_refuses_a_wrong_size(tmp_path, origin):
    import hashlib
    import os

    from imgstore import client
    from imgstore.errors import OriginError

    data = os.urandom(5000)
    sha1 = hashlib.sha1(data).hexdigest()
    url = origin.put("a.bin", data)
    # Untrusted URLs may reach loopback only where the allow-list says so (netpolicy).
    info = client.add(tmp_path, sha1, [url, url], trusted=False, allowed_networks=["127.0.0.0/8"])
    assert (info.sha1, info.size, info.state, info.urls) == (sha1, 5000, "remote", (url,))
    cat = Catalog(tmp_path)
    assert [(u.url, u.trusted) for u in cat.get(sha1).urls] == [(url, False)]
    assert cat.get(sha1).urls[0].etag  # nginx's ETag, for If-Range
    cat.close()
    with pytest.raises(OriginError, match="5000"):
        client.add(tmp_path, sha1, [origin.put("b.bin", data + b"x")])
    assert [b.sha1 for b in client.list_blobs(tmp_path)] == [sha1]


class _Sized:
    size = 10_000


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9_999), st.integers(1, 3_000)), min_size=1, max_size=40),
    st.integers(0, 9_999),
)
def test_a_handle_tracks_what_it_read_as_a_plain_merge_would(
    reads: list[tuple[int, int]], last: int
) -> None:
    # Handle.add keeps its spans incrementally (a random reader makes thousands); it must
    # agree with merging everything from scratch, and so must the gate on the last read.
    handle = Handle(_Sized())  # type: ignore[arg-type]
    spans: list[tuple[int, int]] = []
    for start, length in reads:
        end = min(_Sized.size, start + length)
        handle.add(start, end)
        spans = _merge([*spans, (start, end)])
        assert handle.covered == spans
        assert handle.covered_bytes == sum(e - s for s, e in spans)
        completes = _merge([*spans, (last, _Sized.size)]) == [(0, _Sized.size)]
        assert handle.would_complete(last, _Sized.size) is completes


@pytest.mark.parametrize("last", [4 * MiB, 4 * MiB - 4096, 12345])
def test_a_run_of_chunks_lands_byte_for_byte(tmp_path, last):
    # Pooled buffers go in one O_DIRECT pwritev; a short or unaligned last chunk does not,
    # and the run is written piece by piece instead.
    pool = BufferPool(4 * MiB, 4)
    pieces = []
    for n, size in enumerate([4 * MiB, 4 * MiB, last]):
        buf = pool.take(size)
        buf[:] = bytes([n + 1]) * size
        pieces.append(buf)
    total = sum(len(p) for p in pieces)
    data = DataFile(tmp_path, "a" * 40, total + 4 * MiB)
    try:
        allocated = data.write_many(4 * MiB, pieces, direct=True)
        data.sync()
        assert data.pread(0, 4 * MiB) == bytes(4 * MiB)  # a hole
        assert data.pread(4 * MiB, total) == b"".join(bytes(p) for p in pieces)
        assert allocated >= total
    finally:
        data.close()
