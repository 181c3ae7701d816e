"""The answer text loads exactly as java.util.Properties.load would load it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registrar.properties import answer_text, dumps
from tests.registrar.soap_javaprops import loads

# --- the loader follows Java's rules (each case is what the JDK returns for that input) ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=b\n", {"a": "b"}),
        ("a:b\n", {"a": "b"}),
        ("a b\n", {"a": "b"}),
        ("a\tb", {"a": "b"}),
        ("a \t = \t b  \n", {"a": "b  "}),
        ("a = = b\n", {"a": "= b"}),
        ("a::b\n", {"a": ":b"}),
        ("   a=b\r\nc=d\re=f", {"a": "b", "c": "d", "e": "f"}),
        ("# comment\n! also\n  # indented comment\na=b", {"a": "b"}),
        ("a=b # not a comment\n", {"a": "b # not a comment"}),
        ("#comment \\\na=b\n", {"a": "b"}),
        ("key\n", {"key": ""}),
        ("key=\n", {"key": ""}),
        ("=value\n", {"": "value"}),
        ("a=one \\\n    two\\\n three\n", {"a": "one twothree"}),
        ("a=x\\\\\nb=y\n", {"a": "x\\", "b": "y"}),
        ("a=x\\\n", {"a": "x"}),
        ("a=x\\", {"a": "x"}),
        ("a=\\u0041\\u00e9\\t\\n\\r\\f\\q\\=\n", {"a": "A\u00e9\t\n\r\fq="}),
        ("a\\ b\\:c\\=d=e\n", {"a b:c=d": "e"}),
        ("a=\\uD83D\\uDE00\n", {"a": "\U0001f600"}),
        ("a=1\na=2\n", {"a": "2"}),
        ("\n\n   \n\t\f\n", {}),
        ("a=b\\\r\n  c", {"a": "bc"}),
    ],
)
def test_loader_follows_java_rules(text: str, expected: dict[str, str]) -> None:
    assert loads(text) == expected


@pytest.mark.parametrize("text", ["a=\\u12\n", "a=\\uZZZZ\n", "a=\\u"])
def test_loader_rejects_malformed_unicode_escape_like_java(text: str) -> None:
    with pytest.raises(ValueError, match="Malformed"):
        loads(text)


# --- the writer ---


def test_answer_with_all_parts() -> None:
    text = answer_text("emi-12345678", "eki-12345678", "eri-12345678")
    assert text == "FILESYSTEM=emi-12345678\nKERNEL=eki-12345678\nRAMDISK=eri-12345678\n"
    assert loads(text) == {
        "FILESYSTEM": "emi-12345678",
        "KERNEL": "eki-12345678",
        "RAMDISK": "eri-12345678",
    }


def test_missing_kernel_and_ramdisk_load_as_empty_strings() -> None:
    text = answer_text("ami-0123abcd")
    assert loads(text) == {"FILESYSTEM": "ami-0123abcd", "KERNEL": "", "RAMDISK": ""}


def test_text_is_ascii_with_lf_line_ends() -> None:
    text = dumps([("k é", " lead\r\n#!=:\\ \U0001f600")])
    assert text.isascii()
    assert "\r" not in text
    assert text.count("\n") == 1


@given(
    st.lists(
        st.tuples(st.text(max_size=20), st.text(max_size=40)),
        max_size=6,
    )
)
def test_any_keys_and_values_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert loads(dumps(pairs)) == dict(pairs)
