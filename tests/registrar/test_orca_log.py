"""What ORCA's log shows: a Java client with the rule of ORCA's Axis2 1.1.1 stub, against the
real registrar, for real failures and for an answer.

Each fault's line must carry the registrar's own reason ("org.apache.axis2.AxisFault: <the
faultstring>"), never the fixed "ExceptionException: ExceptionException" that ORCA logs for a
fault whose detail starts with {http://imageproxy.orca}Exception.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
import zeep.exceptions

from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack
from tests.support.images import ImageFactory, metadata_xml
from tests.support.orca_client import LOG_PREFIX, OrcaClient, orca_client  # noqa: F401
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures

AXIS_FAULT = LOG_PREFIX + "org.apache.axis2.AxisFault: "
LOST = LOG_PREFIX + "orca.handlers.ec2.tasks.imgproxy.ExceptionException: ExceptionException"


def _zeep_message(service: object, url: str, signature: str) -> str:
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=url, signature=signature)  # type: ignore[attr-defined]
    return str(caught.value.message)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_orca_logs_each_reason_and_reads_the_answer(
    stack: Stack,
    origin: Origin,
    image_factory: ImageFactory,
    orca_client: OrcaClient,  # noqa: F811
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw", ramdisk=False)
    kernel = images.parts["KERNEL"]
    fs = images.parts["FILESYSTEM"]
    registrar = stack.start()
    service = stack.zeep(registrar)
    wrong = "0" * 40
    unreachable = f"http://127.0.0.1:{_closed_port()}/metadata.xml"
    mismatch = metadata_xml([("FILESYSTEM", fs.sha1, fs.url), ("KERNEL", "1" * 40, kernel.url)])
    mismatch_url = origin.put("mismatch.xml", mismatch)
    mismatch_sha1 = hashlib.sha1(mismatch).hexdigest()

    cases = [
        (
            images.metadata_url,
            wrong,
            f"signature {wrong} does not match computed signature {images.metadata_sha1} "
            f"for metadata at {images.metadata_url}",
        ),
        (unreachable, images.metadata_sha1, f"cannot fetch metadata at {unreachable}"),
        (
            mismatch_url,
            mismatch_sha1,
            f"signature {'1' * 40} does not match computed signature {kernel.sha1} "
            f"for KERNEL image at {kernel.url}",
        ),
    ]
    for soap12 in (False, True):
        for url, signature, reason in cases:
            code, lines = orca_client.register(registrar.endpoint, url, signature, soap12=soap12)
            message = _zeep_message(service, url, signature)  # zeep still sees the Fault
            assert reason in message
            assert code == 1
            assert lines == [AXIS_FAULT + message], (soap12, lines)

    # A cloud refusal, after the parts were fetched and verified.
    stack.cloud.refuse("RegisterImage", "InvalidManifest", "manifest signature is invalid")
    code, lines = orca_client.register(
        registrar.endpoint, images.metadata_url, images.metadata_sha1
    )
    assert code == 1
    assert lines == [
        AXIS_FAULT + f"registering the KERNEL image from {kernel.url} failed: "
        "RegisterImage: InvalidManifest: manifest signature is invalid"
    ]
    assert stack.cloud.image_ids() == []

    # Once the cloud accepts, ORCA loads the ids with java.util.Properties.
    stack.cloud.stop_refusing()
    code, lines = orca_client.register(
        registrar.endpoint, images.metadata_url, images.metadata_sha1
    )
    assert code == 0, lines
    ids = dict(line.split("=", 1) for line in lines)
    assert set(ids) == {"FILESYSTEM", "KERNEL", "RAMDISK"}
    assert ids["RAMDISK"] == ""
    assert sorted(stack.cloud.image_ids()) == sorted([ids["FILESYSTEM"], ids["KERNEL"]])


class _CannedFault(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read1(1 << 20)
        self.send_response(500)
        self.send_header("Content-Type", "text/xml; charset=UTF-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned_fault() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CannedFault)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/axis2/services/IMAGEPROXY"
    server.shutdown()
    server.server_close()


def test_the_client_applies_the_stubs_rule(canned_fault: str, orca_client: OrcaClient) -> None:  # noqa: F811
    """Proof that the client is a fair judge: the fault the registrar used to send (reason in
    the faultstring, {http://imageproxy.orca}Exception in the detail) loses its reason."""
    _CannedFault.body = (
        b"<?xml version='1.0' encoding='utf-8'?>"
        b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        b"<soapenv:Body><soapenv:Fault><faultcode>soapenv:Client</faultcode>"
        b"<faultstring>signature mismatch</faultstring><detail>"
        b'<ns:Exception xmlns:ns="http://imageproxy.orca"/></detail>'
        b"</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )
    code, lines = orca_client.register(canned_fault, "http://o/m.xml", "0" * 40)
    assert (code, lines) == (1, [LOST])
    _CannedFault.body = _CannedFault.body.replace(
        b'<detail><ns:Exception xmlns:ns="http://imageproxy.orca"/></detail>', b""
    )
    code, lines = orca_client.register(canned_fault, "http://o/m.xml", "0" * 40)
    assert (code, lines) == (1, [AXIS_FAULT + "signature mismatch"])
