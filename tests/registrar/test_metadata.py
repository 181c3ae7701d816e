"""The metadata file: the original's rules, trimming, validation and hostile XML."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registrar.errors import (
    InvalidSignature,
    InvalidURL,
    MetadataError,
    RegistrarError,
    RequestTooLarge,
)
from registrar.metadata import MAX_METADATA_BYTES, check_signature, check_url, parse

SRC = "http://origin/meta.xml"
A = "a" * 40
B = "b" * 40
C = "c" * 40
D = "d" * 40


def entry(kind: str, url: str, sha1: str) -> str:
    return f"<image><type>{kind}</type><signature>{sha1}</signature><url>{url}</url></image>"


def doc(*entries: str) -> bytes:
    return ("<images>" + "".join(entries) + "</images>").encode()


def test_filesystem_kernel_and_ramdisk() -> None:
    images = parse(
        doc(
            entry("FILESYSTEM", "http://o/fs", A),
            entry("KERNEL", "http://o/k", B),
            entry("RAMDISK", "http://o/r", C),
        ),
        SRC,
    )
    assert (images.filesystem.type, images.filesystem.url, images.filesystem.sha1) == (
        "FILESYSTEM",
        "http://o/fs",
        A,
    )
    assert images.kernel is not None and images.kernel.sha1 == B
    assert images.ramdisk is not None and images.ramdisk.url == "http://o/r"
    assert [p.type for p in images.parts()] == ["KERNEL", "RAMDISK", "FILESYSTEM"]
    assert not images.filesystem.compressed


def test_whitespace_is_trimmed_and_signatures_lowercased() -> None:
    images = parse(
        doc(
            f"<image><type> ZFILESYSTEM\n</type><signature>\n  {A.upper()}  \n</signature>"
            "<url>\t http://o/fs.gz \n</url></image>"
        ),
        SRC,
    )
    assert images.filesystem.url == "http://o/fs.gz"
    assert images.filesystem.sha1 == A
    assert images.filesystem.compressed


def test_filesystem_preferred_over_zfilesystem_either_order() -> None:
    for order in ((0, 1), (1, 0)):
        entries = [entry("FILESYSTEM", "http://o/fs", A), entry("ZFILESYSTEM", "http://o/z", B)]
        images = parse(doc(*(entries[i] for i in order)), SRC)
        assert images.filesystem.type == "FILESYSTEM"
        assert images.filesystem.sha1 == A


def test_later_duplicate_wins() -> None:
    images = parse(
        doc(
            entry("FILESYSTEM", "http://o/fs1", A),
            entry("KERNEL", "http://o/k1", B),
            entry("KERNEL", "http://o/k2", C),
            entry("FILESYSTEM", "http://o/fs2", D),
        ),
        SRC,
    )
    assert images.filesystem.url == "http://o/fs2"
    assert images.kernel is not None and images.kernel.url == "http://o/k2"


def test_ramdisk_without_kernel_is_fine() -> None:
    images = parse(
        doc(entry("FILESYSTEM", "http://o/fs", A), entry("RAMDISK", "http://o/r", B)), SRC
    )
    assert images.kernel is None
    assert images.ramdisk is not None


def test_unknown_types_and_wrong_case_are_ignored_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registrar.metadata")
    images = parse(
        doc(
            entry("VHD", "http://o/q", B),
            entry("kernel", "http://o/k", C),
            entry("FILESYSTEM", "http://o/fs", A),
        ),
        SRC,
    )
    assert images.kernel is None
    assert "unknown type 'VHD'" in caplog.text
    assert "unknown type 'kernel'" in caplog.text


def test_qcow2_alone_or_beside_a_filesystem() -> None:
    alone = parse(doc(entry("QCOW2", "http://o/q", B)), SRC)
    assert alone.filesystem is None
    assert alone.qcow2 is not None and (alone.qcow2.url, alone.qcow2.sha1) == ("http://o/q", B)
    both = parse(
        doc(
            entry("QCOW2", "http://o/q", B),
            entry("KERNEL", "http://o/k", C),
            entry("ZFILESYSTEM", "http://o/fs", A),
        ),
        SRC,
    )
    assert both.filesystem is not None and both.filesystem.type == "ZFILESYSTEM"
    assert [p.type for p in both.parts()] == ["KERNEL", "ZFILESYSTEM", "QCOW2"]


@pytest.mark.parametrize(
    "blank",
    [
        "<image><type></type><url>http://o/x</url><signature>{C}</signature></image>",
        "<image><type>KERNEL</type><url> </url><signature>{C}</signature></image>",
        "<image><type>KERNEL</type><url>http://o/x</url><signature/></image>",
        "<image><type>KERNEL</type><url>http://o/x</url></image>",
        "<image><type/><url/><signature/></image>",
    ],
)
def test_entries_with_an_empty_field_are_skipped_with_a_log_line(
    blank: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registrar.metadata")
    images = parse(doc(blank.format(C=C), entry("FILESYSTEM", "http://o/fs", A)), SRC)
    assert images.kernel is None
    assert images.filesystem is not None and images.filesystem.sha1 == A
    assert "skipping image entry 1, whose <" in caplog.text


def test_names_are_case_sensitive() -> None:
    with pytest.raises(MetadataError, match="no FILESYSTEM, ZFILESYSTEM or QCOW2 image"):
        parse(b"<images><Image><type>FILESYSTEM</type></Image></images>", SRC)


def test_root_element_name_is_not_required_to_be_images() -> None:
    images = parse(b"<list>" + entry("FILESYSTEM", "http://o/fs", A).encode() + b"</list>", SRC)
    assert images.filesystem.sha1 == A


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (
            doc(entry("KERNEL", "http://o/k", A)),
            MetadataError,
            "a filesystem or a QCOW2 is required",
        ),
        (doc(), MetadataError, "lists no FILESYSTEM"),
        (
            b"<images><image>",
            MetadataError,
            "metadata at http://origin/meta.xml is not well-formed",
        ),
        (b"not xml at all", MetadataError, "not well-formed XML"),
        (
            # The only filesystem entry is skipped for its missing signature: none is left.
            doc("<image><type>FILESYSTEM</type><url>http://o/fs</url></image>"),
            MetadataError,
            "lists no FILESYSTEM, ZFILESYSTEM or QCOW2 image",
        ),
        (
            doc(f"<image><type>FILESYSTEM</type><url><a/></url><signature>{A}</signature></image>"),
            MetadataError,
            "image entry 1 .* has no <url> text",
        ),
        (
            doc(entry("FILESYSTEM", "http://o/fs", "abc")),
            InvalidSignature,
            "FILESYSTEM image in metadata at http://origin/meta.xml: signature 'abc' is not a",
        ),
        (
            doc(entry("KERNEL", "ftp://o/k", A), entry("FILESYSTEM", "http://o/fs", A)),
            InvalidURL,
            "KERNEL image .* URL 'ftp://o/k' has scheme 'ftp'",
        ),
        (
            b'<!DOCTYPE images [<!ENTITY x SYSTEM "file:///etc/passwd">]><images>&x;</images>',
            MetadataError,
            "has a DOCTYPE",
        ),
    ],
)
def test_bad_metadata_says_exactly_what_is_wrong(
    data: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        parse(data, SRC)


def test_oversized_metadata_is_refused() -> None:
    with pytest.raises(RequestTooLarge, match=f"the limit is {MAX_METADATA_BYTES} bytes"):
        parse(b"<images>" + b" " * MAX_METADATA_BYTES + b"</images>", SRC)


def test_ten_thousand_entries_are_refused_quickly() -> None:
    # 10,000 small entries fit under the byte limit only if tiny: use unknown types to be sure
    # the count, not the size, refuses it.
    data = doc(*["<image><type>X</type></image>"] * 10_000)
    assert len(data) < MAX_METADATA_BYTES * 2
    with pytest.raises((MetadataError, RequestTooLarge)):
        parse(data, SRC)
    small = doc(*["<image><type>X</type></image>"] * 1000)
    assert len(small) < MAX_METADATA_BYTES
    with pytest.raises(MetadataError, match="lists more than 64 images"):
        parse(small, SRC)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "g" * 40, "a" * 41, "a" * 39, "a" * 20 + " " + "a" * 19, "0x" + "a" * 38],
)
def test_signature_format(value: str) -> None:
    with pytest.raises(InvalidSignature, match="is not a SHA-1 \\(40 hexadecimal digits\\)"):
        check_signature(value)


def test_signature_trimmed_and_lowercased() -> None:
    assert check_signature("  " + "AbCdEf0123" * 4 + "\n") == "abcdef0123" * 4


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://o/x", "scheme 'ftp'"),
        ("gopher://o/x", "scheme 'gopher'"),
        ("o/x", "scheme 'none'"),
        ("http://user:secret@o/x", "must not carry credentials"),
        ("http://user@o/x", "must not carry credentials"),
        ("http:///x", "has no host"),
        ("http://o:99999/x", "not a valid URL"),
        ("http://o/a b", "spaces or control characters"),
        ("http://o/" + "a" * 3000, "at most 2048 allowed"),
    ],
)
def test_url_rules(url: str, message: str) -> None:
    with pytest.raises(InvalidURL, match=message) as caught:
        check_url(url)
    assert "secret" not in str(caught.value)


def test_good_urls_are_trimmed() -> None:
    assert check_url("  https://Origin.example:8443/img/fs.img?x=1 \n") == (
        "https://Origin.example:8443/img/fs.img?x=1"
    )


_PIECES = st.sampled_from(
    [
        "<images>",
        "</images>",
        "<image>",
        "</image>",
        "<type>",
        "</type>",
        "<url>",
        "</url>",
        "<signature>",
        "</signature>",
        "FILESYSTEM",
        "ZFILESYSTEM",
        "KERNEL",
        "RAMDISK",
        "QCOW2",
        "http://o/x",
        "ftp://o/x",
        "http://u:p@o/x",
        A,
        "  ",
        "\n",
        "&amp;",
        "&x;",
        "<!DOCTYPE x>",
        "<![CDATA[",
        "]]>",
        "<!--",
        "-->",
        "\x00",
        "é",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(_PIECES, max_size=40).map(lambda parts: "".join(parts).encode()),
    )
)
def test_fuzzed_metadata_raises_only_our_errors(data: bytes) -> None:
    try:
        images = parse(data, SRC)
    except RegistrarError:
        return
    assert images.filesystem.type in ("FILESYSTEM", "ZFILESYSTEM")
    for part in images.parts():
        assert check_signature(part.sha1) == part.sha1
        assert check_url(part.url) == part.url
