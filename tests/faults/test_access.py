"""Access to the SOAP listener: loopback by default, client allow-list, TLS, basic auth.

One real registrar (`registrar serve`) with a trustme certificate, basic auth and
`allowed_clients = ["127.0.0.1/32"]`: zeep over HTTPS with the right credentials registers an
image; no or wrong credentials get 401 with a challenge; a client connecting from 127.0.0.2
gets 403; plain HTTP and an unverified certificate get no SOAP answer at all.
"""

from __future__ import annotations

import base64
import http.client
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import trustme
import zeep

from registrar import config as registrar_config
from registrar.access import Access
from registrar.errors import ConfigError
from registrar.server import SERVICE
from tests.faults.site import set_registrar_keys
from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack
from tests.registrar.soap_server import SOAP11_BINDING, WSDL
from tests.support.images import ImageFactory
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures

_LISTENING = re.compile(r"SOAP service listening on (https://[^\s/]+)")
USER, PASSWORD = "orca", "s3cret:with colon"


def test_listener_defaults_to_loopback_and_open_access(tmp_path: Path) -> None:
    cfg = registrar_config.parse({}, base_dir=tmp_path)
    assert (cfg.registrar.host, cfg.registrar.access) == ("127.0.0.1", Access())
    assert cfg.registrar.access.tls is None


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"allowed_clients": ["10.0.0.0/33"]}, "allowed_clients: '10.0.0.0/33' is not a CIDR"),
        ({"allowed_clients": "10.0.0.0/8"}, "allowed_clients: must be a list"),
        ({"tls_cert": "cert.pem"}, "tls_cert and tls_key: give both or neither"),
        ({"tls_cert": "missing.pem", "tls_key": "k.pem"}, "missing.pem is not a readable file"),
        ({"auth_user": "orca"}, "auth_user and auth_password: give both or neither"),
        ({"auth_user": 7, "auth_password": "x"}, "auth_user: must be a string"),
        ({"auth_user": "a:b", "auth_password": "x"}, "auth_user: must not contain ':'"),
    ],
)
def test_bad_access_keys_are_refused(tmp_path: Path, keys: dict, message: str) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match=re.escape(message)):
        registrar_config.parse({"registrar": keys}, base_dir=tmp_path)


class _TlsRegistrar:
    def __init__(self, proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.proc, self.base_url, self.log = proc, base_url, log

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


def _start_tls(stack: Stack, ctx: ssl.SSLContext) -> _TlsRegistrar:
    log = stack.root / "registrar-tls.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "registrar.service_cli", "serve", "--config", str(stack.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"registrar exited {proc.returncode}: {log.read_text()}")
        match = _LISTENING.search(log.read_text())
        if match and _status(match.group(1), ctx, "/healthz") == 200:
            return _TlsRegistrar(proc, match.group(1), log)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"registrar not ready: {log.read_text()}")


def _status(
    base_url: str,
    ctx: ssl.SSLContext,
    path: str,
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> int | None:
    host, port = base_url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(
        host, int(port), context=ctx, timeout=10, source_address=(source, 0) if source else None
    )
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        if resp.status == 401:
            assert resp.getheader("WWW-Authenticate", "").startswith('Basic realm="ImageProxy"')
        return resp.status
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_tls_basic_auth_and_client_allow_list(
    stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    set_registrar_keys(
        stack,
        tls_cert=str(cert_path),
        tls_key=str(key_path),
        auth_user=USER,
        auth_password=PASSWORD,
        allowed_clients=["127.0.0.1/32"],
    )
    ctx = ssl.create_default_context(cafile=str(ca_path))
    reg = _start_tls(stack, ctx)
    try:
        wsdl = f"{SERVICE}?wsdl"
        assert _status(reg.base_url, ctx, wsdl) == 401
        assert _status(reg.base_url, ctx, wsdl, _basic(USER, "wrong")) == 401
        assert _status(reg.base_url, ctx, wsdl, {"Authorization": "Basic !!!"}) == 401
        assert _status(reg.base_url, ctx, wsdl, _basic(USER, PASSWORD)) == 200
        # A client outside allowed_clients is refused even with the right password.
        assert _status(reg.base_url, ctx, wsdl, _basic(USER, PASSWORD), source="127.0.0.2") == 403
        # No certificate trust, no conversation; plain HTTP on the TLS port, no answer either.
        with pytest.raises(ssl.SSLCertVerificationError):
            _status(reg.base_url, ssl.create_default_context(), "/healthz")
        plain = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/healthz")
            plain.getresponse()
        plain.close()

        # ORCA's way: the SOAP client with credentials over HTTPS gets its ids.
        images = image_factory.publish(
            origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
        )
        session = requests.Session()
        session.trust_env = False  # no proxy, no CA bundle from the environment
        session.verify = str(ca_path)
        session.auth = (USER, PASSWORD)
        client = zeep.Client(WSDL, transport=zeep.Transport(session=session, timeout=120))
        service = client.create_service(SOAP11_BINDING, reg.base_url + SERVICE)
        text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
        assert re.search(r"^FILESYSTEM=\S+", text, re.M)
        assert len(stack.cloud.image_ids()) == 1
        session.close()

        log = reg.log.read_text()
        assert "127.0.0.2 GET /axis2/services/IMAGEPROXY -> 403 client address not in" in log
        assert "-> 401 authentication required" in log
    finally:
        reg.proc.send_signal(signal.SIGTERM)
        try:
            reg.proc.wait(20)
        except subprocess.TimeoutExpired:
            reg.proc.kill()
            reg.proc.wait()
