"""The cold-read fast path (imgstore/rangeget.py) and the site proxy, through a real mount.

A real nginx forward proxy (tests/support/frontnginx.py) sits between the mount and the real
nginx origin; every request at the origin is then also a request at the proxy, so counting both
logs shows which way each request went. The proxy routes by the Host header, so a wrong one
through the proxy would fail the read. Covered: `[store] http_proxy` for `imgstore add` (its
probe) and for the mount's chunks; `http_proxy`/`no_proxy` from the environment; untrusted URLs
going direct; a redirecting URL; kept-alive connections; a retried 5xx through the proxy.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imgstore import client
from imgstore.errors import ForbiddenAddress
from tests.imgstore.helpers import IMGSTORE, MiB, mount_cmd, run, write_config
from tests.support.faulty import Faults, FaultyOrigin
from tests.support.frontnginx import Front, start_forward_proxy, start_redirector
from tests.support.fusemount import Mounted
from tests.support.origin import Origin

CHUNK = 4 * MiB
PROBE = "bytes=0-0"
# What `imgstore add` asks: a HEAD (no Range), then one ranged byte.
PROBES = ["", PROBE]
LOOPBACK = ["127.0.0.0/8"]


@pytest.fixture
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with start_forward_proxy(tmp_path_factory.mktemp("proxy")) as front:
        yield front


def chunk_ranges(size: int) -> list[str]:
    """The Range headers of every chunk of a blob of `size` bytes, in order."""
    return [f"bytes={s}-{min(s + CHUNK, size) - 1}" for s in range(0, size, CHUNK)]


def cat_sha1(path: Path) -> str:
    out = subprocess.run(
        f"cat {path} | sha1sum", shell=True, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def add_with_env(cache: Path, sha1: str, url: str, env: Mapping[str, str]) -> None:
    res = subprocess.run(
        [*IMGSTORE, "add", "--cache-dir", str(cache), sha1, url],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def ranges(entries: list[dict]) -> list[str]:
    """The chunk requests' Range headers (the probe's left out), sorted."""
    return sorted(e["range"] for e in entries if e["range"] not in PROBES)


def assert_forwarded(entries: list[dict], url: str) -> None:
    """Each entry is a proxied request for `url`: absolute form, and its own Host header."""
    assert entries
    for e in entries:
        assert e["request"].startswith((f"GET {url} ", f"HEAD {url} ")), e["request"]
        assert e["host"] == urlsplit(url).netloc


def read_via_mount(
    fuse_mount: Callable[..., Mounted],
    cache: Path,
    mnt: Path,
    sha1: str,
    *extra: str,
    env: Mapping[str, str] | None = None,
) -> None:
    """Mount, `cat | sha1sum` the blob (must match), unmount cleanly."""
    m = fuse_mount(mount_cmd(cache, mnt, *extra), mnt, env=env)
    assert cat_sha1(mnt / "by-sha1" / sha1) == sha1, m.stderr_text()[-2000:]
    assert m.unmount() == 0


def test_config_http_proxy_carries_the_probe_and_every_chunk(
    tmp_path, origin: Origin, proxy: Front, image_factory, fuse_mount
):
    blob = image_factory.blob(16 * MiB, seed=71)
    sha1, size = image_factory.sha1(blob), blob.stat().st_size
    url = origin.put("p.bin", blob)
    cache = tmp_path / "cache"
    conf = write_config(tmp_path / "site.toml", cache, http_proxy=proxy.url)

    run("add", "--config", conf, sha1, url)
    assert [e["range"] for e in proxy.log("p.bin")] == PROBES
    assert [e["range"] for e in origin.log("p.bin")] == PROBES
    proxy.reset_counts()
    origin.reset_counts()

    read_via_mount(fuse_mount, cache, tmp_path / "mnt", sha1, "--config", str(conf))
    via_proxy = proxy.log("p.bin")
    assert_forwarded(via_proxy, url)
    assert ranges(via_proxy) == sorted(chunk_ranges(size))
    # Each origin request is one the proxy passed on: none went direct.
    assert ranges(origin.log("p.bin")) == ranges(via_proxy)
    assert origin.bytes_sent("p.bin") == size


@pytest.mark.parametrize("bypass", [False, True], ids=["http_proxy", "no_proxy"])
def test_http_proxy_from_the_environment(
    tmp_path, origin: Origin, proxy: Front, image_factory, fuse_mount, bypass: bool
):
    """No config key: `http_proxy` is honoured by add and the mount; `no_proxy` naming the
    origin's host makes both go direct."""
    blob = image_factory.blob(12 * MiB, seed=72)
    sha1, size = image_factory.sha1(blob), blob.stat().st_size
    url = origin.put("e.bin", blob)
    cache = tmp_path / "cache"
    env = {"http_proxy": proxy.url}
    if bypass:
        env["no_proxy"] = "127.0.0.1"

    add_with_env(cache, sha1, url, env)
    read_via_mount(fuse_mount, cache, tmp_path / "mnt", sha1, env=env)

    at_origin = origin.log("e.bin")
    assert [e["range"] for e in at_origin].count(PROBE) == 1
    assert ranges(at_origin) == sorted(chunk_ranges(size))
    assert origin.bytes_sent("e.bin") == size + 1  # the probe's one byte, then each chunk once
    if bypass:
        assert proxy.requests() == 0
    else:
        via_proxy = proxy.log("e.bin")
        assert_forwarded(via_proxy, url)
        assert len(via_proxy) == len(at_origin)
        assert ranges(via_proxy) == ranges(at_origin)


def test_untrusted_blob_takes_the_configured_proxy_after_its_address_check(
    tmp_path, origin: Origin, proxy: Front, image_factory, fuse_mount
):
    """A URL from a remote user (the registrar's) goes through the proxy the operator
    configured, like the operator's own, so many sites share the origin's bytes for ORCA's
    images too. Its name is still checked first: a refused address reaches nobody."""
    remote = image_factory.blob(8 * MiB, seed=73)
    own = image_factory.blob(8 * MiB, seed=74)
    cache = tmp_path / "cache"
    conf = write_config(
        tmp_path / "site.toml", cache, http_proxy=proxy.url, allowed_networks=LOOPBACK
    )
    remote_url = origin.put("h.bin", remote)
    # Loopback is refused unless allowed: the refusal comes before any request is sent.
    with pytest.raises(ForbiddenAddress):
        client.add(
            cache, image_factory.sha1(remote), [remote_url], trusted=False, http_proxy=proxy.url
        )
    assert proxy.requests() == 0
    assert origin.log("h.bin") == []
    client.add(
        cache,
        image_factory.sha1(remote),
        [remote_url],
        trusted=False,
        allowed_networks=LOOPBACK,
        http_proxy=proxy.url,
    )
    assert [e["range"] for e in proxy.log("h.bin")] == PROBES
    own_url = origin.put("o.bin", own)
    run("add", "--config", conf, image_factory.sha1(own), own_url)
    origin.reset_counts()
    proxy.reset_counts()

    m = fuse_mount(mount_cmd(cache, tmp_path / "mnt", "--config", str(conf)), tmp_path / "mnt")
    by_sha1 = tmp_path / "mnt" / "by-sha1"
    assert cat_sha1(by_sha1 / image_factory.sha1(remote)) == image_factory.sha1(remote)
    assert cat_sha1(by_sha1 / image_factory.sha1(own)) == image_factory.sha1(own)
    assert m.unmount() == 0

    for name, url in (("h.bin", remote_url), ("o.bin", own_url)):
        via_proxy = proxy.log(name)
        assert_forwarded(via_proxy, url)
        assert ranges(via_proxy) == sorted(chunk_ranges(8 * MiB)) == ranges(origin.log(name))


def test_untrusted_blob_ignores_the_environment_proxy(
    tmp_path, origin: Origin, proxy: Front, image_factory, monkeypatch
):
    """`http_proxy` from the environment is for the operator's own fetches: a remote user's
    URL connects directly (to the address that passed the check) unless a proxy is
    configured."""
    blob = image_factory.blob(MiB, seed=76)
    monkeypatch.setenv("http_proxy", proxy.url)
    client.add(
        tmp_path / "cache",
        image_factory.sha1(blob),
        [origin.put("e.bin", blob)],
        trusted=False,
        allowed_networks=LOOPBACK,
    )
    assert proxy.requests() == 0
    assert [e["range"] for e in origin.log("e.bin")] == PROBES


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
def test_a_redirecting_url_reads_correctly(
    tmp_path,
    tmp_path_factory,
    origin: Origin,
    proxy: Front,
    image_factory,
    fuse_mount,
    through_proxy: bool,
):
    """The URL answers 302 to the real file: the fast path hands the chunk to httpx, which
    follows it (through the proxy, when one is configured)."""
    blob = image_factory.blob(12 * MiB, seed=75)
    sha1, size = image_factory.sha1(blob), blob.stat().st_size
    origin.put("real.bin", blob)
    with start_redirector(tmp_path_factory.mktemp("redirector"), origin.base_url) as redirector:
        url = f"{redirector.url}/real.bin"
        cache = tmp_path / "cache"
        store: dict[str, str] = {"http_proxy": proxy.url} if through_proxy else {}
        conf = write_config(tmp_path / "site.toml", cache, **store)
        run("add", "--config", conf, sha1, url)
        origin.reset_counts()
        redirector.reset_counts()
        proxy.reset_counts()

        read_via_mount(fuse_mount, cache, tmp_path / "mnt", sha1, "--config", str(conf))

        at_origin = origin.log("real.bin")
        assert ranges(at_origin) == sorted(chunk_ranges(size))
        assert origin.bytes_sent("real.bin") == size
        redirected = redirector.log("real.bin")
        assert {e["status"] for e in redirected} == {302}
        # Every chunk asked the redirecting URL first (at least once; the fast path's try and
        # httpx's own request may both show).
        assert set(ranges(redirected)) == set(chunk_ranges(size))
        if through_proxy:
            hosts = Counter(e["host"] for e in proxy.log("real.bin"))
            assert hosts == {
                urlsplit(redirector.url).netloc: len(redirected),
                urlsplit(origin.base_url).netloc: len(at_origin),
            }
        else:
            assert proxy.requests() == 0


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
def test_64mib_read_reuses_a_few_connections(
    tmp_path, origin: Origin, proxy: Front, image_factory, fuse_mount, through_proxy: bool
):
    """16 chunk requests travel over at most `max_requests` kept-alive connections (nginx's
    $connection serial numbers, at whichever server the mount talks to)."""
    blob = image_factory.blob(64 * MiB, seed=76)
    sha1, size = image_factory.sha1(blob), blob.stat().st_size
    url = origin.put("big.bin", blob)
    cache = tmp_path / "cache"
    store: dict[str, object] = {"max_requests": 4, "chunk_size": "4MiB"}
    if through_proxy:
        store["http_proxy"] = proxy.url
    conf = write_config(tmp_path / "site.toml", cache, **store)
    run("add", "--config", conf, sha1, url)
    origin.reset_counts()
    proxy.reset_counts()

    read_via_mount(fuse_mount, cache, tmp_path / "mnt", sha1, "--config", str(conf))

    seen = (proxy if through_proxy else origin).log("big.bin")
    assert len(seen) == 16
    assert ranges(seen) == sorted(chunk_ranges(size))
    connections = Counter(e["connection"] for e in seen)
    # One connection per request would be 16; with reuse, no more than run at once.
    assert len(connections) <= 4, connections
    assert origin.bytes_sent("big.bin") == size
    if through_proxy:
        # What nginx counted on each connection agrees: a connection carried several requests.
        assert max(e["connection_requests"] for e in seen) >= 4
    else:
        assert proxy.requests() == 0


def test_5xx_through_the_proxy_is_retried(
    tmp_path, faulty_origin: FaultyOrigin, proxy: Front, fuse_mount
):
    """The origin's 503 reaches the fast path through the proxy; the chunk is asked again,
    with the same Range and If-Range, and the read succeeds."""
    data = os.urandom(8 * MiB)
    sha1 = hashlib.sha1(data).hexdigest()
    url = faulty_origin.add("f.bin", data)
    cache = tmp_path / "cache"
    conf = write_config(tmp_path / "site.toml", cache, http_proxy=proxy.url)
    run("add", "--config", conf, sha1, url)
    faulty_origin.program("f.bin", Faults(status=503))
    proxy.reset_counts()
    probes = faulty_origin.requests("f.bin")

    read_via_mount(fuse_mount, cache, tmp_path / "mnt", sha1, "--config", str(conf))

    log = faulty_origin.log("f.bin")[probes:]
    assert [e["status"] for e in log].count(503) == 1
    failed = next(e for e in log if e["status"] == 503)
    assert any(e["status"] == 206 and e["range"] == failed["range"] for e in log)
    assert sorted(e["range"] for e in log if e["status"] == 206) == chunk_ranges(8 * MiB)
    assert {e["if_range"] for e in log} == {faulty_origin.etag("f.bin")}
    via_proxy = proxy.log("f.bin")
    assert_forwarded(via_proxy, url)
    assert len(via_proxy) == len(log)
