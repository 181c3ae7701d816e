"""Server-side request forgery guard in imgstore: untrusted URLs are checked at connect time.

URLs from remote users (the registrar's SOAP requests) are added with `trusted=False`; the probe
and every later fetch by the mount refuse loopback, link-local, unspecified, multicast and this
host's own addresses unless `allowed_networks` exempts them. An operator's `imgstore add` is
trusted. The host is resolved once and the connection goes to the checked address.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import ipaddress
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from imgstore import client, netpolicy
from imgstore.catalog import Catalog
from imgstore.errors import ConfigError, ForbiddenAddress
from imgstore.netpolicy import NetPolicy, guarded_client
from tests.imgstore.helpers import IMGSTORE, mount_cmd, run, write_config

LOOPBACK = ["127.0.0.0/8"]


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_default_policy_refuses(addr: str, why: str) -> None:
    assert why in (NetPolicy().refusal(ipaddress.ip_address(addr)) or "")


def test_every_address_of_this_host_is_refused() -> None:
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    addrs = [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]
    assert addrs
    for addr in addrs:
        assert NetPolicy().refusal(ipaddress.ip_address(addr.split("%")[0])) is not None, addr


def test_public_addresses_pass_and_the_allow_list_exempts() -> None:
    assert NetPolicy().refusal(ipaddress.ip_address("198.51.100.7")) is None
    assert NetPolicy().refusal(ipaddress.ip_address("2001:db8::7")) is None
    policy = NetPolicy.from_cidrs(["127.0.0.0/8", "169.254.169.254/32"])
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) is None
    assert policy.refusal(ipaddress.ip_address("169.254.0.1")) is not None
    with pytest.raises(ConfigError, match="not a CIDR"):
        NetPolicy.from_cidrs(["10.0.0.0/33"])
    with pytest.raises(ConfigError, match="list of CIDR"):
        NetPolicy.from_cidrs("127.0.0.0/8")


def _blob(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_untrusted_add_is_refused_before_any_request(tmp_path: Path, origin) -> None:
    data = os.urandom(3000)
    url = origin.put("a.img", data)
    with pytest.raises(ForbiddenAddress, match=r"127\.0\.0\.1 is a loopback address"):
        client.add(tmp_path, _blob(data), [url], trusted=False)
    localhost = url.replace("127.0.0.1", "localhost")
    with pytest.raises(ForbiddenAddress, match="loopback"):  # a name is judged by its address
        client.add(tmp_path, _blob(data), [localhost], trusted=False)
    assert origin.requests() == 0
    assert client.list_blobs(tmp_path) == []
    # Allowed explicitly, or typed by the operator: accepted.
    client.add(tmp_path, _blob(data), [url], trusted=False, allowed_networks=LOOPBACK)
    run("add", "--cache-dir", tmp_path, _blob(data), url)
    assert [b.sha1 for b in client.list_blobs(tmp_path)] == [_blob(data)]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the Host header it saw; `/redirect?to=URL` redirects."""

    hosts: list[str]

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))  # type: ignore[attr-defined]
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect?to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[http.server.ThreadingHTTPServer]:
    yield from _serve("127.0.0.1")


@pytest.fixture
def recorder2() -> Iterator[http.server.ThreadingHTTPServer]:
    yield from _serve("127.0.0.2")


def _serve(host: str) -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer((host, 0), _Recorder)
    srv.hosts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


async def _get(policy: NetPolicy, url: str) -> httpx.Response:
    plain = httpx.AsyncClient(follow_redirects=True)
    guarded = guarded_client(policy, plain)
    try:
        return await guarded.get(url)
    finally:
        await guarded.aclose()
        await plain.aclose()


def test_resolves_once_and_connects_to_the_checked_address(recorder, monkeypatch) -> None:
    """A name only our fake resolver knows, answering loopback once and link-local after.

    The request succeeds, so the connection went to the address that was checked (nothing
    else could resolve the name), the resolver was asked once, and the server saw the name.
    """
    port = recorder.server_address[1]
    answers = iter(["127.0.0.1", "169.254.169.254"])
    calls: list[str] = []

    async def fake_getaddrinfo(host: str, port: int, **kw: object) -> list[tuple]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(netpolicy.anyio, "getaddrinfo", fake_getaddrinfo)
    resp = trio.run(_get, NetPolicy.from_cidrs(LOOPBACK), f"http://rebind.test:{port}/x")
    assert (resp.status_code, resp.text) == (200, "hello")
    assert calls == ["rebind.test"]
    assert recorder.hosts == [f"rebind.test:{port}"]
    # The second answer (the metadata service's address) is refused, with no connection.
    with pytest.raises(ForbiddenAddress, match="169.254.169.254 is a link-local address"):
        trio.run(_get, NetPolicy.from_cidrs(LOOPBACK), f"http://rebind.test:{port}/x")
    assert len(recorder.hosts) == 1


def test_every_redirect_hop_is_checked(recorder, recorder2) -> None:
    target = f"http://127.0.0.1:{recorder.server_address[1]}/secret"
    start = f"http://127.0.0.2:{recorder2.server_address[1]}/redirect?to={target}"
    only_2 = NetPolicy.from_cidrs(["127.0.0.2/32"])
    with pytest.raises(ForbiddenAddress, match=r"refused http://127\.0\.0\.1:\d+/secret"):
        trio.run(_get, only_2, start)
    assert len(recorder2.hosts) == 1 and recorder.hosts == []
    resp = trio.run(_get, NetPolicy.from_cidrs(LOOPBACK), start)
    assert resp.text == "hello" and len(recorder.hosts) == 1


def test_mount_refuses_untrusted_blob_at_connect_time(tmp_path: Path, origin, fuse_mount) -> None:
    """The catalog says a blob's URL is untrusted: the mount (no allow-list) gives EIO.

    Its sibling, added by the operator from the same origin, reads fine; with the config's
    `[registrar] allowed_networks` the same mount reads the untrusted blob too.
    """
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    hostile, own = os.urandom(70_000), os.urandom(50_000)
    # Declared while the registrar allowed loopback; the catalog keeps trusted=False.
    client.add(
        cache,
        _blob(hostile),
        [origin.put("h.img", hostile)],
        trusted=False,
        allowed_networks=LOOPBACK,
    )
    run("add", "--cache-dir", cache, _blob(own), origin.put("o.img", own))
    catalog = Catalog(cache)
    assert [u.trusted for u in catalog.get(_blob(hostile)).urls] == [False]
    catalog.close()
    origin.reset_counts()
    m = fuse_mount(mount_cmd(cache, mnt), mnt)
    with pytest.raises(OSError) as err:
        (mnt / "by-sha1" / _blob(hostile)).read_bytes()
    assert err.value.errno == errno.EIO
    assert origin.requests("h.img") == 0
    assert "127.0.0.1 is a loopback address" in m.stderr_text()
    assert (mnt / "by-sha1" / _blob(own)).read_bytes() == own
    m.unmount()

    config = write_config(tmp_path / "site.toml", cache)
    config.write_text(config.read_text() + '\n[registrar]\nallowed_networks = ["127.0.0.0/8"]\n')
    fuse_mount([*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mnt)], mnt)
    assert (mnt / "by-sha1" / _blob(hostile)).read_bytes() == hostile


def test_https_keeps_the_name_for_sni_and_certificate_checks(tmp_path: Path, monkeypatch) -> None:
    """HTTPS to the checked address: the certificate is verified against the URL's name."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("images.example")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.hosts = []  # type: ignore[attr-defined]
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    port = srv.server_address[1]

    async def fake_getaddrinfo(host: str, port: int, **kw: object) -> list[tuple]:
        assert host == "images.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(netpolicy.anyio, "getaddrinfo", fake_getaddrinfo)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def get(url: str) -> httpx.Response:
        transport = netpolicy.GuardedTransport(NetPolicy.from_cidrs(LOOPBACK), verify=client_ctx)
        async with httpx.AsyncClient(transport=transport) as c:
            return await c.get(url)

    try:
        resp = trio.run(get, f"https://images.example:{port}/x")
        assert (resp.status_code, resp.text) == (200, "hello")
        assert srv.hosts == [f"images.example:{port}"]  # type: ignore[attr-defined]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_the_mount_takes_the_allow_list_from_store_or_else_registrar(tmp_path: Path) -> None:
    from imgstore import config as store_config

    path = tmp_path / "site.toml"
    base = f'[store]\ncache_dir = "{tmp_path}"\n'
    path.write_text(base + '[registrar]\nallowed_networks = ["127.0.0.0/8"]\n')
    assert store_config.load(path, {}).allowed_networks == ("127.0.0.0/8",)
    path.write_text(
        base
        + 'allowed_networks = ["10.1.0.0/16"]\n[registrar]\nallowed_networks = ["127.0.0.0/8"]\n'
    )
    assert store_config.load(path, {}).allowed_networks == ("10.1.0.0/16",)
    path.write_text(base)
    assert store_config.load(path, {}).allowed_networks == ()
    path.write_text(base + 'allowed_networks = ["nonsense"]\n')
    with pytest.raises(ConfigError, match="allowed_networks: 'nonsense' is not a CIDR"):
        store_config.load(path, {})
