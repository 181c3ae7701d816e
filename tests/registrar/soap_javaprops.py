"""A test-side reader with the exact rules of `java.util.Properties.load(Reader)`.

ORCA loads the RegisterImage answer with `java.util.Properties`; the tests load it with this, which
follows the JDK's LineReader and loadConvert step for step: natural lines end in \\n, \\r or
\\r\\n; leading whitespace (space, tab, form feed) is skipped; a first non-blank `#` or `!` makes a
comment line; an odd number of trailing backslashes joins the next line (its leading whitespace
dropped); the key ends at the first unescaped `=`, `:` or whitespace; whitespace and one `=`/`:`
separate it from the value; `\\t \\n \\r \\f \\uXXXX` are escapes; any other backslash is
dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

_WHITE = " \t\f"


def _logical_lines(text: str) -> Iterator[str]:
    """The logical lines of `text`, as the JDK's Properties.LineReader yields them."""
    buf: list[str] = []
    skip_white = True
    comment = False
    new_line = True
    appended = False
    backslash = False
    skip_lf = False
    index = 0
    while True:
        if index >= len(text):
            if not buf or comment:
                return
            if backslash:
                buf.pop()
            yield "".join(buf)
            return
        char = text[index]
        index += 1
        if skip_lf:
            skip_lf = False
            if char == "\n":
                continue
        if skip_white:
            if char in _WHITE:
                continue
            if not appended and char in "\r\n":
                continue
            skip_white = False
            appended = False
        if new_line:
            new_line = False
            if char in "#!":
                comment = True
                continue
        if char not in "\r\n":
            buf.append(char)
            backslash = (not backslash) if char == "\\" else False
            continue
        # End of a natural line.
        if comment or not buf:
            comment = False
            new_line = True
            skip_white = True
            buf = []
            continue
        if index >= len(text):
            if backslash:
                buf.pop()
            yield "".join(buf)
            return
        if backslash:
            buf.pop()
            skip_white = True
            appended = True
            backslash = False
            if char == "\r":
                skip_lf = True
            continue
        yield "".join(buf)
        buf = []
        skip_white = True
        new_line = True


def _convert(chars: str) -> str:
    """The JDK's loadConvert: resolve escapes; malformed \\uXXXX raises ValueError like Java."""
    out: list[str] = []
    index = 0
    while index < len(chars):
        char = chars[index]
        index += 1
        if char != "\\":
            out.append(char)
            continue
        char = chars[index]
        index += 1
        if char == "u":
            digits = chars[index : index + 4]
            if len(digits) < 4 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError("Malformed \\uxxxx encoding.")
            out.append(chr(int(digits, 16)))
            index += 4
        else:
            out.append({"t": "\t", "r": "\r", "n": "\n", "f": "\f"}.get(char, char))
    # Java chars are UTF-16 code units: join surrogate pairs into one character.
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16")


def loads(text: str) -> dict[str, str]:
    """Load Properties text as `java.util.Properties.load(Reader)` would; a later key wins."""
    props: dict[str, str] = {}
    for line in _logical_lines(text):
        key_len = 0
        value_start = len(line)
        has_sep = False
        backslash = False
        while key_len < len(line):
            char = line[key_len]
            if char in "=:" and not backslash:
                value_start = key_len + 1
                has_sep = True
                break
            if char in _WHITE and not backslash:
                value_start = key_len + 1
                break
            backslash = (not backslash) if char == "\\" else False
            key_len += 1
        while value_start < len(line):
            char = line[value_start]
            if char not in _WHITE:
                if not has_sep and char in "=:":
                    has_sep = True
                else:
                    break
            value_start += 1
        props[_convert(line[:key_len])] = _convert(line[value_start:])
    return props
