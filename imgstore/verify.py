"""Incremental SHA-1 over a blob's contiguous cached prefix, and the verdict.

The hasher is fed in order, by whoever holds the blob's hash lock (see docs/imgstore-design.md);
`update` runs in a worker thread because hashing 4 MiB takes milliseconds. Nothing is persisted:
after a restart the cached prefix is hashed again, which costs a read of the cache, not the
network.
"""

from __future__ import annotations

import hashlib
import logging
import re

from imgstore.errors import BadSha1

log = logging.getLogger(__name__)

_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


def normalize_sha1(text: str) -> str:
    """Return a SHA-1 in the canonical form (40 lowercase hex), trimming whitespace."""
    value = text.strip().lower()
    if not _SHA1_RE.match(value):
        raise BadSha1(f"not a SHA-1 (40 hex digits): {text.strip()!r}")
    return value


class PrefixHasher:
    """SHA-1 of bytes [0, hashed) of a blob of `size` bytes, expected to equal `expected`."""

    def __init__(self, expected: str, size: int) -> None:
        self.expected = expected
        self.size = size
        self.hashed = 0
        self._h = hashlib.sha1(usedforsecurity=False)

    def update(self, data: bytes | memoryview) -> None:
        """Feed the bytes that follow the current prefix (blocking; call it in a thread)."""
        self._h.update(data)
        self.hashed += len(data)
        if self.hashed > self.size:
            raise AssertionError("hashed past the end of the blob")

    @property
    def done(self) -> bool:
        return self.hashed == self.size

    def matches(self) -> bool:
        """The verdict, once `done`: True if the digest equals the declared SHA-1."""
        assert self.done
        return self._h.hexdigest() == self.expected

    def hexdigest(self) -> str:
        return self._h.hexdigest()
