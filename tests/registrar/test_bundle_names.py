"""Image names and bundle prefixes that Eucalyptus accepts and that never collide."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from registrar import names
from registrar.errors import InvalidImageName

VALID = re.compile(r"[A-Za-z0-9()./_-]{3,128}")


def test_unique_names_are_valid_distinct_and_carry_the_sha1() -> None:
    sha1 = "ABCDEF0123456789abcdef0123456789abcdef01"
    now = datetime(2026, 11, 23, 19, 25, tzinfo=UTC)
    made = {names.unique_name("centos 6.5 (final)", sha1, now=now) for _ in range(200)}
    assert len(made) == 200  # same label, SHA-1 and second: still distinct
    for name in made:
        assert VALID.fullmatch(name) and "/" not in name
        assert name.startswith("centos-6.5-(final)-abcdef012345-20261123T192500Z-")


@pytest.mark.parametrize(
    "label",
    ["", "///", "x" * 300, "ünïcödé.img", "http://example.org/images/fs.img.gz", "a b\tc\n"],
)
def test_any_label_becomes_a_valid_name(label: str) -> None:
    name = names.unique_name(label, "f" * 40)
    assert VALID.fullmatch(name), name
    assert "/" not in name


def test_unique_name_without_sha1() -> None:
    assert re.fullmatch(r"fs\.img-\d{8}T\d{6}Z-[0-9a-f]{6}", names.unique_name("fs.img"))


@pytest.mark.parametrize("name", ["ab", "x" * 129, "has space", "semi;colon", "ünï"])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidImageName):
        names.validate(name)


@pytest.mark.parametrize("name", ["abc", "x" * 128, "centos/6.5_(x86-64).img"])
def test_valid_names_pass(name: str) -> None:
    assert names.validate(name) == name
