"""Requests shaped the way ORCA's Axis2 1.1 stub sends them, and a raw chunked HTTP sender."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from xml.sax.saxutils import escape

from registrar.soap import SoapVersion


def axis2_envelope(version: SoapVersion, url: str, signature: str) -> bytes:
    """The exact bytes an Axis2 1.1 ADB stub writes for RegisterImage(url, signature)."""
    return (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f'<soapenv:Envelope xmlns:soapenv="{version.namespace}"><soapenv:Body>'
        '<ns1:RegisterImage xmlns:ns1="http://imageproxy.orca">'
        f"<ns1:url>{escape(url)}</ns1:url><ns1:signature>{escape(signature)}</ns1:signature>"
        "</ns1:RegisterImage></soapenv:Body></soapenv:Envelope>"
    ).encode()


def axis2_headers(version: SoapVersion) -> dict[str, str]:
    """Axis2 1.1's request headers for each SOAP version (commons-httpclient, chunked)."""
    if version is SoapVersion.SOAP11:
        headers = {"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": '"urn:RegisterImage"'}
    else:
        headers = {
            "Content-Type": 'application/soap+xml; charset=UTF-8; action="urn:RegisterImage"'
        }
    headers["User-Agent"] = "Axis2"
    return headers


@dataclass
class RawReply:
    """What came back: status, headers (lowercased names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


def _chunks(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def post_chunked(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    chunk_size: int = 100,
    timeout: float = 60.0,
) -> RawReply:
    """POST `body` with `Transfer-Encoding: chunked` in `chunk_size` pieces; no Content-Length."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            conn.request(
                "POST", path, body=_chunks(body, chunk_size), headers=headers, encode_chunked=True
            )
        except (BrokenPipeError, ConnectionResetError):
            # The server may answer (413) and close before the whole body is sent; its answer
            # is already in our receive queue, as a real client would read it.
            pass
        response = conn.getresponse()
        return RawReply(
            response.status,
            {name.lower(): value for name, value in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()
