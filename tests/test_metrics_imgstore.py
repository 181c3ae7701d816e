"""imgstore's /metrics on a real mount reading from a real nginx origin: the counts add up.

The mount runs with `[store] metrics_listen`; every figure is compared with a count kept
elsewhere (nginx's access log, the blob sizes, the cache files' blocks), never with a time.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.imgstore.helpers import MiB, allocated, ls_json, mount_cmd, run, write_config
from tests.support.fusemount import Mounted
from tests.support.images import ImageFactory
from tests.support.origin import Origin

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    """Every sample of GET /metrics, parsed by prometheus_client's own parser."""
    status, content_type, text = get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class MetricsMount:
    """A cache, a mountpoint and a config with metrics_listen on a free port."""

    def __init__(self, tmp_path: Path, fuse_mount: Callable[..., Mounted], **store: object):
        self.cache_dir = tmp_path / "cache"
        self.mountpoint = tmp_path / "mnt"
        self.port = free_port()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            tmp_path / "imageproxy.toml",
            self.cache_dir,
            metrics_listen=f"127.0.0.1:{self.port}",
            **store,
        )
        self._fuse_mount = fuse_mount

    def add(self, sha1: str, url: str) -> Path:
        run("add", "--cache-dir", self.cache_dir, sha1, url)
        return self.mountpoint / "by-sha1" / sha1

    def mount(self) -> Mounted:
        cmd = mount_cmd(self.cache_dir, self.mountpoint, "--config", str(self.config))
        return self._fuse_mount(cmd, self.mountpoint)

    def scrape(self) -> Samples:
        return scrape(self.port)


def test_reading_a_blob_counts_origin_bytes_served_bytes_chunks_and_cache_usage(
    tmp_path: Path, fuse_mount: Callable[..., Mounted], origin: Origin, image_factory: ImageFactory
) -> None:
    size = 10 * MiB + 12345  # three 4 MiB chunks, the last one short
    blob = image_factory.blob(size, seed=71)
    sha1 = image_factory.sha1(blob)
    m = MetricsMount(tmp_path, fuse_mount, cache_size="1G")
    path = m.add(sha1, origin.put("m.bin", blob))
    m.mount()
    before = m.scrape()
    assert value(before, "imgstore_origin_bytes_total") == 0
    assert value(before, "imgstore_cache_used_bytes") == 0
    assert value(before, "imgstore_cache_budget_bytes") == 1024 * MiB
    origin.reset_counts()

    assert hashlib.sha1(path.read_bytes()).hexdigest() == sha1

    after = m.scrape()
    assert origin.bytes_sent("m.bin") == size
    assert value(after, "imgstore_origin_bytes_total") == origin.bytes_sent("m.bin")
    assert value(after, "imgstore_served_bytes_total") == size
    used = value(after, "imgstore_cache_used_bytes")
    assert used == allocated(m.cache_dir)  # what the data files hold on disk
    assert size <= used <= size + 3 * 4096  # at most a block of rounding per chunk
    assert value(after, "imgstore_chunk_fetch_seconds_count") == 3 == origin.requests("m.bin")
    assert value(after, "imgstore_chunk_fetch_errors_total") == 0
    assert value(after, "imgstore_blobs_verified_total") == 1
    misses = value(after, "imgstore_chunk_lookups_total", result="miss")
    hits = value(after, "imgstore_chunk_lookups_total", result="hit")
    assert misses >= 1  # the first read found nothing cached
    assert hits + misses >= 3  # every chunk was read at least once
    assert value(after, "imgstore_evictions_total") == 0

    # Read again: all from the cache, nothing from the origin, no new miss.
    origin.reset_counts()
    assert hashlib.sha1(path.read_bytes()).hexdigest() == sha1
    again = m.scrape()
    assert origin.bytes_sent() == 0
    assert value(again, "imgstore_origin_bytes_total") == size
    assert value(again, "imgstore_chunk_lookups_total", result="miss") == misses
    # The kernel may answer the second read from its page cache, so served is size or 2*size.
    served = value(again, "imgstore_served_bytes_total")
    assert served in (size, 2 * size)
    assert value(again, "imgstore_chunk_lookups_total", result="hit") > hits or served == size


def test_evictions_and_verification_failures_are_counted(
    tmp_path: Path, fuse_mount: Callable[..., Mounted], origin: Origin, image_factory: ImageFactory
) -> None:
    # 1 MiB chunks and an 8 MiB budget: the second 6 MiB blob needs the first one's room.
    first, second = (image_factory.blob(6 * MiB, seed=s) for s in (72, 73))
    m = MetricsMount(tmp_path, fuse_mount, cache_size="8M", chunk_size="1MiB")
    paths = [m.add(image_factory.sha1(b), origin.put(b.name, b)) for b in (first, second)]
    wrong = image_factory.blob(1 * MiB, seed=74)
    bad_path = m.add(hashlib.sha1(b"not these bytes").hexdigest(), origin.put("bad.bin", wrong))
    m.mount()
    origin.reset_counts()  # `imgstore add` probed each URL for one byte

    for path in paths:
        assert len(path.read_bytes()) == 6 * MiB
    samples = m.scrape()
    assert value(samples, "imgstore_evictions_total") == 1
    assert ls_json(m.cache_dir)[paths[0].name]["cached_bytes"] == 0  # the first one went
    assert value(samples, "imgstore_evicted_bytes_total") >= 6 * MiB
    assert value(samples, "imgstore_cache_used_bytes") == allocated(m.cache_dir)
    assert value(samples, "imgstore_cache_budget_bytes") == 8 * MiB
    assert value(samples, "imgstore_origin_bytes_total") == 12 * MiB == origin.bytes_sent()

    with pytest.raises(OSError) as exc:
        bad_path.read_bytes()
    assert exc.value.errno == errno.EIO
    samples = m.scrape()
    assert value(samples, "imgstore_verification_failures_total") == 1
    assert value(samples, "imgstore_blobs_verified_total") == 2


def test_only_metrics_is_served_and_a_taken_port_fails_the_mount_naming_the_key(
    tmp_path: Path, fuse_mount: Callable[..., Mounted]
) -> None:
    m = MetricsMount(tmp_path / "a", fuse_mount)
    first = m.mount()
    assert get(m.port, "/nope")[0] == 404
    assert "imgstore_cache_used_bytes" in get(m.port, "/metrics")[2]

    # A second mount configured with the same port: a clear one-line error, no mount left.
    other = MetricsMount(tmp_path / "b", fuse_mount)
    other.config.write_text(other.config.read_text().replace(str(other.port), str(m.port)))
    other.mountpoint.mkdir()
    res = subprocess.run(
        mount_cmd(other.cache_dir, other.mountpoint, "--config", str(other.config)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "metrics_listen" in res.stderr and "Traceback" not in res.stderr
    assert not other.mountpoint.is_mount()

    # SIGTERM still unmounts cleanly, and the listener goes with the mount.
    first.kill(signal.SIGTERM)
    assert first.wait() == 0
    assert not m.mountpoint.is_mount()
    with pytest.raises(ConnectionRefusedError):
        get(m.port, "/metrics")
