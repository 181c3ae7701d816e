"""The real HTTP server (hypercorn on trio, a real socket) with a fake job behind it.

zeep, a SOAP client nobody here wrote, is built from ORCA's WSDL; raw envelopes are sent chunked
exactly as Axis2 1.1 sends them.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import zeep
import zeep.exceptions
from lxml import etree

from registrar.errors import InvalidSignature, SignatureMismatch
from registrar.properties import answer_text
from registrar.soap import ORCA_NS, SoapVersion
from tests.registrar.soap_javaprops import loads
from tests.registrar.soap_messages import axis2_envelope, axis2_headers, post_chunked
from tests.registrar.soap_server import (
    SOAP11_BINDING,
    SOAP12_BINDING,
    WSDL,
    Running,
    running_server,
)

SIG = "0123456789abcdef0123456789abcdef01234567"
ANSWER = answer_text("emi-11111111", "eki-22222222", "eri-33333333")


class FakeJob:
    """Records calls and answers fixed ids, or raises what it was told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.error = error
        self.lock = threading.Lock()

    def __call__(self, url: str, signature: str) -> str:
        with self.lock:
            self.calls.append((url, signature))
        if self.error is not None:
            raise self.error
        return ANSWER


@pytest.fixture
def job() -> FakeJob:
    return FakeJob()


@pytest.fixture
def srv(job: FakeJob) -> Iterator[Running]:
    with running_server(job) as running:
        yield running


def _zeep(binding: str, address: str, timeout: float = 60) -> zeep.proxy.ServiceProxy:
    transport = zeep.Transport(timeout=timeout, operation_timeout=timeout)
    client = zeep.Client(WSDL, transport=transport)
    return client.create_service(binding, address)


def _request(
    srv: Running,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("binding", "port"),
    [
        (SOAP11_BINDING, "IMAGEPROXYHttpSoap11Endpoint"),
        (SOAP12_BINDING, "IMAGEPROXYHttpSoap12Endpoint"),
    ],
)
def test_zeep_gets_the_answer(srv: Running, job: FakeJob, binding: str, port: str) -> None:
    for address in (srv.endpoint, f"{srv.endpoint}.{port}/"):
        service = _zeep(binding, address)
        text = service.RegisterImage(url=" http://origin/m.xml \n", signature=f"\t{SIG} ")
        assert loads(text) == {
            "FILESYSTEM": "emi-11111111",
            "KERNEL": "eki-22222222",
            "RAMDISK": "eri-33333333",
        }
    assert job.calls == [("http://origin/m.xml", SIG)] * 2


@pytest.mark.parametrize("binding", [SOAP11_BINDING, SOAP12_BINDING])
def test_zeep_sees_our_fault_message(binding: str) -> None:
    error = SignatureMismatch(
        f"signature {SIG} does not match computed signature {'f' * 40} for metadata at http://o/m"
    )
    with running_server(FakeJob(error)) as running:
        service = _zeep(binding, running.endpoint)
        with pytest.raises(zeep.exceptions.Fault) as caught:
            service.RegisterImage(url="http://o/m", signature=SIG)
    assert caught.value.message == str(error)
    assert caught.value.code in ("soapenv:Client", "soapenv:Sender")
    assert caught.value.detail is None  # no element for ORCA's stub to swallow the message with


def test_served_wsdl_points_at_this_server_and_zeep_uses_it(srv: Running, job: FakeJob) -> None:
    client = zeep.Client(f"{srv.endpoint}?wsdl", transport=zeep.Transport(timeout=30))
    ports = client.wsdl.services["IMAGEPROXY"].ports
    assert ports["IMAGEPROXYHttpSoap11Endpoint"].binding_options["address"] == (
        f"{srv.endpoint}.IMAGEPROXYHttpSoap11Endpoint/"
    )
    assert ports["IMAGEPROXYHttpSoap12Endpoint"].binding_options["address"] == (
        f"{srv.endpoint}.IMAGEPROXYHttpSoap12Endpoint/"
    )
    assert client.service.RegisterImage(url="http://o/m", signature=SIG) == ANSWER
    assert job.calls == [("http://o/m", SIG)]


def test_served_wsdl_is_orcas_apart_from_addresses(srv: Running) -> None:
    status, body = _request(srv, "GET", "/axis2/services/IMAGEPROXY?wsdl")
    assert status == 200
    served = etree.fromstring(body)
    with open(WSDL, "rb") as f:
        original = etree.fromstring(f.read())
    for tree in (served, original):
        for element in tree.iter():
            if "location" in element.attrib and etree.QName(element).localname == "address":
                element.set("location", "X")
    assert etree.tostring(served, method="c14n") == etree.tostring(original, method="c14n")


@pytest.mark.parametrize("version", list(SoapVersion))
@pytest.mark.parametrize(
    "path",
    [
        "/axis2/services/IMAGEPROXY",
        "/axis2/services/IMAGEPROXY.IMAGEPROXYHttpSoap11Endpoint/",
        "/axis2/services/IMAGEPROXY.IMAGEPROXYHttpSoap12Endpoint/",
        "/axis2/services/IMAGEPROXY.IMAGEPROXYHttpSoap12Endpoint",
    ],
)
def test_raw_axis2_envelope_sent_chunked(
    srv: Running, job: FakeJob, version: SoapVersion, path: str
) -> None:
    body = axis2_envelope(version, "http://origin/m.xml", SIG)
    reply = post_chunked(srv.host, srv.port, path, body, axis2_headers(version), chunk_size=64)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith(version.media_type)
    root = etree.fromstring(reply.body)
    ret = root.find(
        f"{{{version.namespace}}}Body/{{{ORCA_NS}}}RegisterImageResponse/{{{ORCA_NS}}}return"
    )
    assert ret is not None and ret.text == ANSWER
    assert job.calls == [("http://origin/m.xml", SIG)]


def test_sized_body_works_too(srv: Running, job: FakeJob) -> None:
    body = axis2_envelope(SoapVersion.SOAP11, "http://o/m", SIG)
    status, reply = _request(
        srv, "POST", "/axis2/services/IMAGEPROXY", body, axis2_headers(SoapVersion.SOAP11)
    )
    assert status == 200
    assert b"emi-11111111" in reply
    assert job.calls == [("http://o/m", SIG)]


def test_fault_over_raw_soap11_is_http_500_with_faultstring() -> None:
    with running_server(FakeJob(InvalidSignature("signature 'x' is not a SHA-1"))) as srv:
        body = axis2_envelope(SoapVersion.SOAP11, "http://o/m", "x")
        reply = post_chunked(
            srv.host,
            srv.port,
            "/axis2/services/IMAGEPROXY",
            body,
            axis2_headers(SoapVersion.SOAP11),
        )
    assert reply.status == 500
    fault = etree.fromstring(reply.body).find(f"{{{SoapVersion.SOAP11.namespace}}}Body/")
    assert fault.findtext("faultstring") == "signature 'x' is not a SHA-1"


def test_bug_in_the_job_is_a_server_fault_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="registrar.server")
    with running_server(FakeJob(ZeroDivisionError("oops"))) as srv:
        with pytest.raises(zeep.exceptions.Fault) as caught:
            _zeep(SOAP11_BINDING, srv.endpoint).RegisterImage(url="http://o/m", signature=SIG)
    assert caught.value.code == "soapenv:Server"
    assert "internal error in the registrar (ZeroDivisionError: oops)" in caught.value.message
    assert "Traceback" in caplog.text


def test_malformed_envelope_is_a_client_fault_and_the_job_is_not_called(
    srv: Running, job: FakeJob
) -> None:
    reply = post_chunked(
        srv.host,
        srv.port,
        "/axis2/services/IMAGEPROXY",
        b"<soapenv:Envelope",
        axis2_headers(SoapVersion.SOAP11),
    )
    assert reply.status == 500
    fault = etree.fromstring(reply.body).find(f"{{{SoapVersion.SOAP11.namespace}}}Body/")
    assert fault.findtext("faultcode") == "soapenv:Client"
    assert "not well-formed XML" in fault.findtext("faultstring")
    assert job.calls == []


def test_huge_sized_body_is_413_without_reading_it(srv: Running, job: FakeJob) -> None:
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(
            b"POST /axis2/services/IMAGEPROXY HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: text/xml\r\nContent-Length: 100000000\r\n\r\n<soapenv:"
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413
        assert b"exceeds 65536 bytes" in response.read()
    assert job.calls == []


def test_huge_chunked_body_is_413(srv: Running, job: FakeJob) -> None:
    body = axis2_envelope(SoapVersion.SOAP11, "http://o/m", SIG) + b" " * (80 * 1024)
    reply = post_chunked(
        srv.host,
        srv.port,
        "/axis2/services/IMAGEPROXY",
        body,
        axis2_headers(SoapVersion.SOAP11),
        chunk_size=4096,
    )
    assert reply.status == 413
    assert job.calls == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/nothing", 404),
        ("GET", "/axis2/services/IMAGEPROXY", 405),
        ("PUT", "/axis2/services/IMAGEPROXY", 405),
        ("POST", "/axis2/services/OTHER", 404),
    ],
)
def test_other_routes(srv: Running, method: str, path: str, status: int) -> None:
    assert _request(srv, method, path, b"" if method != "GET" else None)[0] == status


def test_wrong_media_type_is_415(srv: Running, job: FakeJob) -> None:
    status, _ = _request(
        srv, "POST", "/axis2/services/IMAGEPROXY", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 415
    assert job.calls == []


def test_one_log_line_per_request_with_outcome(
    srv: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registrar.server")
    _zeep(SOAP11_BINDING, srv.endpoint).RegisterImage(url="http://o/m", signature=SIG)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "registrar.server"]

    # The line is written once the answer is sent, which may be just after zeep has it.
    deadline = time.monotonic() + 30
    while not logged():
        assert time.monotonic() < deadline, "no request log line within 30 s"
        time.sleep(0.01)
    lines = logged()
    assert len(lines) == 1
    assert "POST /axis2/services/IMAGEPROXY -> 200" in lines[0]
    assert f"RegisterImage(http://o/m, {SIG}) over SOAP 1.1" in lines[0]
    assert "emi-11111111" in lines[0]


def test_calls_proceed_in_parallel() -> None:
    # Each call waits for the other inside the job: only parallel calls can both finish.
    barrier = threading.Barrier(3, timeout=60)

    def job(url: str, signature: str) -> str:
        barrier.wait()
        return ANSWER

    with running_server(job) as srv:
        results: list[str] = []

        def call() -> None:
            results.append(
                _zeep(SOAP11_BINDING, srv.endpoint).RegisterImage(url="http://o/m", signature=SIG)
            )

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        barrier.wait()
        for thread in threads:
            thread.join(60)
    assert results == [ANSWER, ANSWER]


def test_client_that_hangs_up_mid_call_does_not_disturb_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registrar.server")
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    finished: list[str] = []

    def job(url: str, signature: str) -> str:
        started.set()
        assert release.wait(60)
        finished.append(url)
        done.set()
        return ANSWER

    with running_server(job) as srv:
        body = axis2_envelope(SoapVersion.SOAP11, "http://o/gone", SIG)
        with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
            sock.sendall(
                b"POST /axis2/services/IMAGEPROXY HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: text/xml\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            assert started.wait(30)
        # The caller is gone; the work finishes anyway (another caller may be waiting on it).
        release.set()
        assert done.wait(30)
        assert finished == ["http://o/gone"]
        status, reply = _request(
            srv,
            "POST",
            "/axis2/services/IMAGEPROXY",
            axis2_envelope(SoapVersion.SOAP11, "http://o/next", SIG),
            axis2_headers(SoapVersion.SOAP11),
        )
        assert status == 200 and b"emi-11111111" in reply


def test_expect_100_continue_is_honoured(srv: Running, job: FakeJob) -> None:
    # commons-httpclient (under Axis2) can be set to send Expect: 100-continue before the body.
    body = axis2_envelope(SoapVersion.SOAP11, "http://o/m", SIG)
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(
            b"POST /axis2/services/IMAGEPROXY HTTP/1.1\r\nHost: x\r\nUser-Agent: Axis2\r\n"
            b'Content-Type: text/xml; charset=UTF-8\r\nSOAPAction: "urn:RegisterImage"\r\n'
            b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(1)
        assert interim.startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200
        assert b"emi-11111111" in response.read()
    assert job.calls == [("http://o/m", SIG)]
