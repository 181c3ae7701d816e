"""SOAP for ORCA's RegisterImage: envelope in → request; answer or error → envelope out.

The only module that knows SOAP faults. It speaks the contract of ORCA's WSDL
(shared/reference/imageproxy.wsdl) the way its generated Axis2 1.1 stub does:

- SOAP 1.1 (`text/xml`, `SOAPAction: "urn:RegisterImage"`) and SOAP 1.2
  (`application/soap+xml; action="urn:RegisterImage"`), document/literal; the envelope's namespace
  decides the version and must agree with the content type when one is given.
- Request `{http://imageproxy.orca}RegisterImage` with qualified children `url` and `signature`,
  both trimmed of surrounding whitespace.
- Answer `ns:RegisterImageResponse/ns:return` (qualified), always present, holding the Properties
  text.
- Errors: a Fault whose faultstring (1.2: Reason/Text) is the error's message, with no detail.
  Errors the caller can fix are Client (1.2: Sender) faults; everything else is Server (1.2:
  Receiver).

Why no detail: the stub Axis2 1.1.1 generated for ORCA looks up the QName of the first element
of a fault's detail; for `{http://imageproxy.orca}Exception` it builds its `ExceptionException`
with the no-argument constructor, whose message is the fixed text "ExceptionException", and the
faultstring is lost. Without that element the stub rethrows Axis2's `AxisFault`, whose message
is the faultstring, so ORCA logs "ImageProxy unable to retrieve image:
org.apache.axis2.AxisFault: <faultstring>".
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass

from lxml import etree

from registrar import xmlsafe
from registrar.errors import (
    InputError,
    MustUnderstandError,
    RegistrarError,
    RequestError,
    RequestTooLarge,
    SoapVersionMismatch,
)

log = logging.getLogger(__name__)

ORCA_NS = "http://imageproxy.orca"
ACTION = "urn:RegisterImage"
RESPONSE_ACTION = "urn:RegisterImageResponse"

# A RegisterImage envelope is a few hundred bytes; Axis2 adds at most a few headers.
MAX_REQUEST_BYTES = 64 * 1024

# Headers we "understand" by ignoring them: WS-Addressing, which Axis2 adds when its addressing
# module is engaged. Answering without wsa:RelatesTo is what Axis2 1.1 services did too.
_UNDERSTOOD_HEADER_NAMESPACES = frozenset(
    {
        "http://www.w3.org/2005/08/addressing",
        "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    }
)

# Characters XML 1.0 cannot carry; a fault must never fail to serialize because of them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_MAX_FAULTSTRING = 4000


class SoapVersion(enum.Enum):
    """The two SOAP versions ORCA's WSDL binds, with what differs between them on the wire."""

    SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
    SOAP12 = "http://www.w3.org/2003/05/soap-envelope"

    @property
    def namespace(self) -> str:
        return self.value

    @property
    def media_type(self) -> str:
        return "text/xml" if self is SoapVersion.SOAP11 else "application/soap+xml"

    @property
    def label(self) -> str:
        return "SOAP 1.1" if self is SoapVersion.SOAP11 else "SOAP 1.2"


@dataclass(frozen=True)
class Request:
    """One RegisterImage call: its SOAP version and the trimmed url and signature."""

    version: SoapVersion
    url: str
    signature: str


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, Content-Type header value and body bytes."""

    status: int
    content_type: str
    body: bytes


def _media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its lowercased media type and its parameters."""
    if not content_type:
        return "", {}
    head, *params = content_type.split(";")
    parsed: dict[str, str] = {}
    for param in params:
        name, sep, value = param.partition("=")
        if sep:
            parsed[name.strip().lower()] = value.strip().strip('"')
    return head.strip().lower(), parsed


def version_for(content_type: str | None) -> SoapVersion:
    """Guess the SOAP version from the Content-Type alone: for faults about unreadable bodies."""
    media, _ = _media_type(content_type)
    return SoapVersion.SOAP12 if media == "application/soap+xml" else SoapVersion.SOAP11


def is_soap_media_type(content_type: str | None) -> bool:
    """Whether the Content-Type is one a SOAP 1.1 or 1.2 request may carry (or is absent)."""
    media, _ = _media_type(content_type)
    return media in ("", "text/xml", "application/soap+xml")


def _check_action(version: SoapVersion, content_type: str | None, soap_action: str | None) -> None:
    # Dispatch is by the body element (document/literal); an action naming some other operation
    # is still refused so a client talking to the wrong service learns it at once.
    if version is SoapVersion.SOAP11:
        action = soap_action
    else:
        action = _media_type(content_type)[1].get("action")
    if action is None:
        return
    action = action.strip().strip('"')
    if action not in ("", ACTION):
        raise RequestError(f'unknown SOAP action "{action}"; this service offers only "{ACTION}"')


def _envelope_version(root: etree._Element) -> SoapVersion:
    qname = etree.QName(root)
    for version in SoapVersion:
        if qname.namespace == version.namespace and qname.localname == "Envelope":
            return version
    if qname.localname == "Envelope":
        raise SoapVersionMismatch(
            f"envelope namespace {qname.namespace!r} is neither SOAP 1.1 nor SOAP 1.2"
        )
    raise RequestError(f"the request is not a SOAP envelope (root element {qname.text})")


def _check_headers(version: SoapVersion, header: etree._Element) -> None:
    env = version.namespace
    for block in header:
        if not isinstance(block.tag, str):
            continue
        must = (block.get(f"{{{env}}}mustUnderstand") or "").strip()
        if must not in ("1", "true"):
            continue
        if etree.QName(block).namespace in _UNDERSTOOD_HEADER_NAMESPACES:
            continue
        # Blocks aimed at another node are not ours to understand.
        target = block.get(f"{{{env}}}actor") or block.get(f"{{{env}}}role")
        if target and target not in (
            "http://schemas.xmlsoap.org/soap/actor/next",
            "http://www.w3.org/2003/05/soap-envelope/role/next",
            "http://www.w3.org/2003/05/soap-envelope/role/ultimateReceiver",
        ):
            continue
        raise MustUnderstandError(
            f"header {etree.QName(block).text} is marked mustUnderstand and is not understood"
        )


def _child_text(operation: etree._Element, name: str) -> str:
    element = operation.find(f"{{{ORCA_NS}}}{name}")
    if element is None:
        unqualified = operation.find(name)
        hint = " (it must be qualified in that namespace)" if unqualified is not None else ""
        raise RequestError(f"RegisterImage has no {{{ORCA_NS}}}{name} element{hint}")
    nil = element.get("{http://www.w3.org/2001/XMLSchema-instance}nil", "").strip()
    if nil in ("true", "1") or len(element):
        raise RequestError(f"RegisterImage's {name} must be text, not nil or elements")
    value = (element.text or "").strip()
    if not value:
        raise RequestError(f"RegisterImage's {name} is empty")
    return value


def parse_request(
    body: bytes, content_type: str | None = None, soap_action: str | None = None
) -> Request:
    """Read a RegisterImage request from an HTTP body and its SOAP-related headers.

    Raises `RequestTooLarge`, `SoapVersionMismatch`, `MustUnderstandError` or `RequestError`
    with a message saying exactly what is wrong.
    """
    root = xmlsafe.parse(body, limit=MAX_REQUEST_BYTES, what="SOAP request", error=RequestError)
    version = _envelope_version(root)
    media = _media_type(content_type)[0]
    if media and media != version.media_type:
        raise SoapVersionMismatch(
            f"a {version.label} envelope must be sent as {version.media_type}, not {media}"
        )
    _check_action(version, content_type, soap_action)
    env = version.namespace
    header = root.find(f"{{{env}}}Header")
    if header is not None:
        _check_headers(version, header)
    body_el = root.find(f"{{{env}}}Body")
    if body_el is None:
        raise RequestError("the SOAP envelope has no Body")
    operations = [child for child in body_el if isinstance(child.tag, str)]
    if not operations:
        raise RequestError("the SOAP Body is empty")
    operation = operations[0]
    qname = etree.QName(operation)
    if qname.localname == "RegisterImage" and qname.namespace != ORCA_NS:
        raise RequestError(
            f"RegisterImage must be in namespace {ORCA_NS}, not {qname.namespace or 'none'}"
        )
    if qname.text != f"{{{ORCA_NS}}}RegisterImage":
        raise RequestError(f"unknown operation {qname.text}; this service offers RegisterImage")
    return Request(version, _child_text(operation, "url"), _child_text(operation, "signature"))


def _envelope(version: SoapVersion) -> tuple[etree._Element, etree._Element]:
    env = version.namespace
    envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"soapenv": env})
    body = etree.SubElement(envelope, f"{{{env}}}Body")
    return envelope, body


def _serialize(envelope: etree._Element) -> bytes:
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def _content_type(version: SoapVersion, action: str) -> str:
    if version is SoapVersion.SOAP11:
        return "text/xml; charset=UTF-8"
    return f'application/soap+xml; charset=UTF-8; action="{action}"'


def answer_reply(version: SoapVersion, text: str) -> Reply:
    """The envelope carrying `text` as RegisterImageResponse/return (status 200)."""
    envelope, body = _envelope(version)
    response = etree.SubElement(body, f"{{{ORCA_NS}}}RegisterImageResponse", nsmap={"ns": ORCA_NS})
    etree.SubElement(response, f"{{{ORCA_NS}}}return").text = text
    return Reply(200, _content_type(version, RESPONSE_ACTION), _serialize(envelope))


def fault_message(exc: BaseException) -> str:
    """The faultstring for `exc`: its own message for our errors, a labelled one for bugs."""
    if isinstance(exc, RegistrarError):
        message = str(exc) or type(exc).__name__
    else:
        message = f"internal error in the registrar ({type(exc).__name__}: {exc})"
    message = _NOT_XML.sub("\ufffd", message)
    if len(message) > _MAX_FAULTSTRING:
        message = message[: _MAX_FAULTSTRING - 1] + "…"
    return message


def _fault_code(version: SoapVersion, exc: BaseException) -> str:
    if isinstance(exc, SoapVersionMismatch):
        return "VersionMismatch"
    if isinstance(exc, MustUnderstandError):
        return "MustUnderstand"
    caller = isinstance(exc, RequestError | InputError)
    if version is SoapVersion.SOAP11:
        return "Client" if caller else "Server"
    return "Sender" if caller else "Receiver"


def fault_reply(version: SoapVersion, exc: BaseException) -> Reply:
    """The Fault envelope for `exc` in `version`, with the HTTP status that version's binding wants.

    SOAP 1.1 faults always travel with 500 (WS-I Basic Profile, and what Axis2 expects); SOAP 1.2
    Sender faults with 400 and the rest with 500.
    """
    env = version.namespace
    envelope, body = _envelope(version)
    fault = etree.SubElement(body, f"{{{env}}}Fault")
    code = _fault_code(version, exc)
    message = fault_message(exc)
    if version is SoapVersion.SOAP11:
        etree.SubElement(fault, "faultcode").text = f"soapenv:{code}"
        etree.SubElement(fault, "faultstring").text = message
    else:
        value = etree.SubElement(etree.SubElement(fault, f"{{{env}}}Code"), f"{{{env}}}Value")
        value.text = f"soapenv:{code}"
        reason = etree.SubElement(etree.SubElement(fault, f"{{{env}}}Reason"), f"{{{env}}}Text")
        reason.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
        reason.text = message
    # No detail: see the module docstring (ORCA's stub would replace the message by a fixed one).
    status = 400 if code == "Sender" else 500
    return Reply(status, _content_type(version, "urn:RegisterImageException"), _serialize(envelope))


def too_large_reply(version: SoapVersion, limit: int) -> Reply:
    """The fault sent with HTTP 413 when a request body exceeds `limit` bytes."""
    reply = fault_reply(version, RequestTooLarge(f"the request body exceeds {limit} bytes"))
    return Reply(413, reply.content_type, reply.body)
