"""The image metadata file: parse it safely, check it, and choose the parts to register.

The format and rules are the original ImageProxy's. Names are case-sensitive:

    <images>
      <image><type>FILESYSTEM</type><signature>SHA-1</signature><url>http://…</url></image>
      <image><type>KERNEL</type>…</image>
    </images>

- Types are FILESYSTEM, ZFILESYSTEM (compressed; its signature is the compressed file's SHA-1),
  KERNEL and RAMDISK. Unknown types (QCOW2 among them: it cannot be bundled for Eucalyptus) are
  ignored with a log line.
- A filesystem is required; FILESYSTEM wins over ZFILESYSTEM; a later entry of a type replaces an
  earlier one.
- URLs and signatures are trimmed of surrounding whitespace (a known pain of the original);
  signatures are lowercased and must be 40 hex digits; URLs must be plain http(s) without
  credentials.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from registrar import xmlsafe
from registrar.errors import InvalidSignature, InvalidURL, MetadataError

log = logging.getLogger(__name__)

# A metadata file is a few hundred bytes; these bound what a hostile one can cost.
MAX_METADATA_BYTES = 256 * 1024
MAX_IMAGES = 64
MAX_URL_LENGTH = 2048

FILESYSTEM = "FILESYSTEM"
ZFILESYSTEM = "ZFILESYSTEM"
KERNEL = "KERNEL"
RAMDISK = "RAMDISK"
KNOWN_TYPES = (FILESYSTEM, ZFILESYSTEM, KERNEL, RAMDISK)

_SHA1 = re.compile(r"[0-9a-f]{40}")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Part:
    """One image file the metadata lists: its type keyword, URL and SHA-1 (lowercase hex)."""

    type: str
    url: str
    sha1: str

    @property
    def compressed(self) -> bool:
        """Whether the file must be decompressed before bundling (ZFILESYSTEM)."""
        return self.type == ZFILESYSTEM


@dataclass(frozen=True)
class ImageSet:
    """What to register: a filesystem, and optionally a kernel and a ramdisk."""

    filesystem: Part
    kernel: Part | None = None
    ramdisk: Part | None = None

    def parts(self) -> list[Part]:
        """Kernel and ramdisk first (the machine image refers to them), then the filesystem."""
        return [p for p in (self.kernel, self.ramdisk) if p is not None] + [self.filesystem]


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def check_signature(value: str, what: str = "signature") -> str:
    """Return `value` trimmed and lowercased, or raise InvalidSignature if it is not a SHA-1."""
    signature = value.strip().lower()
    if not _SHA1.fullmatch(signature):
        raise InvalidSignature(
            f"{what} {_shown(value.strip())} is not a SHA-1 (40 hexadecimal digits)"
        )
    return signature


def check_url(value: str, what: str = "URL") -> str:
    """Return `value` trimmed, or raise InvalidURL unless it is a plain http(s) URL."""
    url = value.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidURL(f"{what} is {len(url)} characters long; at most {MAX_URL_LENGTH} allowed")
    if _BAD_URL_CHARS.search(url):
        raise InvalidURL(f"{what} {_shown(url)} contains spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        raise InvalidURL(f"{what} {_shown(url)} is not a valid URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidURL(
            f"{what} {_shown(url)} has scheme {parts.scheme or 'none'!r}; only http and https "
            "are accepted"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidURL(f"{what} {_shown(url.split('@')[-1])} must not carry credentials")
    if not parts.hostname:
        raise InvalidURL(f"{what} {_shown(url)} has no host")
    return url


def _field(entry: object, name: str, index: int, source: str) -> str:
    element = entry.find(name)  # type: ignore[attr-defined]
    if element is None or len(element):
        raise MetadataError(f"image entry {index} in metadata at {source} has no <{name}> text")
    return element.text or ""


def parse(data: bytes, source: str) -> ImageSet:
    """Parse metadata bytes fetched from `source` (its URL, for messages) into an ImageSet.

    Raises RequestTooLarge for an oversized file, MetadataError for XML that is malformed, has a
    DTD, lists too many entries or no filesystem, InvalidSignature/InvalidURL for bad entries.
    """
    root = xmlsafe.parse(
        data, limit=MAX_METADATA_BYTES, what=f"metadata at {source}", error=MetadataError
    )
    chosen: dict[str, Part] = {}
    for index, entry in enumerate(root.iter("image"), start=1):
        if index > MAX_IMAGES:
            raise MetadataError(
                f"metadata at {source} lists more than {MAX_IMAGES} images; it is not a usable "
                "image description"
            )
        kind = _field(entry, "type", index, source).strip()
        if kind not in KNOWN_TYPES:
            log.info(
                "metadata at %s: ignoring image entry %d of unknown type %r",
                source,
                index,
                kind[:40],
            )
            continue
        what = f"{kind} image in metadata at {source}:"
        url = check_url(_field(entry, "url", index, source), f"{what} URL")
        sha1 = check_signature(_field(entry, "signature", index, source), f"{what} signature")
        if kind in chosen:
            log.info("metadata at %s: a later %s entry replaces an earlier one", source, kind)
        chosen[kind] = Part(kind, url, sha1)
    filesystem = chosen.get(FILESYSTEM) or chosen.get(ZFILESYSTEM)
    if filesystem is None:
        raise MetadataError(
            f"metadata at {source} lists no FILESYSTEM or ZFILESYSTEM image; a filesystem is "
            "required"
        )
    if FILESYSTEM in chosen and ZFILESYSTEM in chosen:
        log.info("metadata at %s: FILESYSTEM preferred over ZFILESYSTEM", source)
    return ImageSet(filesystem, chosen.get(KERNEL), chosen.get(RAMDISK))
