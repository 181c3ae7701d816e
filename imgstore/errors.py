"""imgstore's exceptions: one hierarchy, mapped to errno in fs.py and to CLI errors in cli.py."""

from __future__ import annotations


class StoreError(Exception):
    """Raised when the store cannot do what was asked; the message says what and why."""


class ConfigError(StoreError):
    """Raised when a config file, a size or a command-line value is invalid."""


class UnknownBlob(StoreError):
    """Raised when a SHA-1 is not in the catalog."""


class BadSha1(StoreError):
    """Raised when a SHA-1 text is not 40 hexadecimal digits."""


class BadUrl(StoreError):
    """Raised when a URL is not http(s) or cannot be used."""


class OriginError(StoreError):
    """Raised when the origin cannot be reached or answers in a way we cannot use."""


class OriginChanged(OriginError):
    """Raised when the origin's ETag changed since the blob was declared."""


class RangeNotSupported(OriginError):
    """Raised when the origin answered a ranged request with the whole body (a 200)."""


class OriginRetry(OriginError):
    """Raised when one attempt failed in a way the next may not (a broken connection, a 5xx or
    429, a short body); `received` bytes of the asked range landed before it did.

    Only the fetch loops catch it: they resume after those bytes or give up when the retry
    budget is spent, as an OriginError naming the last reason.
    """

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class BlobCorrupt(StoreError):
    """Raised when a blob failed verification; it stays unreadable until re-added."""

    @classmethod
    def of(cls, sha1: str, reason: str | None = None) -> BlobCorrupt:
        """The one wording; `reason` (the catalog's, e.g. "content has SHA-1 …") if known."""
        detail = f" ({reason})" if reason else ""
        return cls(f"blob {sha1} failed verification{detail}; re-add it")


class CacheFull(StoreError):
    """Raised when a chunk cannot be stored without overrunning the cache budget or the disk."""


class BlobBusy(StoreError):
    """Raised when a blob cannot be changed because a mount or another process has it open."""


class MountError(StoreError):
    """Raised when the filesystem cannot be mounted or unmounted."""


class ForbiddenAddress(OriginError):
    """Raised when an untrusted URL would connect to an address the network policy refuses."""
