"""Connections cut under a read: reset, closed or gone silent, at any point of any answer.

A TCP proxy of our own (tests/support/resetproxy.py) sits between imgstore and a real nginx and
breaks the first K connections that reach N bytes of response. Each test counts what matters: the
bytes are right (SHA-1), the origin sent a bounded number of bytes (nginx's log), and the
retries happened (the proxy's connection count). None of them times anything: the read deadline
is 120 s and each test's pytest timeout far below it, so a read that waited for the deadline
(the reported hang) fails the test.

Both transports are covered: trusted URLs (`imgstore add`) take the thread path
(imgstore/rangeget.py), untrusted ones (the registrar's) the guarded httpx client.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import trio

from imgstore import client
from imgstore.catalog import Url
from imgstore.fetcher import Origin
from imgstore.netpolicy import NetPolicy
from tests.imgstore.helpers import MiB, ls_json, run, write_config
from tests.support.fusemount import Mounted
from tests.support.origin import start_origin
from tests.support.resetproxy import ResetProxy, start_reset_proxy

SIZE = 32 * MiB
CHUNK = 4 * MiB
DEADLINE = 120.0
LOOPBACK = ["127.0.0.0/8"]
# Far below DEADLINE: a read that waits for the deadline fails the test.
pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def blob(image_factory) -> tuple[Path, str]:
    path = image_factory.blob(SIZE, seed=16)
    return path, image_factory.sha1(path)


def declare(store, sha1: str, url: str, trusted: bool) -> None:
    if trusted:
        store.add(sha1, url)  # the operator's `imgstore add`
    else:
        client.add(store.cache_dir, sha1, [url], trusted=False, allowed_networks=LOOPBACK)


def mount(store, tmp_path: Path, **extra: object) -> Mounted:
    cfg = write_config(
        tmp_path / "imgstore.toml",
        store.cache_dir,
        read_deadline=DEADLINE,
        allowed_networks=LOOPBACK,
        **extra,
    )
    return store.mount("--config", str(cfg))


def sha1sum(path: Path) -> str:
    out = subprocess.run(["sha1sum", str(path)], capture_output=True, text=True, timeout=60)
    return out.stdout.split()[0] if out.returncode == 0 else out.stderr


def _send_buffer_max() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


def assert_recovered(proxy: ResetProxy, cuts: int) -> None:
    """Every programmed cut happened, and each was followed by a new connection."""
    assert proxy.cuts() == cuts
    assert proxy.connections() > cuts


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("trusted", [True, False], ids=["thread", "httpx"])
def test_cold_sequential_read_survives_cuts(store, origin, blob, tmp_path, trusted, how):
    path, sha1 = blob
    origin.put("b.img", path)
    with start_reset_proxy(origin.port, after=0, first=0) as proxy:
        declare(store, sha1, proxy.url("b.img"), trusted)
        mount(store, tmp_path)
        origin.reset_counts()
        proxy.program(after=3 * MiB, first=3, how=how)

        assert sha1sum(store.file(sha1)) == sha1

        assert_recovered(proxy, 3)
        # Each cut costs at most what was in flight (the retry asks only for the rest).
        assert origin.bytes_sent("b.img") <= SIZE + 3 * CHUNK
    assert os.getxattr(store.file(sha1), "user.imgstore.state") == b"verified"


@pytest.mark.parametrize("trusted", [True, False], ids=["thread", "httpx"])
def test_8_concurrent_readers_survive_cuts_of_every_range_in_flight(
    store, origin, blob, tmp_path, trusted
):
    path, sha1 = blob
    data = path.read_bytes()
    origin.put("b.img", path)
    with start_reset_proxy(origin.port, after=0, first=0) as proxy:
        declare(store, sha1, proxy.url("b.img"), trusted)
        # More attempts than cuts: however the eight cuts fall on the ranges, none runs out.
        mounted = mount(store, tmp_path, retries=9)
        origin.reset_counts()
        # Each reader reads its own eighth, so eight ranges are in flight at once, and the
        # first eight connections are cut 1 MiB into their answers: all of them.
        proxy.program(after=MiB, first=8, how="reset")
        eighth = SIZE // 8
        readers = [
            subprocess.Popen(
                f"dd if={store.file(sha1)} bs=1M skip={i * eighth // MiB} "
                f"count={eighth // MiB} status=none | sha1sum",
                shell=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(8)
        ]
        outputs = [r.communicate(timeout=60)[0].split()[0] for r in readers]

        want = [hashlib.sha1(data[i * eighth : (i + 1) * eighth]).hexdigest() for i in range(8)]
        assert outputs == want, mounted.stderr_text()
        assert_recovered(proxy, 8)
        assert origin.bytes_sent("b.img") <= SIZE + 8 * CHUNK


def test_a_connection_gone_silent_is_dropped_and_retried(store, origin, blob, tmp_path):
    # The reported hang: the proxy's RST never left (it closed a socket another of its threads
    # was blocked on), so imgstore saw connections that just went quiet after 3 MiB. Each is
    # now given up after `stall_timeout` and the range asked for again on a new connection.
    path, sha1 = blob
    origin.put("b.img", path)
    with start_reset_proxy(origin.port, after=0, first=0) as proxy:
        store.add(sha1, proxy.url("b.img"))
        mount(store, tmp_path, stall_timeout=1.0)
        origin.reset_counts()
        proxy.program(after=3 * MiB, first=3, how="stall")

        assert sha1sum(store.file(sha1)) == sha1

        assert_recovered(proxy, 3)
        assert origin.bytes_sent("b.img") <= SIZE + 3 * CHUNK


@pytest.mark.parametrize("how", ["reset", "stall"])
def test_imgstore_fetch_survives_cuts(store, origin, blob, tmp_path, how):
    path, sha1 = blob
    origin.put("b.img", path)
    cfg = write_config(
        tmp_path / "imgstore.toml", store.cache_dir, read_deadline=DEADLINE, stall_timeout=1.0
    )
    with start_reset_proxy(origin.port, after=0, first=0) as proxy:
        store.add(sha1, proxy.url("b.img"))
        origin.reset_counts()
        proxy.program(after=3 * MiB, first=3, how=how)

        res = run("fetch", "--config", cfg, sha1, check=False)

        assert res.returncode == 0, res.stderr
        assert ls_json(store.cache_dir)[sha1]["state"] == "verified"
        assert_recovered(proxy, 3)
        assert origin.bytes_sent("b.img") <= SIZE + 3 * CHUNK


def test_cuts_of_a_whole_body_stream_restart_it(store, blob, tmp_path):
    # An origin that ignores Range: the whole body is one answer, and a cut restarts it.
    path, sha1 = blob
    with start_origin(tmp_path / "norange", "max_ranges 0;") as origin:
        origin.put("b.img", path)
        with start_reset_proxy(origin.port, after=0, first=0) as proxy:
            store.add(sha1, proxy.url("b.img"))
            mounted = mount(store, tmp_path)
            origin.reset_counts()
            before = proxy.upstream_bytes()
            proxy.program(after=3 * MiB, first=3, how="reset")

            assert sha1sum(store.file(sha1)) == sha1, mounted.stderr_text()

            assert_recovered(proxy, 3)
            # Each restart costs at most what had arrived, plus what was in flight.
            assert proxy.upstream_bytes() - before <= SIZE + 3 * (3 * MiB + CHUNK)
            # nginx also counts what its kernel still held in the socket's send buffer when the
            # cut dropped it: up to tcp_wmem's maximum per cut, however fast we read.
            assert origin.bytes_sent("b.img") <= SIZE + 3 * (3 * MiB + CHUNK + _send_buffer_max())


# -- every point of an answer, many ranges in flight (no mount: Origin.fetch_range itself) --

SMALL = 8 * MiB  # smaller than the mount tests' blob: this matrix has 28 cases
SMALL_CHUNK = MiB


async def fetch_all_ranges(url: str, trusted: bool) -> bytes:
    """Every chunk of the blob at `url`, four ranges in flight at a time (as the mount does,
    and so that each kept-alive connection serves two answers)."""
    origin = Origin(
        connect_timeout=5.0,
        read_timeout=2.0,
        # More attempts than cuts: however the eight cuts fall on the ranges, none runs out.
        retries=9,
        policy=NetPolicy.from_cidrs(LOOPBACK),
    )
    urls = [Url(url, trusted, None)]
    out = bytearray(SMALL)
    try:
        with trio.fail_after(30):  # far below a hang; retries are counted by the caller
            limit = trio.CapacityLimiter(4)

            async def one(start: int) -> None:
                async with limit:
                    buf = await origin.fetch_range(urls, start, start + SMALL_CHUNK, SMALL)
                out[start : start + SMALL_CHUNK] = buf

            async with trio.open_nursery() as nursery:
                for start in range(0, SMALL, SMALL_CHUNK):
                    nursery.start_soon(one, start)
    finally:
        await origin.aclose()
    return bytes(out)


# Response bytes before the cut: before anything, inside the status line and headers, one byte
# into the body, mid-body, one byte short of a whole 206 answer, and just after one (so the
# next request on that kept-alive connection meets a dead one).
HEADERS = 250  # about the size of nginx's 206 headers here; the exact figure does not matter
POINTS = [0, 10, HEADERS, HEADERS + 1, SMALL_CHUNK // 2, SMALL_CHUNK + HEADERS - 1]
POINTS += [SMALL_CHUNK + 400]


@pytest.fixture(scope="module")
def small_blob() -> bytes:
    return os.urandom(SMALL)


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("trusted", [True, False], ids=["thread", "httpx"])
@pytest.mark.parametrize("after", POINTS)
@pytest.mark.trio
async def test_a_cut_at_any_point_of_any_answer_is_retried(origin, small_blob, trusted, how, after):
    origin.put("s.img", small_blob)
    with start_reset_proxy(origin.port, after=after, first=8, how=how) as proxy:
        got = await fetch_all_ranges(proxy.url("s.img"), trusted)
        assert hashlib.sha1(got).digest() == hashlib.sha1(small_blob).digest()
        assert proxy.cuts() >= 4  # the first four connections at least
        assert proxy.connections() > proxy.cuts()
