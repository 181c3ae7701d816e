"""Which addresses a URL from a remote user may reach (server-side request forgery guard).

A URL that arrives through the registrar's SOAP service is *untrusted*: by default it must not
make this head node connect to itself (loopback, its own interface addresses), to link-local
addresses (169.254.0.0/16 holds cloud metadata services; fe80::/10), to unspecified, multicast
or broadcast addresses. `allowed_networks` (CIDRs) exempts networks from that refusal. An
operator's own `imgstore add` is trusted and never checked.

The check happens at connect time, inside the HTTP transport: the host is resolved once, every
candidate address is checked, and the connection goes to the address that passed, with the
original Host header and TLS server name. So a name that resolves to a public address when
checked and to 127.0.0.1 a moment later (DNS rebinding) cannot slip through, and every redirect
hop is checked the same way. The guarded client ignores `http_proxy` from the environment. A
proxy the operator configured (`[store] http_proxy`) is used: the name is still checked here,
but the proxy does the connecting, so what the name resolves to then is the proxy's business.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable

import anyio
import httpx

from imgstore import tls
from imgstore.errors import ConfigError, ForbiddenAddress

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ZERO_NET = ipaddress.ip_network("0.0.0.0/8")  # "this network": connecting to it reaches us
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def parse_networks(
    values: Iterable[object], key: str = "allowed_networks"
) -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks; ConfigError naming `key` for anything else."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ConfigError(f"{key} must be a list of CIDR strings")
    out: list[IPNetwork] = []
    for item in values:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigError(f"{key}: {item!r} is not a CIDR string")
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not a CIDR") from None
    return tuple(out)


def _plain(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged as the IPv4 address it maps."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_own_address(addr: IPAddress) -> bool:
    """True if `addr` is configured on one of this host's interfaces.

    Binding a socket to an address succeeds only for local addresses, which answers the
    question for every interface, including ones that come up after start, without parsing
    interface tables.
    """
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(addr), 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
            return False
        raise
    return True


@dataclasses.dataclass(frozen=True)
class NetPolicy:
    """The refusal rules plus the operator's allow-list."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[object]) -> NetPolicy:
        return cls(parse_networks(cidrs))

    def refusal(self, addr: IPAddress) -> str | None:
        """Why an untrusted URL may not connect to `addr`, or None if it may."""
        addr = _plain(addr)
        if any(addr in net for net in self.allowed if net.version == addr.version):
            return None
        if addr.is_loopback:
            return "a loopback address"
        if addr.is_link_local:
            return "a link-local address"
        if addr.is_unspecified or (addr.version == 4 and addr in _ZERO_NET):
            return "an unspecified address"
        if addr.is_multicast or addr == _BROADCAST:
            return "a multicast or broadcast address"
        if is_own_address(addr):
            return "an address of this host"
        return None

    def check(self, url: str, addr: IPAddress) -> None:
        """Raise ForbiddenAddress if an untrusted `url` may not connect to `addr`."""
        why = self.refusal(addr)
        if why is not None:
            raise ForbiddenAddress(
                f"refused {url}: {_plain(addr)} is {why} (allow its network in allowed_networks)"
            )

    async def resolve(self, url: str, host: str, port: int) -> str:
        """Resolve `host` once; return the first address that passes, else raise the refusal."""
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self.check(url, literal)
            return str(literal)
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
        first_refusal: ForbiddenAddress | None = None
        for _family, _type, _proto, _canon, sockaddr in infos:
            addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            try:
                self.check(url, addr)
            except ForbiddenAddress as exc:
                first_refusal = first_refusal or exc
                continue
            return str(addr)
        if first_refusal is not None:
            raise first_refusal
        raise httpx.ConnectError(f"{host} has no address")


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that connects only to addresses the policy allows.

    Each request is re-addressed to the checked IP; the Host header keeps the name (httpx set
    it when the request was built) and TLS gets the name as its server name (`sni_hostname`),
    so virtual hosts and certificate checks work as before.
    """

    def __init__(
        self, policy: NetPolicy, proxy: str | None = None, **transport_options: object
    ) -> None:
        self.policy = policy
        self.proxy = proxy
        options = {"verify": tls.httpx_default(), **transport_options}
        self._inner = httpx.AsyncHTTPTransport(proxy=proxy, **options)  # type: ignore[arg-type]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.host
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 80)
        ip = await self.policy.resolve(str(url), host, port)
        if self.proxy:
            # The operator's proxy connects, by name: the name was checked here, and what it
            # resolves to later is the proxy's business (configure it to refuse internal
            # addresses too).
            log.debug("%s -> checked (%s), via the proxy", url, ip)
            return await self._inner.handle_async_request(request)
        extensions = dict(request.extensions)
        if url.scheme == "https":
            extensions.setdefault("sni_hostname", host)
        direct = httpx.Request(
            request.method,
            url.copy_with(host=ip),
            headers=request.headers,  # includes Host: the original name
            stream=request.stream,
            extensions=extensions,
        )
        log.debug("%s -> connecting to %s", url, ip)
        return await self._inner.handle_async_request(direct)

    async def aclose(self) -> None:
        await self._inner.aclose()


def guarded_client(
    policy: NetPolicy, like: httpx.AsyncClient, proxy: str | None = None
) -> httpx.AsyncClient:
    """An AsyncClient configured like `like` (timeouts, headers, redirects) but guarded.

    `proxy` is the operator's configured proxy (`[store] http_proxy`); proxies from the
    environment are not used for untrusted URLs.
    """
    return httpx.AsyncClient(
        timeout=like.timeout,
        headers=like.headers,
        follow_redirects=like.follow_redirects,
        trust_env=False,
        transport=GuardedTransport(policy, proxy),
    )
