"""Who may talk to the SOAP listener: client allow-list, HTTP basic auth, TLS settings.

`[registrar]` keys (all optional; without them the listener, bound to 127.0.0.1 by default,
answers anyone who can reach it, in plain HTTP):

- `allowed_clients`: CIDRs whose clients may connect; others get 403 (default [] = anyone)
- `tls_cert`, `tls_key`: PEM certificate (chain) and private key; the listener then speaks
  HTTPS only. Both or neither ("" = not set, the default).
- `auth_user`, `auth_password`: HTTP basic auth required on every SOAP and WSDL request (401
  with a `WWW-Authenticate` challenge otherwise); ORCA's Axis2 client can send it. Both or
  neither ("" = not set). `/healthz` needs no password (it says nothing but "ok"), but the
  allow-list applies.

`Guard` wraps the ASGI app: a refused request is answered and logged here and never reaches it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Any

from imgstore.asgi import ASGIApp, Receive, Scope, Send, header
from registrar.errors import ConfigError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ACCESS_KEYS = frozenset({"allowed_clients", "tls_cert", "tls_key", "auth_user", "auth_password"})
REALM = "ImageProxy"


@dataclasses.dataclass(frozen=True)
class Access:
    """The listener's access settings; the defaults let every client in, in plain HTTP."""

    allowed_clients: tuple[IPNetwork, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_user: str = ""  # "" = no basic auth
    auth_password: str = dataclasses.field(default="", repr=False)

    @property
    def tls(self) -> tuple[str, str] | None:
        """(certfile, keyfile) when TLS is configured."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return str(self.tls_cert), str(self.tls_key)


def parse_access(section: dict[str, Any], base_dir: Path) -> Access:
    """The access keys of a `[registrar]` table; ConfigError naming the key on a bad value."""
    clients = section.get("allowed_clients", [])
    if not isinstance(clients, list):
        raise ConfigError("[registrar] allowed_clients: must be a list of CIDR strings")
    networks: list[IPNetwork] = []
    for item in clients:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"[registrar] allowed_clients: {item!r} is not a CIDR") from None
    cert, key = (_path(section, name, base_dir) for name in ("tls_cert", "tls_key"))
    if (cert is None) != (key is None):
        raise ConfigError("[registrar] tls_cert and tls_key: give both or neither")
    user, password = (_text(section, name) or "" for name in ("auth_user", "auth_password"))
    if bool(user) != bool(password):
        raise ConfigError("[registrar] auth_user and auth_password: give both or neither")
    if ":" in user:
        raise ConfigError("[registrar] auth_user: must not contain ':'")
    return Access(tuple(networks), cert, key, user, password)


def _path(section: dict[str, Any], key: str, base_dir: Path) -> Path | None:
    value = _text(section, key)
    if value is None:
        return None
    path = base_dir / Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"[registrar] {key}: {path} is not a readable file")
    return path


def _text(section: dict[str, Any], key: str) -> str | None:
    value = section.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"[registrar] {key}: must be a string")
    return value or None


def client_allowed(access: Access, host: str | None) -> bool:
    """Is a peer at `host` (the socket's address) in `allowed_clients` (empty: anyone)?"""
    if not access.allowed_clients:
        return True
    try:
        addr = ipaddress.ip_address((host or "").split("%", 1)[0])
    except ValueError:
        return False  # a Unix socket or an unknown peer: not on any listed network
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in access.allowed_clients if net.version == addr.version)


def credentials_ok(access: Access, authorization: str | None) -> bool:
    """Does an `Authorization` header carry the configured basic-auth user and password?"""
    if not access.auth_user:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(b":")
    expected_user = access.auth_user.encode()
    expected_password = access.auth_password.encode()
    # Both compared in constant time, and both always compared, so timing tells nothing.
    ok_user = hmac.compare_digest(user, expected_user)
    ok_password = hmac.compare_digest(password, expected_password)
    return bool(sep) and ok_user and ok_password


class Guard:
    """ASGI middleware: answers 403/401 itself, passes every allowed request to `app`."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, reason, headers = refusal
                client = scope.get("client") or ("?", 0)
                log.warning(
                    "%s %s %s -> %d %s", client[0], scope["method"], scope["path"], status, reason
                )
                await _respond(send, status, reason, headers)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        client = scope.get("client")
        if not client_allowed(self.access, client[0] if client else None):
            return 403, "client address not in allowed_clients", []
        if scope["path"] == "/healthz":
            return None
        if not credentials_ok(self.access, header(scope, b"authorization")):
            challenge = f'Basic realm="{REALM}", charset="UTF-8"'.encode()
            return 401, "authentication required", [(b"www-authenticate", challenge)]
        return None


async def _respond(
    send: Send, status: int, reason: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = (reason + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
