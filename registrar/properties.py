"""The answer text ORCA reads with `java.util.Properties.load`: `FILESYSTEM=…`, `KERNEL=…`, …

Written the way `Properties.store` escapes, so any value (even one with `=`, `:`, `#`, `!`,
backslashes, leading spaces, newlines or non-ASCII characters) loads back unchanged. Lines end in
`\\n` only: the text travels inside an XML element, where a carriage return would be normalized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

_SIMPLE = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f", "\\": "\\\\"}
_SPECIAL = "=:#!"


def _escape(text: str, *, is_key: bool) -> str:
    out: list[str] = []
    for index, char in enumerate(text):
        if char in _SIMPLE:
            out.append(_SIMPLE[char])
        elif char == " ":
            # Properties.load drops leading whitespace of a value and ends a key at a space.
            out.append("\\ " if is_key or index == 0 else " ")
        elif char in _SPECIAL:
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            # Java strings are UTF-16: characters beyond the BMP become a surrogate pair.
            units = char.encode("utf-16-be")
            for at in range(0, len(units), 2):
                out.append(f"\\u{int.from_bytes(units[at : at + 2], 'big'):04X}")
    return "".join(out)


def dumps(pairs: Iterable[tuple[str, str]]) -> str:
    """Properties text for `pairs`, one `key=value` line each, in the given order."""
    return "".join(f"{_escape(k, is_key=True)}={_escape(v, is_key=False)}\n" for k, v in pairs)


def answer_text(
    filesystem: str,
    kernel: str | None = None,
    ramdisk: str | None = None,
    qcow2: str | None = None,
) -> str:
    """The RegisterImage answer: the three ids, a missing one as an empty value, and `QCOW2`.

    An empty value loads as "" in Java, which is what ORCA turns a missing id into anyway, so the
    text is explicit about there being no kernel rather than leaving the key out. `QCOW2` appears
    only when a QCOW2 image was registered: ORCA 5 prefers it on OpenStack when it is there.
    """
    pairs = [("FILESYSTEM", filesystem), ("KERNEL", kernel or ""), ("RAMDISK", ramdisk or "")]
    if qcow2:
        pairs.append(("QCOW2", qcow2))
    return dumps(pairs)
