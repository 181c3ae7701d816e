"""SOAP envelopes in and out, without a server: requests, answers, faults, hostile XML."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from registrar import xmlsafe
from registrar.errors import (
    FetchError,
    InvalidSignature,
    MustUnderstandError,
    RegistrarError,
    RequestError,
    RequestTooLarge,
    SoapVersionMismatch,
)
from registrar.soap import (
    ORCA_NS,
    SoapVersion,
    answer_reply,
    fault_reply,
    parse_request,
    too_large_reply,
    version_for,
)
from tests.registrar.soap_javaprops import loads
from tests.registrar.soap_messages import axis2_envelope

S11 = SoapVersion.SOAP11.namespace
S12 = SoapVersion.SOAP12.namespace
SIG = "0123456789abcdef0123456789abcdef01234567"


def test_axis2_soap11_request_is_read_and_trimmed() -> None:
    body = axis2_envelope(SoapVersion.SOAP11, "  http://origin/meta.xml\n", f"\t{SIG} ")
    request = parse_request(body, "text/xml; charset=UTF-8", '"urn:RegisterImage"')
    assert request.version is SoapVersion.SOAP11
    assert request.url == "http://origin/meta.xml"
    assert request.signature == SIG


def test_axis2_soap12_request_is_read() -> None:
    body = axis2_envelope(SoapVersion.SOAP12, "http://origin/meta.xml", SIG)
    content_type = 'application/soap+xml; charset=UTF-8; action="urn:RegisterImage"'
    request = parse_request(body, content_type)
    assert request.version is SoapVersion.SOAP12
    assert (request.url, request.signature) == ("http://origin/meta.xml", SIG)


def test_missing_headers_are_tolerated() -> None:
    body = axis2_envelope(SoapVersion.SOAP11, "http://o/m", SIG)
    assert parse_request(body).url == "http://o/m"


def test_version_from_content_type() -> None:
    assert version_for("application/soap+xml;charset=utf-8") is SoapVersion.SOAP12
    assert version_for("text/xml") is SoapVersion.SOAP11
    assert version_for(None) is SoapVersion.SOAP11


def _envelope(inner: str, env: str = S11, header: str = "") -> bytes:
    return (
        f'<s:Envelope xmlns:s="{env}" xmlns:o="{ORCA_NS}">{header}<s:Body>{inner}</s:Body>'
        "</s:Envelope>"
    ).encode()


GOOD_OP = (
    f"<o:RegisterImage><o:url>http://o/m</o:url><o:signature>{SIG}</o:signature></o:RegisterImage>"
)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"<not xml", RequestError, "not well-formed XML"),
        (b"", RequestError, "not well-formed XML"),
        (b"<a/>", RequestError, "not a SOAP envelope"),
        (_envelope(GOOD_OP, env="urn:other"), SoapVersionMismatch, "neither SOAP 1.1 nor SOAP 1.2"),
        (
            f'<s:Envelope xmlns:s="{S11}"><s:Header/></s:Envelope>'.encode(),
            RequestError,
            "no Body",
        ),
        (_envelope(""), RequestError, "Body is empty"),
        (
            _envelope('<x:RegisterImage xmlns:x="http://wrong"/>'),
            RequestError,
            "must be in namespace http://imageproxy.orca, not http://wrong",
        ),
        (_envelope("<o:DeleteImage/>"), RequestError, "unknown operation"),
        (
            _envelope(f"<o:RegisterImage><o:signature>{SIG}</o:signature></o:RegisterImage>"),
            RequestError,
            "no {http://imageproxy.orca}url element",
        ),
        (
            _envelope("<o:RegisterImage><o:url>http://o/m</o:url></o:RegisterImage>"),
            RequestError,
            "no {http://imageproxy.orca}signature element",
        ),
        (
            _envelope(
                f"<o:RegisterImage><url>http://o/m</url><o:signature>{SIG}</o:signature>"
                "</o:RegisterImage>"
            ),
            RequestError,
            "must be qualified",
        ),
        (
            _envelope(
                '<o:RegisterImage><o:url xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                f'xsi:nil="true"/><o:signature>{SIG}</o:signature></o:RegisterImage>'
            ),
            RequestError,
            "url must be text",
        ),
        (
            _envelope(
                f"<o:RegisterImage><o:url>  </o:url><o:signature>{SIG}</o:signature>"
                "</o:RegisterImage>"
            ),
            RequestError,
            "url is empty",
        ),
        (
            _envelope(
                GOOD_OP,
                header='<s:Header><h:Auth xmlns:h="urn:h" s:mustUnderstand="1"/></s:Header>',
            ),
            MustUnderstandError,
            "{urn:h}Auth is marked mustUnderstand",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(body: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_request(body, "text/xml")


def test_understood_and_optional_headers_are_accepted() -> None:
    header = (
        '<s:Header><wsa:Action xmlns:wsa="http://www.w3.org/2005/08/addressing" '
        's:mustUnderstand="1">urn:RegisterImage</wsa:Action>'
        '<h:Trace xmlns:h="urn:h" s:mustUnderstand="0"/>'
        '<h:Other xmlns:h="urn:h" s:mustUnderstand="1" s:actor="urn:someone-else"/></s:Header>'
    )
    assert parse_request(_envelope(GOOD_OP, header=header)).signature == SIG


def test_envelope_must_match_content_type() -> None:
    with pytest.raises(SoapVersionMismatch, match="SOAP 1.2 envelope must be sent as"):
        parse_request(_envelope(GOOD_OP, env=S12), "text/xml")
    with pytest.raises(SoapVersionMismatch, match="SOAP 1.1 envelope must be sent as"):
        parse_request(_envelope(GOOD_OP), "application/soap+xml")


def test_other_soap_actions_are_refused() -> None:
    with pytest.raises(RequestError, match='unknown SOAP action "urn:Other"'):
        parse_request(_envelope(GOOD_OP), "text/xml", '"urn:Other"')
    with pytest.raises(RequestError, match="unknown SOAP action"):
        parse_request(_envelope(GOOD_OP, env=S12), 'application/soap+xml; action="urn:Other"')
    assert parse_request(_envelope(GOOD_OP), "text/xml", '""').url == "http://o/m"


def test_oversized_request_is_refused_before_parsing() -> None:
    padding = b" " * (70 * 1024)
    with pytest.raises(RequestTooLarge, match="limit is 65536 bytes"):
        parse_request(_envelope(GOOD_OP) + padding)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<o:RegisterImage xmlns:o="http://imageproxy.orca"><o:url>&lol9;</o:url>
<o:signature>0123456789abcdef0123456789abcdef01234567</o:signature></o:RegisterImage>
</s:Body></s:Envelope>"""


def _xxe(system: str) -> bytes:
    return (
        f'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "{system}">]>'
        f'<s:Envelope xmlns:s="{S11}"><s:Body><o:RegisterImage xmlns:o="{ORCA_NS}">'
        f"<o:url>&xxe;</o:url><o:signature>{SIG}</o:signature></o:RegisterImage></s:Body>"
        "</s:Envelope>"
    ).encode()


@pytest.mark.parametrize(
    "body",
    [
        BILLION_LAUGHS,
        _xxe("file:///etc/passwd"),
        _xxe("http://127.0.0.1:9/evil"),
        BILLION_LAUGHS.decode().replace('<?xml version="1.0"?>', "").encode("utf-16"),
        b'<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd"><x/>',
        b'<!doctype x PUBLIC "-//A//DTD B//EN" "file:///etc/passwd"><x/>',
    ],
    ids=["billion-laughs", "xxe-file", "xxe-http", "utf16-doctype", "external-dtd", "lowercase"],
)
def test_dtds_and_entities_are_refused(body: bytes) -> None:
    with pytest.raises(RequestError, match="has a DOCTYPE") as caught:
        parse_request(body)
    assert "root:" not in str(caught.value)


def test_doctype_hidden_past_the_byte_scan_is_still_refused() -> None:
    # 70 KiB of comment first: the raw-byte check looks only at the first 64 KiB.
    body = b"<!--" + b"x" * (70 * 1024) + b'-->\n<!DOCTYPE x [<!ENTITY e "boom">]><x>&e;</x>'
    with pytest.raises(RequestError, match="has a DOCTYPE"):
        xmlsafe.parse(body, limit=1 << 20, what="test document", error=RequestError)


def _parse_reply(body: bytes) -> etree._Element:
    assert body.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    return etree.fromstring(body)


@pytest.mark.parametrize("version", list(SoapVersion))
def test_answer_is_qualified_register_image_response_return(version: SoapVersion) -> None:
    text = "FILESYSTEM=emi-1\nKERNEL=eki-2\nRAMDISK=\n"
    reply = answer_reply(version, text)
    assert reply.status == 200
    assert reply.content_type.startswith(version.media_type)
    root = _parse_reply(reply.body)
    assert root.tag == f"{{{version.namespace}}}Envelope"
    (response,) = root.find(f"{{{version.namespace}}}Body")
    assert response.tag == f"{{{ORCA_NS}}}RegisterImageResponse"
    (ret,) = response
    assert ret.tag == f"{{{ORCA_NS}}}return"
    assert ret.text == text
    assert loads(ret.text) == {"FILESYSTEM": "emi-1", "KERNEL": "eki-2", "RAMDISK": ""}


def test_soap11_fault_has_faultcode_faultstring_and_no_orca_detail() -> None:
    reply = fault_reply(SoapVersion.SOAP11, InvalidSignature("signature 'xyz' is not 40 hex"))
    assert reply.status == 500
    assert reply.content_type.startswith("text/xml")
    fault = _parse_reply(reply.body).find(f"{{{S11}}}Body/{{{S11}}}Fault")
    assert fault.findtext("faultcode") == "soapenv:Client"
    assert fault.findtext("faultstring") == "signature 'xyz' is not 40 hex"
    # ORCA's stub would replace the faultstring by "ExceptionException" for this element.
    assert fault.find("detail") is None
    assert fault.find(f".//{{{ORCA_NS}}}Exception") is None


def test_soap12_fault_has_code_reason_and_no_orca_detail() -> None:
    reply = fault_reply(SoapVersion.SOAP12, FetchError("origin down"))
    assert reply.status == 500
    assert reply.content_type.startswith("application/soap+xml")
    fault = _parse_reply(reply.body).find(f"{{{S12}}}Body/{{{S12}}}Fault")
    assert fault.findtext(f"{{{S12}}}Code/{{{S12}}}Value") == "soapenv:Receiver"
    assert fault.findtext(f"{{{S12}}}Reason/{{{S12}}}Text") == "origin down"
    assert fault.find(f"{{{S12}}}Detail") is None
    assert fault.find(f".//{{{ORCA_NS}}}Exception") is None


def test_soap12_sender_fault_is_http_400() -> None:
    reply = fault_reply(SoapVersion.SOAP12, RequestError("bad"))
    assert reply.status == 400
    fault = _parse_reply(reply.body).find(f"{{{S12}}}Body/{{{S12}}}Fault")
    assert fault.findtext(f"{{{S12}}}Code/{{{S12}}}Value") == "soapenv:Sender"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SoapVersionMismatch("x"), "soapenv:VersionMismatch"),
        (MustUnderstandError("x"), "soapenv:MustUnderstand"),
    ],
)
def test_protocol_fault_codes(error: Exception, code: str) -> None:
    fault = _parse_reply(fault_reply(SoapVersion.SOAP11, error).body).find(
        f"{{{S11}}}Body/{{{S11}}}Fault"
    )
    assert fault.findtext("faultcode") == code


def test_bugs_become_labelled_server_faults_and_bad_characters_survive() -> None:
    reply = fault_reply(SoapVersion.SOAP11, ValueError("bad \x00 byte"))
    fault = _parse_reply(reply.body).find(f"{{{S11}}}Body/{{{S11}}}Fault")
    assert fault.findtext("faultcode") == "soapenv:Server"
    assert fault.findtext("faultstring") == (
        "internal error in the registrar (ValueError: bad \ufffd byte)"
    )


def test_too_large_reply_is_413_with_a_fault() -> None:
    reply = too_large_reply(SoapVersion.SOAP11, 65536)
    assert reply.status == 413
    fault = _parse_reply(reply.body).find(f"{{{S11}}}Body/{{{S11}}}Fault")
    assert "exceeds 65536 bytes" in fault.findtext("faultstring")


_FUZZ_ALPHABET = st.sampled_from(
    [
        "<",
        ">",
        "/",
        "=",
        '"',
        " ",
        "&",
        ";",
        "!",
        "?",
        "[",
        "]",
        "s:",
        "o:",
        "x",
        "\x00",
        "é",
        "Envelope",
        "Body",
        "Header",
        "RegisterImage",
        "url",
        "signature",
        "DOCTYPE",
        "ENTITY",
        f'xmlns:s="{S11}"',
        f'xmlns:s="{S12}"',
        f'xmlns:o="{ORCA_NS}"',
        'mustUnderstand="1"',
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(_FUZZ_ALPHABET, max_size=60).map(lambda parts: "".join(parts).encode()),
        st.builds(
            lambda cut, junk: axis2_envelope(SoapVersion.SOAP11, "http://o/m", SIG)[:cut] + junk,
            st.integers(0, 330),
            st.binary(max_size=20),
        ),
    ),
    st.sampled_from([None, "text/xml", 'application/soap+xml; action="urn:RegisterImage"']),
)
def test_fuzzed_envelopes_raise_only_our_errors(body: bytes, content_type: str | None) -> None:
    try:
        request = parse_request(body, content_type)
    except RegistrarError as exc:
        fault_reply(version_for(content_type), exc)  # every error also makes a valid fault
    else:
        assert request.url and request.signature
