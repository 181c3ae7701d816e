"""The XML attacks of hostile SOAP, aimed at the metadata parser instead.

Entity bombs, external entities (file:// and http://), external DTDs and parameter entities,
in UTF-8 and UTF-16, are refused as a DOCTYPE before any expansion; nothing is fetched (a
listening trap sees no connection); the parser's memory stays small.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator

import pytest

from registrar.errors import MetadataError
from registrar.metadata import parse

SRC = "http://origin/meta.xml"
SIG = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def trap() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(BlockingIOError):
            sock.accept()  # nobody connected
    finally:
        sock.close()


def _laughs(depth: int = 9) -> str:
    ents = ['<!ENTITY l0 "lollollollollollollollollollol">']
    ents += [f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, depth + 1)]
    return "<!DOCTYPE images [" + "".join(ents) + "]>"


def _images(url: str = "http://o/fs") -> str:
    return (
        f"<images><image><type>FILESYSTEM</type><signature>{SIG}</signature>"
        f"<url>{url}</url></image></images>"
    )


def _attacks(trap: str) -> dict[str, bytes]:
    return {
        "billion laughs": (_laughs() + _images("&l9;")).encode(),
        "xxe file": (
            '<!DOCTYPE images [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + _images("&x;")
        ).encode(),
        "xxe http": (
            f'<!DOCTYPE images [<!ENTITY x SYSTEM "{trap}/x">]>' + _images("&x;")
        ).encode(),
        "external dtd": (f'<!DOCTYPE images SYSTEM "{trap}/x.dtd">' + _images()).encode(),
        "parameter entity": (
            f'<!DOCTYPE images [<!ENTITY % p SYSTEM "{trap}/p.dtd"> %p;]>' + _images()
        ).encode(),
        "utf-16 bomb": (
            '<?xml version="1.0" encoding="UTF-16"?>' + _laughs() + _images("&l9;")
        ).encode("utf-16"),
        "doctype after a comment": ("<!-- hi -->" + _laughs(3) + _images("&l3;")).encode(),
    }


def test_xml_attacks_on_metadata_are_refused_without_expansion(trap: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for what, data in _attacks(trap).items():
        with pytest.raises(MetadataError, match="has a DOCTYPE; DTDs and entities") as caught:
            parse(data, SRC)
        assert "root:" not in str(caught.value), what
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 * 1024, f"peak memory grew by {grown_kib} KiB"
